"""Evaluate paths between checkpoints: validation loss and token error along each path, barriers,
distances, and per-layer singular-value spectra.

    python probe.py --config configs/probe/tiny.yaml
    torchrun --standalone --nproc_per_node 4 probe.py --config configs/probe/tiny.yaml

Paths come from the config: `runs` (every pair of the listed checkpoints, as a straight line,
grouped same-optimizer / cross-optimizer by the optimizer their export records), `paths` (linear,
chain or bezier through given points), `stars` (a centre to each anchor) and `planes` (a grid of
(α, β) on the plane through three checkpoints; loss and error only). See modeconn/paths.py for the
t convention. Each rank streams a point into its one resident model (modeconn/stream.py) and
evaluates it on the fixed validation windows. Work is shared (`shard`) by points, one per rank
and round ("items"), or by validation batches and matrices, every rank on the same point
("batches": for a large model or a few points); "auto" takes points while there are enough for
every rank and batches for the rest. Rows are bitwise the same either way. Rank 0 appends the rows
of each round to out_dir/results.jsonl; run again, finished points are skipped. At the end rank 0
writes summary.csv (barriers, distances per path), spectra_distances.csv and plots/; `save_points`
also writes θ(t) as checkpoints, and `wandb` logs rows, summary and plots.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path as FilePath
from typing import Literal, Optional, Union

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from modeconn import config as config_lib
from modeconn.align import AlignConfig, align_checkpoints
from modeconn.atomic import atomic_write_text, clean_leftovers, temporary_path
from modeconn.barrier import barriers
from modeconn.config import DataConfig
from modeconn.data.loader import TokenWindows, ValidationSet
from modeconn.distributed import World, barrier, held_by_rank0, init_distributed, shutdown, strip_launcher_args
from modeconn.errors import ConfigError, ModeconnError
from modeconn.hf import read_meta
from modeconn.lock import lock_for_directory
from modeconn.logger import WandbConfig, start_wandb
from modeconn.metrics import batch_sums
from modeconn.model import GPT
from modeconn.paths import Path, PathKind, Plane, axis_grid, path_slug, star, t_grid
from modeconn.spectra import spectrum_distance, summarize, svdvals, weight_matrices
from modeconn.stream import WeightSource, check_compatible, combine, load_point, write_point


@dataclass
class PathSpec:
    name: str = ""
    kind: PathKind = "linear"
    points: list[str] = field(default_factory=list)  # checkpoints: (A, B), (A, bends..., B) or (A, control, B)
    group: str = "paths"


@dataclass
class StarSpec:
    name: str = ""
    centre: str = ""
    anchors: list[str] = field(default_factory=list)
    group: str = "star"


@dataclass
class PlaneSpec:
    name: str = ""
    points: list[str] = field(default_factory=list)  # checkpoints A, B, C: at (0, 0), (1, 0), (0, 1)
    range: list[float] = field(default_factory=lambda: [-0.25, 1.25])  # α and β from, to
    resolution: int = 7  # grid points per axis
    group: str = "plane"


@dataclass
class SpectraConfig:
    enabled: bool = True
    embeddings: bool = False  # also the token and position embeddings
    save_singular_values: bool = True  # out_dir/spectra/<path>/t_<t>.safetensors
    histogram_at: list[float] = field(default_factory=lambda: [0.0, 0.5, 1.0])  # t of the histogram plots


@dataclass
class ProbeConfig:
    runs: dict = field(default_factory=dict)  # {label: checkpoint}: every pair as a linear path
    paths: list[PathSpec] = field(default_factory=list)
    stars: list[StarSpec] = field(default_factory=list)
    planes: list[PlaneSpec] = field(default_factory=list)
    t_step: float = 0.1  # the t grid 0, t_step, ..., 1
    t_values: Optional[list[float]] = None  # or these t (must include 0 and 1 for barriers)
    data: DataConfig = field(default_factory=DataConfig)
    spectra: SpectraConfig = field(default_factory=SpectraConfig)
    align: Optional[AlignConfig] = None  # given: each `runs` pair is also probed with B aligned to A (align.py)
    save_points: list[float] = field(default_factory=list)  # write θ(t) of every path at these t (out_dir/points/)
    shard: Literal["auto", "items", "batches"] = "auto"
    plots: bool = True
    wandb: WandbConfig = field(default_factory=WandbConfig)
    out_dir: str = "out/probe"


@dataclass(frozen=True)
class NamedPath:
    name: str
    group: str
    path: Union[Path, Plane]


@dataclass(frozen=True)
class WorkItem:
    """One point: t on a path, (α, β) on a plane."""
    named: NamedPath
    at: tuple[float, ...]

    @property
    def key(self) -> tuple:
        return (self.named.name, *self.at)

    def coordinates(self) -> dict:
        return {"t": self.at[0]} if len(self.at) == 1 else {"alpha": self.at[0], "beta": self.at[1]}


def _row_key(row: dict) -> tuple:
    return (row["path"], row["t"]) if "t" in row else (row["path"], row["alpha"], row["beta"])


def _optimizer_of(checkpoint: str) -> str:
    return read_meta(FilePath(checkpoint)).get("optimizer", "unknown")


def _label(checkpoint: str) -> str:
    """A checkpoint's short name in path names: its directory, or the run's for a run's `final`."""
    path = FilePath(checkpoint)
    return path.parent.name if path.name == "final" and path.parent.name else path.name


