"""Fixed-length windows over memory-mapped token shards.

A split of a prepared directory is cut into windows of `block_size + 1` tokens (input and
shifted target); window j of a shard starts at token j * block_size, and windows never cross
shards. Training visits the windows of each epoch without replacement in an order drawn from
(`seed`, epoch). The global batch of a step is the next `micro_batch * world_size` windows of
that order; rank r takes its r-th slice. So the state is two numbers (epoch, windows consumed),
the same on every rank and for any world size, and a global batch holds the same windows
whatever the number of ranks, which makes multi-rank runs comparable with one-process runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from modeconn.data.prepare import read_meta
from modeconn.data.shards import open_shard
from modeconn.errors import DataError

Batch = tuple[torch.Tensor, torch.Tensor]


class TokenWindows:
    """Window i of one split of a prepared directory, for a given block size."""

    def __init__(self, data_dir: Path, split: str, block_size: int):
        meta = read_meta(data_dir)
        if split not in meta["splits"]:
            raise DataError(f"{data_dir} has no split {split!r}; splits: {', '.join(meta['splits'])}")
        self.data_dir, self.split, self.block_size = Path(data_dir), split, block_size
        self.shards = [open_shard(Path(data_dir) / s["file"]) for s in meta["splits"][split]["shards"]]
        per_shard = [max(0, (len(s) - 1) // block_size) for s in self.shards]
        self._starts = np.cumsum([0] + per_shard)  # first window index of each shard
        if len(self) == 0:
            raise DataError(f"{data_dir} split {split!r} has {sum(map(len, self.shards))} tokens: fewer than one "
                            f"window of block_size + 1 = {block_size + 1}")

    def __len__(self) -> int:
        return int(self._starts[-1])

    def window(self, i: int) -> np.ndarray:
        s = int(np.searchsorted(self._starts, i, side="right")) - 1
        j = (i - self._starts[s]) * self.block_size
        return self.shards[s][j: j + self.block_size + 1]

    def batch(self, indices) -> Batch:
        rows = torch.from_numpy(np.stack([self.window(int(i)) for i in indices]).astype(np.int64))
        return rows[:, :-1], rows[:, 1:]


class TrainLoader:
    """Epoch-wise shuffled windows, sliced over data-parallel ranks; state restores the position."""

    def __init__(self, windows: TokenWindows, micro_batch: int, seed: int, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.windows, self.micro_batch, self.seed = windows, micro_batch, seed
        self.rank, self.world_size = rank, world_size
        self.global_batch = micro_batch * world_size
        if self.global_batch > len(windows):
            raise DataError(f"{windows.data_dir} split {windows.split!r} has {len(windows)} windows of "
                            f"{windows.block_size + 1} tokens, fewer than one global micro-batch "
                            f"({micro_batch} x {world_size} ranks)")
        self.epoch, self.consumed = 0, 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        return np.random.Generator(np.random.PCG64([self.seed, epoch])).permutation(len(self.windows))

    def next_batch(self) -> Batch:
        if self.consumed + self.global_batch > len(self.windows):  # drop the ragged end of the epoch
            self.epoch, self.consumed = self.epoch + 1, 0
            self._order = self._epoch_order(self.epoch)
        lo = self.consumed + self.rank * self.micro_batch
        self.consumed += self.global_batch
        return self.windows.batch(self._order[lo: lo + self.micro_batch])

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed, "seed": self.seed,
                "block_size": self.windows.block_size, "n_windows": len(self.windows)}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position. The world size and micro-batch may differ from the saver's:
        the next global batch is the next windows of the same order either way."""
        for key, mine in (("seed", self.seed), ("block_size", self.windows.block_size),
                          ("n_windows", len(self.windows))):
            if state[key] != mine:
                raise DataError(f"data loader state has {key}={state[key]}, this loader has {key}={mine}: "
                                f"the data or its settings changed since the state was saved")
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])
        self._order = self._epoch_order(self.epoch)


class ValidationSet:
    """A fixed set of windows, spread evenly over the split: identical at every call."""

    def __init__(self, windows: TokenWindows, n_windows: int | None = None):
        n = len(windows) if n_windows is None else min(n_windows, len(windows))
        self.windows = windows
        self.indices = (np.arange(n) * len(windows)) // n  # evenly spaced, deterministic

    def __len__(self) -> int:
        return len(self.indices)

    def batches(self, batch_size: int, rank: int = 0, world_size: int = 1) -> Iterator[Batch]:
        """This rank's share (every world_size-th window), in batches."""
        mine = self.indices[rank::world_size]
        for i in range(0, len(mine), batch_size):
            yield self.windows.batch(mine[i: i + batch_size])

    def for_rank(self, batch_size: int, rank: int, world_size: int) -> RankValidation:
        """This rank's batches, read once (the windows are fixed), padded to every rank's count."""
        passes = math.ceil(math.ceil(len(self) / world_size) / batch_size)
        return RankValidation(list(self.batches(batch_size, rank, world_size)), passes,
                              self.windows.batch(self.indices[:1]))


@dataclass
class RankValidation:
    """One rank's validation batches. Every rank runs the same number of forward passes (ZeRO-3
    gathers parameters collectively), the ones beyond its own batches on an uncounted `padding`."""
    batches: list[Batch]
    forward_passes: int
    padding: Batch

    def passes(self) -> Iterator[tuple[Batch, bool]]:
        """(batch, counted) for each forward pass this rank runs."""
        for i in range(self.forward_passes):
            yield (self.batches[i], True) if i < len(self.batches) else (self.padding, False)
