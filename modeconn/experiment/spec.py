"""An experiment spec: datasets × optimizers × seeds, the pairs to probe, the pairs that get a
fitted chain, the probe's settings and the report's thresholds, in one YAML file.

    name: shakespeare-small
    datasets:   {shakespeare: {prepare: configs/data/shakespeare.yaml}}
    optimizers: {adamw: {config: configs/train/small-adamw.yaml}, muon: {config: ...}}
    seeds:      {init: [0, 1, 2], data: [0, 1]}
    pairs:      {data_order: true, init: true, cross: [[adamw, muon]]}
    fits:       {pairs: [init], config: configs/train/small-fit-chain.yaml}

`load_spec` checks everything a run would need before anything runs: every referenced config
loads (prepare.py's, train.py's with the overrides applied, the fit's, the probe's), and every
name a pair or override uses exists; errors name the key at fault.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from modeconn import config as config_lib
from modeconn.errors import ConfigError

PairKind = Literal["data_order", "init", "cross"]


@dataclass
class DatasetSpec:
    prepare: str = ""  # a prepare.py config: its source, and its out_dir is where the tokens go
    # {optimizer: {dotted train.py key: value}} for this dataset only (the study's Muon lr per dataset)
    optimizers: dict = field(default_factory=dict)


@dataclass
class OptimizerSpec:
    config: str = ""  # a train.py config file (model, optimizer, schedule, steps)
    label: str = ""  # the name the report uses (default: the key), e.g. AdamW
    overrides: dict = field(default_factory=dict)  # dotted train.py keys for this optimizer's runs


@dataclass
class SeedSpec:
    init: list[int] = field(default_factory=lambda: [0, 1])  # independent inits; init pairs: every two
    data: list[int] = field(default_factory=lambda: [0, 1])  # data orders; data-order pairs: every two


@dataclass
class PairSpec:
    # Every two data orders, same optimizer, at the first init (the study's "spawn" pairs).
    data_order: bool = True
    # Every two inits, same optimizer, at the first data order: probed straight and aligned.
    init: bool = True
    # Optimizer pairs, each run against the other optimizer's run of the same seeds (same init).
    cross: list[list[str]] = field(default_factory=lambda: [["adamw", "muon"]])
    align: dict = field(default_factory=lambda: {"residual": True})  # align.py's align.* settings


@dataclass
class FitSpec:
    pairs: list[PairKind] = field(default_factory=list)  # which kinds of pairs get a fitted chain
    config: str = ""  # a train.py config with a path_fit section; its endpoints are set per pair
    overrides: dict = field(default_factory=dict)  # dotted train.py keys for every fit


@dataclass
class Thresholds:
    """What the report's verdicts are judged against (reproduced / partly / not reproduced)."""
    connected: float = 0.1  # a loss barrier (against the endpoint line) below this: connected
    aligned_ratio: float = 0.5  # alignment helps: aligned barrier <= this x the straight one
    stable_rank_ratio: float = 1.5  # Muon's stable rank over AdamW's, on the highlighted matrix
    monotone_slack: float = 0.05  # a rise may dip by this fraction of its range and still count as monotone
    band_slack: float = 0.1  # a same-optimizer path stays in its band, widened by this fraction
    cross_loss_barrier: float = 0.1  # AdamW -> Muon, the loss barely moves: barrier below this
    loss_gap: float = 0.05  # final validation losses of the optimizers within this fraction: a fair comparison


@dataclass
class ReportSpec:
    highlight: str = "h.1.fc"  # the matrix the seed study reads stable rank on
    thresholds: Thresholds = field(default_factory=Thresholds)


@dataclass
class LaunchSpec:
    """How emitted cluster scripts start train.py (SLURM, or plain deepspeed command lines)."""
    nodes: int = 1
    gpus_per_node: int = 8
    cpus_per_task: int = 12
    time: str = "24:00:00"
    partition: Optional[str] = None
    account: Optional[str] = None


@dataclass
class ExperimentSpec:
    name: str = ""
    out_dir: str = ""  # default out/experiments/<name>
    report_dir: str = ""  # default reports/<name>
    datasets: dict = field(default_factory=dict)  # {name: DatasetSpec}
    optimizers: dict = field(default_factory=dict)  # {name: OptimizerSpec}
    seeds: SeedSpec = field(default_factory=SeedSpec)
    pairs: PairSpec = field(default_factory=PairSpec)
    fits: FitSpec = field(default_factory=FitSpec)
    train: dict = field(default_factory=dict)  # dotted train.py keys for every run
    probe: dict = field(default_factory=dict)  # dotted probe.py keys for every dataset's probe
    report: ReportSpec = field(default_factory=ReportSpec)
    launch: LaunchSpec = field(default_factory=LaunchSpec)

    @property
    def out(self) -> Path:
        return Path(self.out_dir or f"out/experiments/{self.name}")

    @property
    def report_path(self) -> Path:
        return Path(self.report_dir or f"reports/{self.name}")

    def label(self, optimizer: str) -> str:
        return self.optimizers[optimizer].label or optimizer


