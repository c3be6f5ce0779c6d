"""An experiment's plan: its runs, its pairs, and the commands that make them, stage by stage.

Runs (per dataset and optimizer): the first init with every data order, and every init with the
first data order, so that
- data-order pairs: every two data orders, same optimizer, at the first init;
- init pairs: every two inits, same optimizer, at the first data order (straight and aligned);
- cross pairs: for each pair of optimizers, the two runs of the same seeds (same init).
Stages, each a list of commands of our own entry points: prepare (prepare.py per dataset), train
(train.py per run), align (align.py per init pair), fit (train.py with path_fit per fitted pair),
probe (probe.py per dataset, on a probe config the plan writes), report (experiment.py --report).
A command is done when the file it ends by writing exists; a rerun skips it (the report, cheap
and meant to reflect the latest files, runs every time).
"""

from __future__ import annotations

import itertools
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from modeconn import config as config_lib
from modeconn.data.prepare import PrepareConfig
from modeconn.experiment.spec import ExperimentSpec, overrides_of

STAGES = ("prepare", "train", "align", "fit", "probe", "report")


@dataclass(frozen=True)
class Run:
    dataset: str
    optimizer: str
    init: int
    data: int

    @property
    def name(self) -> str:
        return f"{self.optimizer}-i{self.init}-d{self.data}"


@dataclass(frozen=True)
class Pair:
    kind: str  # data_order, init, cross
    a: Run
    b: Run

    @property
    def dataset(self) -> str:
        return self.a.dataset

    @property
    def name(self) -> str:
        return f"{self.a.name}--{self.b.name}"

    @property
    def optimizers(self) -> str:
        """The column of the study's table this pair belongs to, e.g. adamw--muon."""
        return f"{self.a.optimizer}--{self.b.optimizer}"


@dataclass(frozen=True)
class Command:
    stage: str
    name: str
    argv: tuple[str, ...]
    done: Optional[Path]  # exists once the command has finished; None: runs every time (the report)
    distributed: bool = False  # train.py: started on every rank (srun / deepspeed) on a cluster

    def shell(self) -> str:
        return shlex.join(self.argv)


