"""Evaluate paths between checkpoints: validation loss and token error along each path, barriers,
distances, and per-layer singular-value spectra.

    python probe.py --config configs/probe/tiny.yaml
    torchrun --standalone --nproc_per_node 4 probe.py --config configs/probe/tiny.yaml

Paths come from the config: `runs` (every pair of the listed checkpoints, as a straight line,
grouped same-optimizer / cross-optimizer by the optimizer their export records), `paths` (linear,
chain or bezier through given points) and `stars` (a centre to each anchor). See modeconn/paths.py
for the t convention. Work items (path, t) go round-robin to the ranks; each rank streams θ(t)
into its one resident model (modeconn/stream.py) and evaluates it on the fixed validation
windows; rank 0 appends the rows of each round to out_dir/results.jsonl. Run again, finished
points are skipped. At the end rank 0 writes summary.csv (barriers, distances per path),
spectra_distances.csv and plots/.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path as FilePath
from typing import Optional

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from modeconn import config as config_lib
from modeconn.atomic import atomic_write_text
from modeconn.barrier import barriers
from modeconn.config import DataConfig
from modeconn.data.loader import TokenWindows, ValidationSet
from modeconn.distributed import World, barrier, init_distributed, shutdown, strip_launcher_args
from modeconn.errors import ConfigError, ModeconnError
from modeconn.metrics import evaluate_lm
from modeconn.model import GPT
from modeconn.paths import Path, PathKind, path_slug, star, t_grid
from modeconn.spectra import singular_values, spectrum_distance, summarize
from modeconn.stream import WeightSource, check_compatible, combine, load_point


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
    t_step: float = 0.1  # the t grid 0, t_step, ..., 1
    t_values: Optional[list[float]] = None  # or these t (must include 0 and 1 for barriers)
    data: DataConfig = field(default_factory=DataConfig)
    spectra: SpectraConfig = field(default_factory=SpectraConfig)
    plots: bool = True
    out_dir: str = "out/probe"


@dataclass(frozen=True)
class NamedPath:
    name: str
    group: str
    path: Path


def _optimizer_of(checkpoint: str) -> str:
    meta = FilePath(checkpoint) / "modeconn_meta.json"
    return json.loads(meta.read_text()).get("optimizer", "unknown") if meta.is_file() else "unknown"


def expand_paths(cfg: ProbeConfig) -> list[NamedPath]:
    out = []
    for (a, pa), (b, pb) in itertools.combinations(cfg.runs.items(), 2):
        same = _optimizer_of(pa) == _optimizer_of(pb)
        out.append(NamedPath(f"{a}--{b}", "same-optimizer" if same else "cross-optimizer", Path("linear", (pa, pb))))
    for spec in cfg.paths:
        out.append(NamedPath(spec.name or "--".join(FilePath(p).name for p in spec.points), spec.group,
                             Path(spec.kind, tuple(spec.points))))
    for spec in cfg.stars:
        for i, path in enumerate(star(spec.centre, spec.anchors)):
            out.append(NamedPath(f"{spec.name or 'star'}/{i}:{FilePath(path.points[1]).name}", spec.group, path))
    names = [p.name for p in out]
    if not out:
        raise ConfigError("nothing to probe: give runs (every pair), paths or stars")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"path names must be unique; repeated: {', '.join(duplicates)}")
    return out


def _read_rows(results: FilePath) -> list[dict]:
    """The complete rows of results.jsonl (a line cut short by a kill is dropped)."""
    rows = []
    if results.is_file():
        for line in results.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return rows


class Prober:
    def __init__(self, cfg: ProbeConfig, world: World):
        self.cfg, self.world, self.out = cfg, world, FilePath(cfg.out_dir)
        self.paths = expand_paths(cfg)
        self.ts = sorted({float(t) for t in cfg.t_values}) if cfg.t_values else t_grid(cfg.t_step)
        if not 0.0 <= self.ts[0] <= self.ts[-1] <= 1.0:
            raise ConfigError(f"t_values must lie in [0, 1] (got {cfg.t_values})")
        points = list(dict.fromkeys(p for named in self.paths for p in named.path.points))
        self.sources = {p: WeightSource(FilePath(p)) for p in points}  # opened, checked: before any evaluation
        self.model_cfg = check_compatible(list(self.sources.values()))
        self.model = GPT(self.model_cfg).to(world.device).eval()
        val = ValidationSet(TokenWindows(FilePath(cfg.data.dir), "val", self.model_cfg.block_size),
                            cfg.data.val_windows or None)
        self.val_batches = [(x.to(world.device), y.to(world.device)) for x, y in val.batches(cfg.data.eval_batch_size)]
        self.n_windows = len(val)

    # --- one point ---------------------------------------------------------------------------------

    def evaluate_point(self, item: NamedPath, t: float) -> dict:
        start = time.perf_counter()
        sources = [self.sources[p] for p in item.path.points]
        load_point(self.model, sources, item.path.coefficients(t))
        metrics = evaluate_lm(lambda x: self.model(x)[0], self.val_batches)
        row = {"path": item.name, "group": item.group, "kind": item.path.kind, "points": list(item.path.points),
               "t": t, "loss": metrics["loss"], "token_error": metrics["token_error"], "tokens": metrics["tokens"]}
        if self.cfg.spectra.enabled:
            spectra = singular_values(self.model, self.cfg.spectra.embeddings)
            row["spectra"] = {name: summarize(s) for name, s in spectra.items()}
            if self.cfg.spectra.save_singular_values:
                target = self.out / "spectra" / path_slug(item.name) / f"t_{t:.4f}.safetensors"
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_suffix(f".tmp{self.world.rank}")
                save_file({k: v.contiguous() for k, v in spectra.items()}, str(tmp))
                os.replace(tmp, target)
        row["seconds"] = time.perf_counter() - start
        return row

    # --- the batch -----------------------------------------------------------------------------------

    def run(self) -> dict:
        results = self.out / "results.jsonl"
        self._check_or_save_config()
        barrier()
        rows = _read_rows(results)
        done = {(r["path"], r["t"]) for r in rows}
        todo = [(p, t) for p in self.paths for t in self.ts if (p.name, t) not in done]
        if self.world.is_main:
            atomic_write_text(results, "".join(json.dumps(r) + "\n" for r in rows))  # drops a cut-off line
            print(f"probe: {len(self.paths)} paths x {len(self.ts)} points; {len(done)} done before, "
                  f"{len(todo)} to go, on {self.world.world_size} rank(s); model {self.model_cfg.n_layer} layers, "
                  f"d={self.model_cfg.n_embd}; {self.n_windows} validation windows", flush=True)
        progress = self._progress(len(todo))
        for start in range(0, len(todo), self.world.world_size):
            mine = start + self.world.rank
            row = self.evaluate_point(*todo[mine]) if mine < len(todo) else None
            gathered = [None] * self.world.world_size
            if self.world.world_size > 1:
                dist.all_gather_object(gathered, row)
            else:
                gathered = [row]
            new = [r for r in gathered if r is not None]
            if self.world.is_main:
                with open(results, "a") as f:
                    f.write("".join(json.dumps(r) + "\n" for r in new))
                    f.flush()
                    os.fsync(f.fileno())
                progress.update(len(new))
        progress.close()
        barrier()
        summary = self.summarize() if self.world.is_main else {}
        barrier()
        return summary

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

            saved = yaml.safe_load(path.read_text()) or {}
            for key in ("data", "spectra"):
                if saved.get(key) != current.get(key):
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
        by_path = {p.name: sorted((r for r in rows if r["path"] == p.name), key=lambda r: r["t"]) for p in self.paths}
        table = []
        for item in self.paths:
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

            plot_all(self.out, self.paths, by_path, table, self.cfg.spectra)
        for e in table:
            if "loss_barrier" in e:
                print(f"{e['group']:>16} | {e['path']}: loss barrier {e['loss_barrier']:.4f} at t={e['loss_barrier_t']:g}"
                      f" | error barrier {e['token_error_barrier']:.4f} | distance {e['endpoint_distance']:.2f}, "
                      f"length {e['path_length']:.2f}", flush=True)
        print(f"wrote {self.out}/results.jsonl, summary.csv" + (", plots/" if self.cfg.plots else ""), flush=True)
        return {"paths": table}

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
        return Prober(cfg, world).run()
    finally:
        shutdown()


def main(argv=None) -> None:
    run(config_lib.from_cli(ProbeConfig, strip_launcher_args(list(sys.argv[1:] if argv is None else argv)), __doc__))
