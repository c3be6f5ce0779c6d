"""Process-group setup for the three ways train.py is started, and small collective helpers.

- `deepspeed train.py ...`: the launcher sets RANK/WORLD_SIZE/... and passes --local_rank.
- `torchrun ... train.py ...`: torchrun sets the same variables.
- `python train.py ...`: one process; we fill in a single-rank environment, so DeepSpeed does
  not go looking for MPI.
DeepSpeed picks the backend: NCCL on GPUs, gloo on CPU.

A rank that torchrun or the deepspeed launcher started ends when its launcher dies (see
`exit_with_launcher`): torchrun starts every rank in a session of its own, so a killed launcher
would otherwise leave its ranks running, still writing into out_dir, beside the next launch.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, TypeVar

import torch
import torch.distributed as dist

from modeconn.errors import ModeconnError
from modeconn.lock import OutputLock

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> World:
    import deepspeed

    if "RANK" not in os.environ:  # plain `python train.py`
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
    os.environ.setdefault("LOCAL_RANK", os.environ["RANK"])
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    deepspeed.init_distributed(verbose=False)
    exit_with_launcher()
    return World(dist.get_rank(), dist.get_world_size(), local_rank, device)


def _launcher() -> Optional[str]:
    if "TORCHELASTIC_RUN_ID" in os.environ:
        return "torchrun"
    if "CROSS_RANK" in os.environ and "LOCAL_SIZE" in os.environ:  # set by deepspeed.launcher.launch
        return "the deepspeed launcher"
    return None


def exit_with_launcher(poll_seconds: float = 0.5) -> None:
    """Under torchrun or the deepspeed launcher, exit (status 1) as soon as the launcher is gone.

    Decided so because the launcher is the job: when it is killed (SIGKILL, a lost node, a user's
    kill of the wrong pid), nothing collects the ranks' results or restarts them, and an orphan
    rank would hold the out_dir's lock or keep writing into it. Leaving is as safe as a kill at that
    moment: checkpoints and exports are complete or invisible, and --resume=auto continues. Plain
    `python` runs (also under nohup) and SLURM tasks (srun owns their lifetime) are not watched.
    """
    launcher = _launcher()
    if launcher is None:
        return
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_seconds)
        print(f"rank {os.environ.get('RANK', '?')}: {launcher} (pid {parent}) is gone; exiting. Continue the run "
              f"with --resume=auto", file=sys.stderr, flush=True)
        os._exit(1)

    threading.Thread(target=watch, name="launcher-watch", daemon=True).start()


def strip_launcher_args(argv: list[str]) -> list[str]:
    """The deepspeed launcher appends --local_rank=N; the rank comes from LOCAL_RANK anyway."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a.startswith("--local_rank="):
            continue
        elif a == "--local_rank":
            skip = True
        else:
            out.append(a)
    return out


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if it is true on any (e.g. a signal that reached one rank)."""
    return all_reduce_sum([1.0 if flag else 0.0], device)[0] > 0


def broadcast_object(obj, src: int = 0):
    """`obj` of rank `src` on every rank (picklable objects)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def decided_on_rank0(world: World, decide: Callable[[], T]) -> T:
    """`decide()` runs on rank 0 only; every rank returns its result, or raises its ModeconnError
    (bad input found by rank 0 stops every rank, none is left waiting in a collective)."""
    outcome = None
    if world.is_main:
        try:
            outcome = (decide(), None)
        except ModeconnError as e:
            outcome = (None, e)
    result, error = broadcast_object(outcome)
    if error is not None:
        raise error
    return result


@contextlib.contextmanager
def held_by_rank0(lock: OutputLock, world: World) -> Iterator[None]:
    """Rank 0 takes `lock` (an output directory's) for the block; when it cannot, every rank
    raises its error."""
    decided_on_rank0(world, lambda: bool(lock.acquire()))
    try:
        yield
    finally:
        if world.is_main:
            lock.release()


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