def load_spec(path: str, overrides: list[tuple[str, str]] = ()) -> ExperimentSpec:
    spec = config_lib.load(ExperimentSpec, path, overrides)
    spec.datasets = {name: config_lib.build(DatasetSpec, raw, f"datasets.{name}") for name, raw in spec.datasets.items()}
    spec.optimizers = {name: config_lib.build(OptimizerSpec, raw, f"optimizers.{name}")
                       for name, raw in spec.optimizers.items()}
    validate(spec)
    return spec


def _flat(section: dict, prefix: str = "") -> list[tuple[str, str]]:
    """{a: {b: 1}} -> [("a.b", "1")]: nested or dotted keys, as command-line overrides."""
    import yaml

    out = []
    for key, value in section.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out += _flat(value, dotted + ".")
        else:
            text = value if isinstance(value, str) else yaml.safe_dump(value, default_flow_style=True).strip()
            out.append((dotted, text.removesuffix("\n...").strip()))
    return out


def overrides_of(section: dict) -> list[tuple[str, str]]:
    return _flat(section)


def validate(spec: ExperimentSpec) -> None:
    """Every name and config the plan will use, checked before anything runs."""
    from modeconn.data.prepare import PrepareConfig
    from modeconn.probe import ProbeConfig
    from modeconn.train import TrainConfig

    if not spec.name:
        raise ConfigError("name: an experiment needs a name (it names out_dir and the report)")
    for key, section in (("datasets", spec.datasets), ("optimizers", spec.optimizers)):
        if not section:
            raise ConfigError(f"{key}: give at least one")
    if not spec.seeds.init or not spec.seeds.data:
        raise ConfigError("seeds.init and seeds.data: give at least one seed each")
    for key in ("init", "data"):
        seeds = getattr(spec.seeds, key)
        if len(set(seeds)) != len(seeds):
            raise ConfigError(f"seeds.{key}: repeated seeds {seeds}")
    for name, dataset in spec.datasets.items():
        if not dataset.prepare:
            raise ConfigError(f"datasets.{name}.prepare: no data config given (a prepare.py config file)")
        if not Path(dataset.prepare).is_file():
            raise ConfigError(f"datasets.{name}.prepare: {dataset.prepare} does not exist")
        config_lib.load(PrepareConfig, dataset.prepare)
        for optimizer in dataset.optimizers:
            if optimizer not in spec.optimizers:
                raise ConfigError(f"datasets.{name}.optimizers.{optimizer}: not an optimizer of this experiment; "
                                  f"its optimizers: {', '.join(spec.optimizers)}")
    for name, optimizer in spec.optimizers.items():
        if not optimizer.config or not Path(optimizer.config).is_file():
            raise ConfigError(f"optimizers.{name}.config: {optimizer.config or 'nothing given'} is not a train.py "
                              f"config file")
        for dataset in spec.datasets.values():
            extra = (overrides_of(spec.train) + overrides_of(optimizer.overrides)
                     + overrides_of(dataset.optimizers.get(name, {})))
            try:
                config_lib.load(TrainConfig, optimizer.config, extra)
            except ConfigError as e:
                raise ConfigError(f"optimizers.{name} ({optimizer.config} with the experiment's train keys): {e}") from None
    for i, pair in enumerate(spec.pairs.cross):
        if len(pair) != 2 or pair[0] == pair[1]:
            raise ConfigError(f"pairs.cross[{i}]: a pair of two different optimizers, got {pair}")
        for optimizer in pair:
            if optimizer not in spec.optimizers:
                raise ConfigError(f"pairs.cross[{i}]: {optimizer!r} is not an optimizer of this experiment (no run "
                                  f"of it exists); its optimizers: {', '.join(spec.optimizers)}")
    if spec.fits.pairs:
        if not spec.fits.config or not Path(spec.fits.config).is_file():
            raise ConfigError(f"fits.config: {spec.fits.config or 'nothing given'} is not a train.py config file "
                              f"(with a path_fit section)")
        config_lib.load(TrainConfig, spec.fits.config, overrides_of(spec.fits.overrides))
        for kind in spec.fits.pairs:
            if kind == "init" and not spec.pairs.init or kind == "data_order" and not spec.pairs.data_order \
                    or kind == "cross" and not spec.pairs.cross:
                raise ConfigError(f"fits.pairs: {kind!r} pairs are not probed in this experiment (pairs.{kind})")
    try:
        config_lib.load(ProbeConfig, None, overrides_of(spec.probe))
    except ConfigError as e:
        raise ConfigError(f"probe: {e}") from None
