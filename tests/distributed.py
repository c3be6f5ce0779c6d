"""Run a function in N CPU processes joined by a gloo process group (the tests' multi-rank harness)."""

from __future__ import annotations

import os
import socket
import sys

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    fn(rank, world_size, *args)  # an exception here reaches the parent with its traceback
    dist.barrier()  # nobody tears down the group while another rank still uses it
    dist.destroy_process_group()
    # Leave without interpreter teardown: C++ threads of DeepSpeed/gloo destroyed there have
    # aborted a finished rank ("terminate called without an active exception") under load.
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)


def run_distributed(fn, world_size: int, *args) -> None:
    """`fn(rank, world_size, *args)` in `world_size` processes; raises if any rank fails.
    `fn` must be importable (module level) and report results through files in its args."""
    mp.start_processes(_entry, args=(world_size, free_port(), fn, args), nprocs=world_size,
                       join=True, start_method="spawn")
