"""Measuring points of a probe batch: the checkpoints (memory-mapped, checked once), the one
resident model each point is streamed into, the validation batches, and the distances between
points. Nothing here plans, shards or writes files.

A point is measured in parts (validation batches, matrices), so that one rank can do all of them
or every rank a share; the rows are assembled from the parts in one fixed order, and are bitwise
the same however the parts were spread.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from modeconn.data.loader import TokenWindows, ValidationSet
from modeconn.distributed import World
from modeconn.metrics import add_sums, batch_sums, means
from modeconn.model import GPT
from modeconn.probe_plan import Measurement, NamedPath, WorkItem
from modeconn.spectra import singular_values_of, summarize, weight_matrices
from modeconn.stream import WeightSource, check_compatible, combine, load_point


class PointEvaluator:
    def __init__(self, cfg, world: World, points: list[str]):
        """`points`: every checkpoint the batch's paths go through (opened and checked here, before
        anything is evaluated)."""
        self.cfg, self.world = cfg, world
        self.sources = {p: WeightSource(Path(p)) for p in points}
        self.model_cfg = check_compatible(list(self.sources.values()))
        self.model = GPT(self.model_cfg).to(world.device).eval()
        val = ValidationSet(TokenWindows(Path(cfg.data.dir), "val", self.model_cfg.block_size),
                            cfg.data.val_windows or None)
        self.val_batches = [(x.to(world.device), y.to(world.device)) for x, y in val.batches(cfg.data.eval_batch_size)]
        self.n_windows = len(val)
        self._segment_lengths: dict[tuple[str, str], float] = {}  # ‖θ_{i+1} − θ_i‖ of straight segments

    @torch.no_grad()
    def measure(self, m: Measurement, share: int = 0, shares: int = 1) -> dict:
        """Build the point; measure every `shares`-th batch and matrix, from `share` on."""
        start = time.perf_counter()
        self._release_all_but(m.points)
        load_point(self.model, [self.sources[p] for p in m.points], list(m.coefficients))
        batches = {i: batch_sums(self.model(x)[0], y) for i, (x, y) in enumerate(self.val_batches)
                   if i % shares == share}
        spectra = {}
        if self.cfg.spectra.enabled and m.spectra:
            matrices = weight_matrices(self.model, self.cfg.spectra.embeddings)
            spectra = singular_values_of([w for i, w in enumerate(matrices.values()) if i % shares == share])
            spectra = dict(zip([n for i, n in enumerate(matrices) if i % shares == share], spectra))
        return {"batches": batches, "spectra": spectra, "seconds": time.perf_counter() - start}

    def _release_all_but(self, points) -> None:
        """Unmap the checkpoints this point does not use: resident memory stays that of the few a
        point combines, however many the batch holds."""
        for path, source in self.sources.items():
            if path not in points:
                source.release()

    def assemble(self, m: Measurement, items: list[WorkItem], parts: list[dict]) -> tuple[list[dict], dict]:
        """The rows of `items` (all at measurement `m`) from the parts of its measurement, and the
        point's singular values by matrix ({} without spectra)."""
        batches = {i: sums for part in parts for i, sums in part["batches"].items()}
        values = means(*add_sums(batches[i] for i in range(len(self.val_batches))))  # in batch order, as one process
        if m.checkpoint is not None:
            values["checkpoint"] = m.checkpoint  # the checkpoint's own row, shared by every path it ends
        spectra = {name: s for part in parts for name, s in part["spectra"].items()}
        summaries = {}
        if spectra:
            spectra = {name: spectra[name] for name in weight_matrices(self.model, self.cfg.spectra.embeddings)}
            summaries = {name: summarize(s) for name, s in spectra.items()}
        seconds = max(part["seconds"] for part in parts)
        rows = []
        for item in items:
            row = {"path": item.named.name, "group": item.named.group, "kind": item.named.path.kind,
                   "points": list(item.named.path.points), **item.coordinates(), **values}
            if summaries and not item.named.is_plane:
                row["spectra"] = summaries
            rows.append({**row, "seconds": seconds})
        return rows, spectra

    def distance(self, item: NamedPath, t0: float, t1: float) -> float:
        """‖θ(t1) − θ(t0)‖ over all weights. Two points on one straight segment (of a linear path or a
        chain) are |Δ| times the segment's length, streamed once per segment; other pairs of points are
        streamed tensor by tensor."""
        a, b = item.path.coefficients(t0), item.path.coefficients(t1)
        if item.path.kind in ("linear", "chain") and a[0][0] == b[0][0]:  # [(i, 1 − s), (i + 1, s)]: one segment
            i = a[0][0]
            key = (item.path.points[i], item.path.points[i + 1])
            if key not in self._segment_lengths:
                self._segment_lengths[key] = self._streamed_norm(item.path.points, [(i, -1.0), (i + 1, 1.0)])
            return abs(b[1][1] - a[1][1]) * self._segment_lengths[key]
        a, b = dict(a), dict(b)
        return self._streamed_norm(item.path.points, [(i, b.get(i, 0.0) - a.get(i, 0.0)) for i in sorted(set(a) | set(b))])

    def _streamed_norm(self, points, coefficients) -> float:
        """‖Σ c_i θ_i‖ over all weights, one tensor at a time (float64 sums)."""
        self._release_all_but(points)
        sources = [self.sources[p] for p in points]
        total = 0.0
        for name in self.sources[points[0]].shapes:
            total += combine(sources, coefficients, name).double().square().sum().item()
        return math.sqrt(total)