class Plan:
    def __init__(self, spec: ExperimentSpec, spec_path: str, python: str = sys.executable):
        self.spec, self.spec_path, self.python = spec, spec_path, python
        self.out = spec.out
        # where prepare.py puts each dataset's tokens: its config read once, not per command
        self._data_dirs = {name: Path(config_lib.load(PrepareConfig, d.prepare).out_dir)
                           for name, d in spec.datasets.items()}
        self.runs = self._runs()
        self.pairs = self._pairs()

    # --- what is trained and compared ------------------------------------------------------------

    def _runs(self) -> list[Run]:
        seeds = self.spec.seeds
        combos = list(dict.fromkeys([(seeds.init[0], d) for d in seeds.data] + [(i, seeds.data[0]) for i in seeds.init]))
        return [Run(dataset, optimizer, i, d) for dataset in self.spec.datasets for optimizer in self.spec.optimizers
                for i, d in combos]

    def _pairs(self) -> list[Pair]:
        seeds, pairs = self.spec.seeds, []
        by_key = {(r.dataset, r.optimizer, r.init, r.data): r for r in self.runs}
        for dataset in self.spec.datasets:
            for optimizer in self.spec.optimizers:
                if self.spec.pairs.data_order:
                    pairs += [Pair("data_order", by_key[dataset, optimizer, seeds.init[0], a],
                                   by_key[dataset, optimizer, seeds.init[0], b])
                              for a, b in itertools.combinations(seeds.data, 2)]
                if self.spec.pairs.init:
                    pairs += [Pair("init", by_key[dataset, optimizer, a, seeds.data[0]],
                                   by_key[dataset, optimizer, b, seeds.data[0]])
                              for a, b in itertools.combinations(seeds.init, 2)]
            for first, second in self.spec.pairs.cross:
                pairs += [Pair("cross", r, by_key[dataset, second, r.init, r.data]) for r in self.runs
                          if r.dataset == dataset and r.optimizer == first]
        return pairs

    # --- where things go ----------------------------------------------------------------------------

    def data_dir(self, dataset: str) -> Path:
        return self._data_dirs[dataset]

    def run_dir(self, run: Run) -> Path:
        return self.out / "runs" / run.dataset / run.name

    def final(self, run: Run) -> Path:
        return self.run_dir(run) / "final"

    def aligned(self, pair: Pair) -> tuple[Path, Path]:
        """(A as the straight line's start, B aligned to A): A's canonical form with align.residual."""
        folder = self.out / "aligned" / pair.dataset / pair.name
        residual = bool(self.spec.pairs.align.get("residual", False))
        return (folder / pair.a.name if residual else self.final(pair.a)), folder / pair.b.name

    def fit_dir(self, pair: Pair) -> Path:
        return self.out / "fits" / pair.dataset / pair.name

    def fit_endpoints(self, pair: Pair) -> tuple[Path, Path]:
        """A chain between independent inits is fitted between the aligned endpoints."""
        return self.aligned(pair) if pair.kind == "init" else (self.final(pair.a), self.final(pair.b))

    def probe_config(self, dataset: str) -> Path:
        return self.out / "probe" / f"{dataset}.yaml"

    @property
    def log(self) -> Path:
        """One JSON line per finished command: its name and wall seconds (the report sums them)."""
        return self.out / "commands.jsonl"

    def probe_dir(self, dataset: str) -> Path:
        return self.out / "probe" / dataset

    def fitted(self, pair: Pair) -> bool:
        return pair.kind in self.spec.fits.pairs

    # --- the commands -------------------------------------------------------------------------------

    def commands(self, stage: Optional[str] = None) -> list[Command]:
        every = self._prepare() + self._train() + self._align() + self._fit() + self._probe() + self._report()
        return [c for c in every if stage is None or c.stage == stage]

    def _prepare(self) -> list[Command]:
        return [Command("prepare", f"prepare {name}", (self.python, "prepare.py", "--config", dataset.prepare),
                        self.data_dir(name) / "meta.json") for name, dataset in self.spec.datasets.items()]

    def _train(self) -> list[Command]:
        out = []
        for run in self.runs:
            keys = (overrides_of(self.spec.train) + overrides_of(self.spec.optimizers[run.optimizer].overrides)
                    + overrides_of(self.spec.datasets[run.dataset].optimizers.get(run.optimizer, {})))
            keys += [("data.dir", str(self.data_dir(run.dataset))), ("seed.init", str(run.init)),
                     ("seed.data", str(run.data)), ("out_dir", str(self.run_dir(run))), ("resume", "auto")]
            out.append(Command("train", f"train {run.dataset}/{run.name}",
                               (self.python, "train.py", "--config", self.spec.optimizers[run.optimizer].config,
                                *(f"--{k}={v}" for k, v in keys)), self.final(run) / "modeconn_meta.json", True))
        return out

    def _align(self) -> list[Command]:
        out = []
        for pair in (p for p in self.pairs if p.kind == "init"):
            a_form, b_aligned = self.aligned(pair)
            argv = [self.python, "align.py", f"--reference={self.final(pair.a)}", f"--checkpoint={self.final(pair.b)}",
                    f"--out={b_aligned}"]
            if a_form != self.final(pair.a):
                argv.append(f"--reference_out={a_form}")
            argv += [f"--align.{k}={v}" for k, v in overrides_of(self.spec.pairs.align)]
            out.append(Command("align", f"align {pair.dataset}/{pair.name}", tuple(argv), b_aligned / "config.json"))
        return out

    def _fit(self) -> list[Command]:
        out = []
        for pair in (p for p in self.pairs if self.fitted(p)):
            a, b = self.fit_endpoints(pair)
            keys = overrides_of(self.spec.fits.overrides) + [
                ("path_fit.kind", "chain"), ("path_fit.endpoints", f"[{a}, {b}]"),
                ("data.dir", str(self.data_dir(pair.dataset))), ("out_dir", str(self.fit_dir(pair))), ("resume", "auto")]
            out.append(Command("fit", f"fit {pair.dataset}/{pair.name}",
                               (self.python, "train.py", "--config", self.spec.fits.config,
                                *(f"--{k}={v}" for k, v in keys)), self.fit_dir(pair) / "final" / "modeconn_meta.json",
                               True))
        return out

    def _probe(self) -> list[Command]:
        return [Command("probe", f"probe {dataset}", (self.python, "probe.py", "--config", str(self.probe_config(dataset))),
                        self.probe_dir(dataset) / "groups.csv") for dataset in self.spec.datasets]

    def _report(self) -> list[Command]:
        return [Command("report", "report", (self.python, "experiment.py", "--config", self.spec_path, "--report"),
                        None)]

    # --- the probe's configs ----------------------------------------------------------------------

    def probe_paths(self, dataset: str) -> list[dict]:
        """The paths of one dataset's probe; each group is '<optimizers> <kind>', e.g.
        'adamw--adamw init, aligned', which the report reads back."""
        paths = []
        for pair in (p for p in self.pairs if p.dataset == dataset):
            a, b = str(self.final(pair.a)), str(self.final(pair.b))
            group = f"{pair.optimizers} {pair.kind.replace('_', ' ')}"
            paths.append({"name": pair.name, "kind": "linear", "points": [a, b], "group": group})
            if pair.kind == "init":
                a_form, b_aligned = (str(p) for p in self.aligned(pair))
                paths.append({"name": f"{pair.name}:aligned", "kind": "linear", "points": [a_form, b_aligned],
                              "group": f"{group}, aligned"})
            if self.fitted(pair):
                start, end = (str(p) for p in self.fit_endpoints(pair))
                paths.append({"name": f"{pair.name}:chain", "kind": "chain",
                              "points": [start, str(self.fit_dir(pair) / "final"), end], "group": f"{group}, chain"})
        return paths

    def write_probe_configs(self) -> None:
        """The probe config of each dataset, from the spec's probe keys and the plan's paths."""
        from modeconn.probe import ProbeConfig

        for dataset in self.spec.datasets:
            cfg = config_lib.load(ProbeConfig, None, overrides_of(self.spec.probe))
            raw = config_lib.to_dict(cfg)
            raw.update({"paths": self.probe_paths(dataset), "out_dir": str(self.probe_dir(dataset))})
            raw["data"]["dir"] = str(self.data_dir(dataset))
            config_lib.save(config_lib.build(ProbeConfig, raw), self.probe_config(dataset))
