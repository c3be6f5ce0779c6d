"""The instruments behind benchmarks/muon_step.py's deterministic figures (benchmarks/step_counters.py):
bytes counted on 3 gloo ranks against the volumes of each collective worked out by hand; torch's
flop counter against our NS cost model (which balances the owners); the allocation peak against a
known allocation pattern."""

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from distributed import run_distributed

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def _count_collectives(rank, world, out):
    from step_counters import CollectiveCounter

    counter = CollectiveCounter().install()
    f32 = 4
    n = 7 * world  # elements of the full tensor
    expected = {}
    with counter.counting():
        dist.all_reduce(torch.ones(n))
        expected["all_reduce"] = 2 * (world - 1) / world * n * f32
        dist.all_gather_into_tensor(torch.empty(n), torch.ones(n // world))
        expected["all_gather_into_tensor"] = (world - 1) * n // world * f32
        dist.reduce_scatter_tensor(torch.empty(n // world), torch.ones(n))
        expected["reduce_scatter_tensor"] = (world - 1) * n // world * f32
        dist.all_gather([torch.empty(3) for _ in range(world)], torch.ones(3))
        expected["all_gather"] = (world - 1) * 3 * f32
        # rank r sends r + j + 1 elements to rank j and receives j + r + 1 from it
        send = [rank + j + 1 for j in range(world)]
        dist.all_to_all_single(torch.empty(sum(send)), torch.ones(sum(send)), send, send)
        expected["all_to_all_single"] = (sum(send) - send[rank]) * f32
        dist.broadcast(torch.ones(5, dtype=torch.float64), src=1)
        expected["broadcast"] = 5 * 8
    dist.all_reduce(torch.ones(100))  # outside counting(): not counted
    json.dump({"calls": counter.calls, "bytes": counter.bytes_by_call, "expected": expected,
               "sent": counter.sent, "received": counter.received}, open(f"{out}/{rank}.json", "w"))


def test_collective_bytes_per_rank(tmp_path):
    world = 3
    run_distributed(_count_collectives, world, str(tmp_path))
    for rank in range(world):
        got = json.load(open(tmp_path / f"{rank}.json"))
        for name, one_way in got["expected"].items():
            assert got["calls"][name] == 1, (name, got["calls"])
            both = one_way * (1 if name == "broadcast" else 2)  # a broadcast only sends (root) or receives
            assert got["bytes"][name] == pytest.approx(both), (rank, name)
        assert sum(got["calls"].values()) == 6  # the all_reduce outside counting() is left out
        symmetric = sum(v for k, v in got["expected"].items() if k != "broadcast")
        root = rank == 1  # the broadcast's source sends its 40 bytes; the others receive them
        assert got["sent"] == pytest.approx(symmetric + 40 * root)
        assert got["received"] == pytest.approx(symmetric + 40 * (not root))


@pytest.mark.parametrize("shape", [(64, 64), (96, 32), (32, 128), (40, 100)])
@pytest.mark.parametrize("method", ["standard", "gram"])
def test_flop_counter_agrees_with_the_ns_cost_model(shape, method):
    from step_counters import multiply_adds

    from modeconn.optim.muon import MuonConfig, orthogonalise
    from modeconn.optim.newton_schulz import ns_multiply_adds

    cfg = MuonConfig(ns_method=method)
    counted = multiply_adds(orthogonalise, shape, cfg, torch.float32)
    assert counted == ns_multiply_adds(*shape, cfg.ns_steps, method)
    # and the meta-tensor count is the count of a real run
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as real:
        orthogonalise(torch.randn(shape), cfg, torch.float32)
    assert real.get_total_flops() // 2 == counted


def test_peak_allocation_of_marked_ranges():
    from step_counters import peak_allocation

    mb = 2 ** 20
    keep = torch.empty(mb // 4)  # 1 MB, live before the block: not counted
    with peak_allocation(["phase"]) as peaks:
        a = torch.empty(3 * mb // 4)  # 3 MB held across the phase
        with torch.profiler.record_function("phase"):
            b = torch.empty(2 * mb // 4)
            c = torch.empty(5 * mb // 4)  # phase peak: 2 + 5 MB beyond its start
            del b, c
            d = torch.empty(mb // 4)
        del a, d
    assert peaks["phase"] == 7 * mb
    assert peaks["whole"] == 10 * mb  # 3 before the phase, then 7 more
    del keep