def expand_paths(cfg: ProbeConfig) -> list[NamedPath]:
    out = []
    for (a, pa), (b, pb) in itertools.combinations(cfg.runs.items(), 2):
        group = "same-optimizer" if _optimizer_of(pa) == _optimizer_of(pb) else "cross-optimizer"
        out.append(NamedPath(f"{a}--{b}", group, Path("linear", (pa, pb))))
        if cfg.align is not None:
            a_form, b_aligned = aligned_pair(cfg, a, b)
            out.append(NamedPath(f"{a}--{b}:aligned", f"{group}, aligned",
                                 Path("linear", (str(a_form) if cfg.align.residual else pa, str(b_aligned)))))
    for spec in cfg.paths:
        out.append(NamedPath(spec.name or "--".join(map(_label, spec.points)), spec.group,
                             Path(spec.kind, tuple(spec.points))))
    for spec in cfg.stars:
        for i, path in enumerate(star(spec.centre, spec.anchors)):
            out.append(NamedPath(f"{spec.name or 'star'}/{i}:{_label(path.points[1])}", spec.group, path))
    for spec in cfg.planes:
        out.append(NamedPath(spec.name or "plane:" + "--".join(map(_label, spec.points)), spec.group,
                             Plane(tuple(spec.points))))
    names = [p.name for p in out]
    if not out:
        raise ConfigError("nothing to probe: give runs (every pair), paths, stars or planes")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"path names must be unique; repeated: {', '.join(duplicates)}")
    return out


def aligned_pair(cfg: ProbeConfig, a: str, b: str) -> tuple[FilePath, FilePath]:
    """Where the pair (a, b) of `runs` is kept aligned: A in canonical form (with align.residual), B aligned to A."""
    folder = FilePath(cfg.out_dir) / "aligned" / f"{a}--{b}"
    return folder / a, folder / b


def _read_rows(results: FilePath) -> list[dict]:
    """The complete rows of results.jsonl (a line cut short by a kill is dropped)."""
    rows = []
    if results.is_file():
        for line in results.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and "path" in row and ("t" in row or "alpha" in row):
                rows.append(row)
    return rows


