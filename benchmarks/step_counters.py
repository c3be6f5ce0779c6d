"""Deterministic figures of a distributed training step, which a shared machine's noise cannot blur:
bytes moved by torch.distributed's collectives, multiply-adds of chosen functions, and the peak of
memory allocated beyond the start of a window. Instruments for the benchmarks, not for training.

Bytes are counted per rank at the collective's call, as the traffic of the bandwidth-optimal
algorithms (the volumes behind NCCL's "bus bandwidth"): with W ranks and a full tensor of n bytes,
an all-reduce sends and receives 2(W-1)/W n, a reduce-scatter or an all-gather (W-1)/W n, and an
all-to-all exactly the bytes it addresses to, and receives from, the other ranks. A broadcast is n
sent by its source and n received by each other rank; a reduce the reverse.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import threading
from collections import defaultdict
from typing import Callable

import torch
import torch.distributed as dist


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _to_others(t: torch.Tensor, splits, rank: int, world: int) -> int:
    """Bytes of `t` (split along dim 0 by `splits`, equal parts if none) outside this rank's part."""
    rows = list(splits) if splits else [t.shape[0] // world] * world
    row_bytes = _nbytes(t) // t.shape[0] if t.dim() and t.shape[0] else 0
    return (sum(rows) - rows[rank]) * row_bytes


def _volume(name: str, a: dict, rank: int, world: int) -> tuple[float, float]:
    """(sent, received) bytes of one call, for this rank of a group of `world`."""
    ring = (world - 1) / world
    if name == "all_reduce":
        n = 2 * ring * _nbytes(a["tensor"])
        return n, n
    if name == "all_reduce_coalesced":
        n = 2 * ring * sum(_nbytes(t) for t in a["tensors"])
        return n, n
    if name in ("reduce_scatter_tensor", "reduce_scatter_single", "_reduce_scatter_base", "reduce_scatter"):
        n = (world - 1) * _nbytes(a["output"])
        return n, n
    if name in ("all_gather_into_tensor", "all_gather_single", "_all_gather_base"):
        n = (world - 1) * _nbytes(a["input_tensor"])
        return n, n
    if name == "all_gather":
        n = (world - 1) * _nbytes(a["tensor"])
        return n, n
    if name == "all_gather_coalesced":
        n = (world - 1) * sum(_nbytes(t) for t in a["input_tensor_list"])
        return n, n
    if name == "all_to_all_single":
        return (_to_others(a["input"], a["input_split_sizes"], rank, world),
                _to_others(a["output"], a["output_split_sizes"], rank, world))
    if name == "all_to_all":
        return (sum(_nbytes(t) for j, t in enumerate(a["input_tensor_list"]) if j != rank),
                sum(_nbytes(t) for j, t in enumerate(a["output_tensor_list"]) if j != rank))
    if name in ("broadcast", "reduce"):  # the root sends a broadcast, and receives a reduce
        n, at_root = _nbytes(a["tensor"]), dist.get_rank() == a["src" if name == "broadcast" else "dst"]
        return (n, 0.0) if at_root == (name == "broadcast") else (0.0, n)
    raise KeyError(name)


COLLECTIVES = ("all_reduce", "all_reduce_coalesced", "reduce_scatter_tensor", "reduce_scatter_single",
               "_reduce_scatter_base", "reduce_scatter", "all_gather_into_tensor", "all_gather_single", "_all_gather_base",
               "all_gather", "all_gather_coalesced", "all_to_all_single", "all_to_all", "broadcast", "reduce")


class CollectiveCounter:
    """Wraps torch.distributed's collectives (in torch.distributed and distributed_c10d, where
    libraries look them up) so that, while `counting()`, each call adds its bytes. Install it before
    a library binds them (DeepSpeed does when its communication backend is created). A collective
    that calls another (a deprecated name calling its successor) is counted once, as the outer one."""

    def __init__(self):
        self.sent = 0.0
        self.received = 0.0
        self.calls: dict[str, int] = defaultdict(int)
        self.bytes_by_call: dict[str, float] = defaultdict(float)
        self._active = False
        self._inside = threading.local()

    def install(self) -> "CollectiveCounter":
        for name in COLLECTIVES:
            original = getattr(dist, name, None)
            if original is None:
                continue
            wrapped = self._wrap(name, original)
            setattr(dist, name, wrapped)
            if getattr(dist.distributed_c10d, name, None) is original:
                setattr(dist.distributed_c10d, name, wrapped)
        return self

    def _wrap(self, name: str, original: Callable) -> Callable:
        signature = inspect.signature(original)

        @functools.wraps(original)
        def counted(*args, **kwargs):
            if not self._active or getattr(self._inside, "depth", 0):
                return original(*args, **kwargs)
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            group = bound.arguments.get("group")
            sent, received = _volume(name, bound.arguments, dist.get_rank(group), dist.get_world_size(group))
            self.sent += sent
            self.received += received
            self.calls[name] += 1
            self.bytes_by_call[name] += sent + received
            self._inside.depth = 1
            try:
                return original(*args, **kwargs)
            finally:
                self._inside.depth = 0

        return counted

    @contextlib.contextmanager
    def counting(self):
        self._active = True
        try:
            yield self
        finally:
            self._active = False

    def reset(self) -> None:
        self.sent = self.received = 0.0
        self.calls.clear()
        self.bytes_by_call.clear()


class CallLog:
    """Records the shape of the first argument of chosen functions while `recording()`: which
    matrices a rank hands to its Newton–Schulz, say. `wrap(module, name)` replaces the module's
    attribute (the original stays reachable as its `__wrapped__`), so callers that look the
    function up there at call time go through it."""

    def __init__(self):
        self.calls: list[tuple[str, tuple[int, ...]]] = []
        self._active = False

    def wrap(self, module, name: str) -> None:
        original = getattr(module, name)
        key = f"{module.__name__}.{name}"

        @functools.wraps(original)
        def logged(x, *args, **kwargs):
            if self._active:
                self.calls.append((key, tuple(x.shape)))
            return original(x, *args, **kwargs)

        setattr(module, name, logged)

    def reset(self) -> None:
        self.calls.clear()

    @contextlib.contextmanager
    def recording(self):
        self._active = True
        try:
            yield self
        finally:
            self._active = False


def multiply_adds(fn: Callable, shape: tuple[int, ...], *args, **kwargs) -> int:
    """Multiply-adds of the matrix products `fn(x, *args)` performs on an x of `shape`, counted by
    torch's FlopCounterMode (2 flops per multiply-add) on meta tensors: nothing is computed."""
    from torch.utils.flop_counter import FlopCounterMode

    # the eager function behind a torch.compile'd one, and behind wrappers such as CallLog's
    fn = inspect.unwrap(getattr(fn, "_torchdynamo_orig_callable", fn))
    with FlopCounterMode(display=False) as counter:
        fn(torch.empty(shape, device="meta"), *args, **kwargs)
    return counter.get_total_flops() // 2


@contextlib.contextmanager
def peak_allocation(marks: list[str]):
    """Profiles CPU allocations in the block; yields a dict filled on exit with, for each
    `torch.profiler.record_function(mark)` range opened in the block, the peak bytes allocated
    during it beyond those live at its start (and, under "whole", for the block)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    peaks: dict[str, int] = {}
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        yield peaks

    def walk(nodes):
        for node in nodes:
            yield node
            yield from walk(node.children)

    events = list(walk(prof.profiler.kineto_results.experimental_event_tree()))
    allocations = sorted(((e.start_time_ns, e.extra_fields.total_allocated) for e in events
                          if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu"))
    windows = {"whole": (float("-inf"), float("inf"))}
    windows.update({e.name: (e.start_time_ns, e.end_time_ns) for e in events
                    if e.tag == _EventType.TorchOp and e.name in marks})
    for mark, (start, end) in windows.items():
        before = [total for t, total in allocations if t < start]
        base = before[-1] if before else 0
        peaks[mark] = max([total for t, total in allocations if start <= t <= end] + [base]) - base
