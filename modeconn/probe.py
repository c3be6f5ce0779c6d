"""Evaluate paths between checkpoints: validation loss and token error along each path, barriers,
distances, and per-layer singular-value spectra; statistics per group of paths.

    python probe.py --config configs/probe/tiny.yaml
    torchrun --standalone --nproc_per_node 4 probe.py --config configs/probe/tiny.yaml

Paths come from the config (modeconn/probe_plan.py): `runs` with a pairing rule (`pairs: all`,
`within` or `across` groups; a run's group is the optimizer its export records, or the label
given in `groups`), `paths` (linear, chain or bezier through given points), `stars` (a centre to
each anchor) and `planes` (a grid of (α, β) on the plane through three checkpoints; loss and
error only). See modeconn/paths.py for the t convention. A point that is a checkpoint itself is
evaluated once per batch, however many paths it ends. Each rank streams a point into its one
resident model (modeconn/stream.py) and evaluates it on the fixed validation windows. Work is
shared (`shard`) by points, one per rank and round ("items"), or by validation batches and
matrices, every rank on the same point ("batches": for a large model or a few points); "auto"
takes points while there are enough for every rank and batches for the rest. Rows are bitwise
the same either way. Rank 0 appends the rows of each round to out_dir/results.jsonl; run again,
finished points are skipped. At the end rank 0 writes summary.csv (barriers, distances per path),
groups.csv (their statistics per group), spectra_distances.csv and plots/; `save_points` also
writes θ(t) as checkpoints, and `wandb` logs rows, summary and plots.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from safetensors.torch import load_file

from modeconn import config as config_lib
from modeconn.align import AlignConfig, align_checkpoints
from modeconn.atomic import clean_leftovers
from modeconn.config import DataConfig
from modeconn.distributed import (World, all_gather_objects, barrier, held_by_rank0, init_distributed, shutdown,
                                  strip_launcher_args)
from modeconn.errors import ConfigError
from modeconn.lock import lock_for_directory
from modeconn.logger import WandbConfig, start_wandb
from modeconn.paths import t_grid
from modeconn.probe_eval import PointEvaluator
from modeconn.probe_plan import Measurement, PathSpec, PlaneSpec, StarSpec, WorkItem, build_plan, row_key
from modeconn.probe_store import ProbeFiles, ResultsStore
from modeconn.probe_summary import group_lines, group_statistics, path_lines, path_table, plane_lines, write_csv
from modeconn.spectra import spectrum_distance
from modeconn.stream import write_point

@dataclass
class SpectraConfig:
    enabled: bool = True
    embeddings: bool = False  # also the token and position embeddings
    save_singular_values: bool = True  # out_dir/spectra/<path>/t_<t>.safetensors
    histogram_at: list[float] = field(default_factory=lambda: [0.0, 0.5, 1.0])  # t of the histogram plots


@dataclass
class ProbeConfig:
    runs: dict = field(default_factory=dict)  # {label: checkpoint}: pairs of them as straight paths
    pairs: Literal["all", "within", "across"] = "all"  # which pairs: all, within a group, across two groups
    groups: Optional[dict] = None  # {run label: group}; default: the optimizer each run's export records
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


class Prober:
    def __init__(self, cfg: ProbeConfig, world: World):
        self.cfg, self.world, self.out = cfg, world, Path(cfg.out_dir)
        self.files = ProbeFiles(self.out)
        if world.is_main:  # what a killed batch left half-written (we hold out_dir's lock)
            for line in clean_leftovers(self.out):
                print(f"probe: {line}", flush=True)
        barrier()
        self.ts = sorted({float(t) for t in cfg.t_values}) if cfg.t_values else t_grid(cfg.t_step)
        for what, values in (("t_values", self.ts), ("save_points", cfg.save_points)):
            if values and not 0.0 <= min(values) <= max(values) <= 1.0:
                raise ConfigError(f"{what} must lie in [0, 1] (got {values})")
        self.plan = build_plan(cfg, self.ts, self.files.aligned_pair)
        self.paths = self.plan.paths
        self._write_alignments()
        points = list(dict.fromkeys(p for named in self.paths for p in named.path.points))
        self.evaluator = PointEvaluator(cfg, world, points)  # opens and checks every checkpoint
        self.store = ResultsStore(self.files)
        self.evaluations = 0  # measurements made by this run (a rerun makes only the missing ones)
        self.wandb = None

    def _write_alignments(self) -> None:
        """B aligned to A for every `runs` pair (once: kept in out_dir/aligned/), spread over the ranks."""
        if self.cfg.align is None:
            return
        residual = self.cfg.align.residual
        pairs = [(a, b) for a, b in self.plan.aligned
                 if not all(p.exists() for p in self.files.aligned_pair(a, b)[0 if residual else 1:])]
        for a, b in pairs[self.world.rank::self.world.world_size]:
            a_form, b_aligned = self.files.aligned_pair(a, b)
            shutil.rmtree(a_form.parent, ignore_errors=True)  # a pair cut off half-written: derived, redone
            report = align_checkpoints(Path(self.cfg.runs[a]), Path(self.cfg.runs[b]), b_aligned, self.cfg.align,
                                       a_form if residual else None, self.cfg.data)
            print(f"probe: aligned {b} to {a} in {report['seconds']:.1f} s, similarity "
                  f"{report['similarity_before']:.4g} -> {report['similarity_after']:.4g}", flush=True)
        barrier()

    def _rows(self, m: Measurement, items: list[WorkItem], parts: list[dict]) -> list[dict]:
        """The rows of one measurement; its singular values saved at every path point it is."""
        rows, spectra = self.evaluator.assemble(m, items, parts)
        on_paths = [(i.named.name, i.at[0]) for i in items if not i.named.is_plane]
        if spectra and self.cfg.spectra.save_singular_values and on_paths:
            self.store.publish_spectra(spectra, on_paths)
        return rows

    # --- the batch ---------------------------------------------------------------------------------

    def run(self) -> dict:
        self.store.check_settings(self.cfg)
        barrier()
        if self.world.is_main:
            self.store.save_settings(self.cfg)
        barrier()
        rows = self.store.rows()
        done = {row_key(r) for r in rows}
        todo: dict[tuple, list[WorkItem]] = {}
        for item in self.plan.items:
            if item.key not in done:
                todo.setdefault(item.measurement_key(), []).append(item)
        work = [(self.plan.measurements[key], items) for key, items in todo.items()]
        if self.world.is_main:
            self.store.resume()  # drops a line cut off by a kill
            shared = sum(1 for m in self.plan.measurements.values() if m.checkpoint is not None)
            print(f"probe: {len(self.paths)} paths/planes, {len(self.plan.items)} points from "
                  f"{len(self.plan.measurements)} evaluations ({shared} checkpoints, each evaluated once); "
                  f"{len(done)} points done before, {sum(len(i) for _, i in work)} to go in {len(work)} evaluations, "
                  f"on {self.world.world_size} rank(s) (shard: {self.cfg.shard}); model {self.evaluator.model_cfg.n_layer} "
                  f"layers, d={self.evaluator.model_cfg.n_embd}; {self.evaluator.n_windows} validation windows", flush=True)
            self.wandb = start_wandb(self.out, self.cfg.wandb, config_lib.to_dict(self.cfg))
        self._save_points()
        progress = self._progress(len(work))
        position, size = 0, self.world.world_size
        while position < len(work):
            together = self.cfg.shard == "batches" or (self.cfg.shard == "auto" and len(work) - position < size)
            if together:  # every rank on the same point, a share of its batches and matrices each
                m, items = work[position]
                parts = all_gather_objects(self.evaluator.measure(m, self.world.rank, size))
                new = self._rows(m, items, parts) if self.world.is_main else []
                position, evaluated = position + 1, 1
            else:  # one point per rank
                mine = position + self.world.rank
                part = self.evaluator.measure(work[mine][0]) if mine < len(work) else None
                gathered = all_gather_objects(part)
                new = [row for (m, items), part in zip(work[position:position + size], gathered)
                       for row in self._rows(m, items, [part])] if self.world.is_main else []
                evaluated = min(size, len(work) - position)
                position += size
            self.evaluations += evaluated
            if self.world.is_main:
                self._append(new)
                progress.update(evaluated)
        progress.close()
        barrier()
        summary = self.summarize() if self.world.is_main else {}
        if self.wandb is not None:
            self.wandb.finish()
        barrier()
        return {**summary, "evaluations": self.evaluations}

    def _append(self, new: list[dict]) -> None:
        self.store.append(new)
        if self.wandb is not None:
            for r in (r for r in new if "t" in r):  # each path against its own t axis
                self.wandb.define_metric(f"{r['path']}/*", step_metric=f"{r['path']}/t")
                self.wandb.log({f"{r['path']}/{k}": r[k] for k in ("t", "loss", "token_error")})

    def _save_points(self) -> None:
        """θ(t) at the `save_points` t of every path, as checkpoint directories under out_dir/points/
        (streamed, one tensor at a time; points already there are kept)."""
        targets = [(named, t, self.files.point(named.name, t))
                   for named in self.paths if not named.is_plane for t in self.cfg.save_points]
        missing = [target for target in targets if not target[2].exists()]
        for named, t, target in missing[self.world.rank::self.world.world_size]:
            coefficients = named.path.coefficients(t)
            write_point([self.evaluator.sources[p] for p in named.path.points], coefficients, target,
                        {"probe_path": named.name, "kind": named.path.kind, "t": t,
                         "points": list(named.path.points), "coefficients": coefficients})
        if missing and self.world.is_main:
            print(f"probe: wrote {len(missing)} path point(s) to {self.out / 'points'}", flush=True)
        barrier()

    def _progress(self, total: int):
        from tqdm import tqdm

        return tqdm(total=total, desc="probe evaluations", unit="pt", disable=not self.world.is_main,
                    dynamic_ncols=True)

    # --- summaries and plots ----------------------------------------------------------------------------

    def summarize(self) -> dict:
        rows = self.store.rows()
        lines = [p for p in self.paths if not p.is_plane]
        by_path = {p.name: sorted((r for r in rows if r["path"] == p.name), key=lambda r: r["t"]) for p in lines}
        planes = {p.name: [r for r in rows if r["path"] == p.name] for p in self.paths if p.is_plane}
        table = path_table(lines, by_path, self.evaluator.distance)
        stats = group_statistics(table)
        write_csv(self.files.summary, table)
        write_csv(self.files.groups, stats, ("group", "quantity", "n", "mean", "std", "min", "max"))
        self._spectra_distances(by_path)
        if self.cfg.plots:
            from modeconn.probe_plots import plot_all

            plot_all(self.files, lines, by_path, table, stats, self.cfg.spectra, planes)
        if self.wandb is not None:
            self._log_summary(table)
        for line in path_lines(table) + group_lines(stats) + plane_lines(planes):
            print(line, flush=True)
        print(f"wrote {self.files.results}, {self.files.summary.name}, {self.files.groups.name}"
              + (", plots/" if self.cfg.plots else ""), flush=True)
        return {"paths": table, "groups": stats}

    def _log_summary(self, table: list[dict]) -> None:
        import wandb

        fields = list(dict.fromkeys(k for e in table for k in e))
        logged = {"summary": wandb.Table(columns=fields, data=[[e.get(k) for k in fields] for e in table])}
        for png in sorted(self.files.plots.glob("*.png")):
            logged[f"plots/{png.stem}"] = wandb.Image(str(png))
        self.wandb.log(logged)

    def _spectra_distances(self, by_path: dict) -> None:
        """Per point and matrix: distance of its spectrum to each endpoint's (from the saved values)."""
        if not (self.cfg.spectra.enabled and self.cfg.spectra.save_singular_values):
            return
        lines = []
        for name, points in by_path.items():
            ends = [self.files.spectra(name, t) for t in (0.0, 1.0)]
            if not all(e.is_file() for e in ends):
                continue
            a, b = (load_file(str(e)) for e in ends)
            for r in points:
                s = load_file(str(self.files.spectra(name, r["t"])))
                for matrix, values in s.items():
                    lines.append({"path": name, "t": r["t"], "matrix": matrix,
                                  "to_A": spectrum_distance(values, a[matrix]), "to_B": spectrum_distance(values, b[matrix])})
        write_csv(self.files.spectra_distances, lines, ["path", "t", "matrix", "to_A", "to_B"])


def run(cfg: ProbeConfig) -> dict:
    world = init_distributed()
    try:
        with held_by_rank0(lock_for_directory(Path(cfg.out_dir), "probe.py"), world):
            return Prober(cfg, world).run()
    finally:
        shutdown()


def main(argv=None) -> None:
    run(config_lib.from_cli(ProbeConfig, strip_launcher_args(list(sys.argv[1:] if argv is None else argv)), __doc__))