class Prober:
    def __init__(self, cfg: ProbeConfig, world: World):
        self.cfg, self.world, self.out = cfg, world, FilePath(cfg.out_dir)
        if world.is_main:  # what a killed batch left half-written (we hold out_dir's lock)
            for line in clean_leftovers(self.out):
                print(f"probe: {line}", flush=True)
        barrier()
        self.paths = expand_paths(cfg)
        self.ts = sorted({float(t) for t in cfg.t_values}) if cfg.t_values else t_grid(cfg.t_step)
        for what, values in (("t_values", self.ts), ("save_points", cfg.save_points)):
            if values and not 0.0 <= min(values) <= max(values) <= 1.0:
                raise ConfigError(f"{what} must lie in [0, 1] (got {values})")
        self.items = [WorkItem(p, (t,)) for p in self.paths if p.path.kind != "plane" for t in self.ts]
        for spec, named in zip(cfg.planes, [p for p in self.paths if p.path.kind == "plane"]):
            grid = axis_grid(spec.range[0], spec.range[-1], spec.resolution)
            self.items += [WorkItem(named, (a, b)) for b in grid for a in grid]
        self._write_alignments()
        points = list(dict.fromkeys(p for named in self.paths for p in named.path.points))
        self.sources = {p: WeightSource(FilePath(p)) for p in points}  # opened, checked: before any evaluation
        self.model_cfg = check_compatible(list(self.sources.values()))
        self.model = GPT(self.model_cfg).to(world.device).eval()
        val = ValidationSet(TokenWindows(FilePath(cfg.data.dir), "val", self.model_cfg.block_size),
                            cfg.data.val_windows or None)
        self.val_batches = [(x.to(world.device), y.to(world.device)) for x, y in val.batches(cfg.data.eval_batch_size)]
        self.n_windows = len(val)
        self.wandb = None

    def _write_alignments(self) -> None:
        """B aligned to A for every `runs` pair (once: kept in out_dir/aligned/), spread over the ranks."""
        if self.cfg.align is None:
            return
        residual = self.cfg.align.residual
        pairs = [(a, b) for a, b in itertools.combinations(self.cfg.runs, 2)
                 if not all(p.exists() for p in aligned_pair(self.cfg, a, b)[0 if residual else 1:])]
        for a, b in pairs[self.world.rank::self.world.world_size]:
            a_form, b_aligned = aligned_pair(self.cfg, a, b)
            shutil.rmtree(a_form.parent, ignore_errors=True)  # a pair cut off half-written: derived, redone
            report = align_checkpoints(FilePath(self.cfg.runs[a]), FilePath(self.cfg.runs[b]), b_aligned, self.cfg.align,
                                       a_form if self.cfg.align.residual else None, self.cfg.data)
            print(f"probe: aligned {b} to {a} in {report['seconds']:.1f} s, similarity "
                  f"{report['similarity_before']:.4g} -> {report['similarity_after']:.4g}", flush=True)
        barrier()

    # --- one point ---------------------------------------------------------------------------------
    # A point is measured in parts (validation batches, matrices), so that one rank can do all of
    # them or every rank a share; the row is assembled from the parts in one fixed order, and is
    # bitwise the same however the parts were spread.

    @torch.no_grad()
    def measure(self, item: WorkItem, share: int = 0, shares: int = 1) -> dict:
        """Build the point; measure every `shares`-th batch and matrix, from `share` on."""
        start = time.perf_counter()
        sources = [self.sources[p] for p in item.named.path.points]
        load_point(self.model, sources, item.named.path.coefficients(*item.at))
        batches = {i: batch_sums(self.model(x)[0], y) for i, (x, y) in enumerate(self.val_batches)
                   if i % shares == share}
        spectra = {}
        if self.cfg.spectra.enabled and item.named.path.kind != "plane":
            matrices = weight_matrices(self.model, self.cfg.spectra.embeddings)
            spectra = {name: svdvals(w) for i, (name, w) in enumerate(matrices.items()) if i % shares == share}
        return {"batches": batches, "spectra": spectra, "seconds": time.perf_counter() - start}

    def assemble(self, item: WorkItem, parts: list[dict]) -> dict:
        batches = {i: sums for part in parts for i, sums in part["batches"].items()}
        loss_sum, errors, tokens = 0.0, 0, 0
        for i in range(len(self.val_batches)):  # in batch order, as one process sums them
            loss_sum, errors, tokens = loss_sum + batches[i][0], errors + batches[i][1], tokens + batches[i][2]
        row = {"path": item.named.name, "group": item.named.group, "kind": item.named.path.kind,
               "points": list(item.named.path.points), **item.coordinates(),
               "loss": loss_sum / tokens, "token_error": errors / tokens, "tokens": tokens}
        spectra = {name: s for part in parts for name, s in part["spectra"].items()}
        if spectra:
            order = weight_matrices(self.model, self.cfg.spectra.embeddings)
            spectra = {name: spectra[name] for name in order}
            row["spectra"] = {name: summarize(s) for name, s in spectra.items()}
            if self.cfg.spectra.save_singular_values:
                target = self.out / "spectra" / path_slug(item.named.name) / f"t_{item.at[0]:.4f}.safetensors"
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = temporary_path(target)
                save_file({k: v.contiguous() for k, v in spectra.items()}, str(tmp))
                os.replace(tmp, target)
        row["seconds"] = max(part["seconds"] for part in parts)
        return row

    def evaluate_point(self, item: WorkItem) -> dict:
        """The whole point on this rank."""
        return self.assemble(item, [self.measure(item)])

    # --- the batch -----------------------------------------------------------------------------------

    def run(self) -> dict:
        results = self.out / "results.jsonl"
        self._check_or_save_config()
        barrier()
        rows = _read_rows(results)
        done = {_row_key(r) for r in rows}
        todo = [item for item in self.items if item.key not in done]
        if self.world.is_main:
            atomic_write_text(results, "".join(json.dumps(r) + "\n" for r in rows))  # drops a cut-off line
            print(f"probe: {len(self.paths)} paths/planes, {len(self.items)} points; {len(done)} done before, "
                  f"{len(todo)} to go, on {self.world.world_size} rank(s) (shard: {self.cfg.shard}); model "
                  f"{self.model_cfg.n_layer} layers, d={self.model_cfg.n_embd}; {self.n_windows} validation windows",
                  flush=True)
            self.wandb = start_wandb(self.out, self.cfg.wandb, config_lib.to_dict(self.cfg))
        self._save_points()
        progress = self._progress(len(todo))
        position, size = 0, self.world.world_size
        while position < len(todo):
            together = self.cfg.shard == "batches" or (self.cfg.shard == "auto" and len(todo) - position < size)
            if together:  # every rank on the same point, a share of its batches and matrices each
                item = todo[position]
                parts = self._gather(self.measure(item, self.world.rank, size))
                new = [self.assemble(item, parts)] if self.world.is_main else []
                position += 1
            else:  # one point per rank
                mine = position + self.world.rank
                new = [r for r in self._gather(self.evaluate_point(todo[mine]) if mine < len(todo) else None) if r]
                position += size
            if self.world.is_main:
                self._append(results, new)
                progress.update(len(new))
        progress.close()
        barrier()
        summary = self.summarize() if self.world.is_main else {}
        if self.wandb is not None:
            self.wandb.finish()
        barrier()
        return summary

    def _gather(self, obj) -> list:
        if self.world.world_size == 1:
            return [obj]
        gathered = [None] * self.world.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def _append(self, results: FilePath, new: list[dict]) -> None:
        with open(results, "a") as f:
            f.write("".join(json.dumps(r) + "\n" for r in new))
            f.flush()
            os.fsync(f.fileno())
        if self.wandb is not None:
            for r in (r for r in new if "t" in r):  # each path against its own t axis
                self.wandb.define_metric(f"{r['path']}/*", step_metric=f"{r['path']}/t")
                self.wandb.log({f"{r['path']}/{k}": r[k] for k in ("t", "loss", "token_error")})

    def _save_points(self) -> None:
        """θ(t) at the `save_points` t of every path, as checkpoint directories under out_dir/points/
        (streamed, one tensor at a time; points already there are kept)."""
        targets = [(named, t, self.out / "points" / path_slug(named.name) / f"t_{t:.4f}")
                   for named in self.paths if named.path.kind != "plane" for t in self.cfg.save_points]
        missing = [target for target in targets if not target[2].exists()]
        for named, t, target in missing[self.world.rank::self.world.world_size]:
            coefficients = named.path.coefficients(t)
            write_point([self.sources[p] for p in named.path.points], coefficients, target,
                        {"probe_path": named.name, "kind": named.path.kind, "t": t,
                         "points": list(named.path.points), "coefficients": coefficients})
        if missing and self.world.is_main:
            print(f"probe: wrote {len(missing)} path point(s) to {self.out / 'points'}", flush=True)
        barrier()

    def _progress(self, total: int):
        from tqdm import tqdm

        return tqdm(total=total, desc="probe points", unit="pt", disable=not self.world.is_main, dynamic_ncols=True)

    def _check_or_save_config(self) -> None:
        """A batch resumed with other data or spectra settings would mix incomparable rows: refused
        (every rank checks, so all of them stop); rank 0 saves the config."""
        path = self.out / "probe_config.yaml"
        current = config_lib.to_dict(self.cfg)
        if path.is_file():
            import yaml

            try:
                saved = yaml.safe_load(path.read_text()) or {}
            except yaml.YAMLError as e:
                raise ModeconnError(f"{path}: not valid YAML ({str(e).splitlines()[0]}); it records this batch's "
                                    f"settings: restore it, or use another out_dir") from None
            if not isinstance(saved, dict):
                raise ModeconnError(f"{path}: not a probe config; restore it, or use another out_dir")
            for key in ("data", "spectra", "align"):
                if saved.get(key) != current.get(key) and (key != "align" or saved.get(key) is not None):
                    raise ModeconnError(f"{path}: this batch was run with other {key} settings ({saved.get(key)}); "
                                        f"use another out_dir to probe with {current.get(key)}")
        barrier()
        if self.world.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            config_lib.save(self.cfg, path)

    # --- summaries and plots ----------------------------------------------------------------------------

    def distance(self, item: NamedPath, t0: float, t1: float) -> float:
        """‖θ(t1) − θ(t0)‖ over all weights, streamed tensor by tensor."""
        a, b = dict(item.path.coefficients(t0)), dict(item.path.coefficients(t1))
        diff = [(i, b.get(i, 0.0) - a.get(i, 0.0)) for i in sorted(set(a) | set(b))]
        sources = [self.sources[p] for p in item.path.points]
        total = 0.0
        for name in self.sources[item.path.points[0]].shapes:
            total += combine(sources, diff, name).double().square().sum().item()
        return math.sqrt(total)

    def summarize(self) -> dict:
        rows = _read_rows(self.out / "results.jsonl")
        lines = [p for p in self.paths if p.path.kind != "plane"]
        by_path = {p.name: sorted((r for r in rows if r["path"] == p.name), key=lambda r: r["t"]) for p in lines}
        planes = {p.name: [r for r in rows if r["path"] == p.name] for p in self.paths if p.path.kind == "plane"}
        table = []
        for item in lines:
            points = by_path[item.name]
            ts = [r["t"] for r in points]
            entry = {"path": item.name, "group": item.group, "kind": item.path.kind,
                     "points": " | ".join(item.path.points), "n_points": len(points)}
            if ts and ts[0] == 0.0 and ts[-1] == 1.0:
                for metric in ("loss", "token_error"):
                    b = barriers(ts, [r[metric] for r in points])
                    entry.update({f"{metric}_A": b["endpoints"][0], f"{metric}_B": b["endpoints"][1],
                                  f"{metric}_barrier": b["linear"], f"{metric}_barrier_t": b["linear_t"],
                                  f"{metric}_barrier_normalised": b["linear_normalised"],
                                  f"{metric}_barrier_vs_mean": b["mean"], f"{metric}_barrier_vs_mean_t": b["mean_t"]})
                entry["endpoint_distance"] = self.distance(item, 0.0, 1.0)
                entry["path_length"] = sum(self.distance(item, a, b) for a, b in zip(ts, ts[1:]))
            table.append(entry)
        fields = list(dict.fromkeys(k for e in table for k in e))
        with open(self.out / "summary.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(table)
        self._spectra_distances(by_path)
        if self.cfg.plots:
            from modeconn.probe_plots import plot_all

            plot_all(self.out, lines, by_path, table, self.cfg.spectra, planes)
        if self.wandb is not None:
            self._log_summary(table)
        for e in table:
            if "loss_barrier" in e:
                print(f"{e['group']:>16} | {e['path']}: loss barrier {e['loss_barrier']:.4f} at t={e['loss_barrier_t']:g}"
                      f" | error barrier {e['token_error_barrier']:.4f} | distance {e['endpoint_distance']:.2f}, "
                      f"length {e['path_length']:.2f}", flush=True)
        for name, plane_rows in planes.items():
            if plane_rows:
                at = {(r["alpha"], r["beta"]): r["loss"] for r in plane_rows}
                low = min(plane_rows, key=lambda r: r["loss"])
                corners = ", ".join(f"{label} {at[c]:.4f}" for label, c in (("A", (0.0, 0.0)), ("B", (1.0, 0.0)),
                                                                             ("C", (0.0, 1.0))) if c in at)
                print(f"{'plane':>16} | {name}: loss {corners}; lowest {low['loss']:.4f} at "
                      f"(α, β) = ({low['alpha']:g}, {low['beta']:g})", flush=True)
        print(f"wrote {self.out}/results.jsonl, summary.csv" + (", plots/" if self.cfg.plots else ""), flush=True)
        return {"paths": table}

    def _log_summary(self, table: list[dict]) -> None:
        import wandb

        fields = list(dict.fromkeys(k for e in table for k in e))
        logged = {"summary": wandb.Table(columns=fields, data=[[e.get(k) for k in fields] for e in table])}
        for png in sorted((self.out / "plots").glob("*.png")):
            logged[f"plots/{png.stem}"] = wandb.Image(str(png))
        self.wandb.log(logged)

    def _spectra_distances(self, by_path: dict) -> None:
        """Per point and matrix: distance of its spectrum to each endpoint's (from the saved values)."""
        if not (self.cfg.spectra.enabled and self.cfg.spectra.save_singular_values):
            return
        lines = []
        for name, points in by_path.items():
            folder = self.out / "spectra" / path_slug(name)
            ends = [folder / f"t_{t:.4f}.safetensors" for t in (0.0, 1.0)]
            if not all(e.is_file() for e in ends):
                continue
            a, b = (load_file(str(e)) for e in ends)
            for r in points:
                s = load_file(str(folder / f"t_{r['t']:.4f}.safetensors"))
                for matrix, values in s.items():
                    lines.append({"path": name, "t": r["t"], "matrix": matrix,
                                  "to_A": spectrum_distance(values, a[matrix]), "to_B": spectrum_distance(values, b[matrix])})
        with open(self.out / "spectra_distances.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["path", "t", "matrix", "to_A", "to_B"])
            writer.writeheader()
            writer.writerows(lines)


def run(cfg: ProbeConfig) -> dict:
    world = init_distributed()
    try:
        with held_by_rank0(lock_for_directory(FilePath(cfg.out_dir), "probe.py"), world):
            return Prober(cfg, world).run()
    finally:
        shutdown()


def main(argv=None) -> None:
    run(config_lib.from_cli(ProbeConfig, strip_launcher_args(list(sys.argv[1:] if argv is None else argv)), __doc__))
