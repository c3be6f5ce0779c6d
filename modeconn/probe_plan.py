"""What a probe batch evaluates, decided before anything runs.

- Named paths from the config: pairs of `runs` chosen by a rule (`pairs: all | within | across`
  over the runs' groups), `paths`, `stars` (one straight path from the centre to each anchor) and
  `planes`.
- Work items: one per point, t on a path or (α, β) on a plane.
- Measurements: what is evaluated. A point that is a checkpoint itself (t = 0 or 1 of a path, a
  chain's bend, a star's centre, a plane's corners) is one measurement shared by every item at
  it, so each checkpoint is evaluated once per batch however many paths it ends; every other
  point is a measurement of its own.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Callable, Union

from modeconn.errors import ConfigError
from modeconn.hf import read_meta
from modeconn.paths import Coefficients, WeightPath, PathKind, Plane, axis_grid, star

PAIR_RULES = ("all", "within", "across")


@dataclass(frozen=True)
class NamedPath:
    name: str
    group: str
    path: Union[WeightPath, Plane]

    @property
    def is_plane(self) -> bool:
        return self.path.kind == "plane"


@dataclass(frozen=True)
class Measurement:
    """A point to evaluate: Σ c_i θ_i over `points` (checkpoint paths); `spectra` if any item at it
    is on a path (planes report loss and error only)."""
    key: tuple
    points: tuple[str, ...]
    coefficients: tuple[tuple[int, float], ...]
    spectra: bool

    @property
    def checkpoint(self) -> str | None:
        """The checkpoint this point is, if it is one."""
        return self.key[1] if self.key[0] == "checkpoint" else None


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

    def coefficients(self) -> Coefficients:
        return self.named.path.coefficients(*self.at)

    def measurement_key(self) -> tuple:
        terms = [(self.named.path.points[i], c) for i, c in self.coefficients() if c != 0.0]
        if len(terms) == 1 and terms[0][1] == 1.0:
            return ("checkpoint", terms[0][0])
        return ("point", *self.key)


def row_key(row: dict) -> tuple:
    return (row["path"], row["t"]) if "t" in row else (row["path"], row["alpha"], row["beta"])


def label(checkpoint: str) -> str:
    """A checkpoint's short name in path names: its directory, or the run's for a run's `final`."""
    path = PurePath(checkpoint)
    return path.parent.name if path.name == "final" and path.parent.name else path.name


def run_groups(runs: dict, groups: dict | None) -> dict[str, str]:
    """Each run's group: the label given in `groups`, or the optimizer its export records."""
    if groups is None:
        return {name: str(read_meta(path).get("optimizer", "unknown")) for name, path in runs.items()}
    missing = [name for name in runs if name not in groups]
    unknown = [name for name in groups if name not in runs]
    if missing or unknown:
        raise ConfigError("groups must give a group to every run and name no other: "
                          + (f"missing {', '.join(missing)}" if missing else "")
                          + ("; " if missing and unknown else "") + (f"not in runs: {', '.join(unknown)}" if unknown else ""))
    return {name: str(groups[name]) for name in runs}


def run_pairs(runs: dict, rule: str, groups: dict[str, str]) -> list[tuple[str, str]]:
    """Pairs of run labels, in the order of `runs`: every pair, pairs in one group, or pairs across two."""
    if rule not in PAIR_RULES:
        raise ConfigError(f"pairs: {rule!r} is not a rule; valid rules: {', '.join(PAIR_RULES)}")
    pairs = list(itertools.combinations(runs, 2))
    if rule == "within":
        pairs = [(a, b) for a, b in pairs if groups[a] == groups[b]]
    elif rule == "across":
        pairs = [(a, b) for a, b in pairs if groups[a] != groups[b]]
    return pairs


def pair_group(groups: dict[str, str], a: str, b: str) -> str:
    """The group of the straight path between runs a and b: both runs' groups, e.g. adamw--muon."""
    return "--".join(sorted((groups[a], groups[b])))


def work_items(paths: list[NamedPath], ts: list[float], plane_grids: dict[str, list[float]]) -> list[WorkItem]:
    items = []
    for named in paths:
        if named.is_plane:
            grid = plane_grids[named.name]
            items += [WorkItem(named, (a, b)) for b in grid for a in grid]
        else:
            items += [WorkItem(named, (t,)) for t in ts]
    return items


def measurements(items: list[WorkItem]) -> dict[tuple, Measurement]:
    """The distinct measurements behind `items`, in the order of their first item."""
    out: dict[tuple, Measurement] = {}
    for item in items:
        key = item.measurement_key()
        spectra = not item.named.is_plane
        if key in out:
            if spectra and not out[key].spectra:
                out[key] = Measurement(key, out[key].points, out[key].coefficients, True)
            continue
        if key[0] == "checkpoint":
            out[key] = Measurement(key, (key[1],), ((0, 1.0),), spectra)
        else:
            out[key] = Measurement(key, tuple(item.named.path.points), tuple(item.coefficients()), spectra)
    return out


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
class Plan:
    paths: list[NamedPath]
    items: list[WorkItem]
    measurements: dict[tuple, Measurement]
    aligned: list[tuple[str, str]]  # the pairs of runs to align (B to A) before anything is evaluated


def build_plan(cfg, ts: list[float], aligned_pair: Callable[[str, str], tuple[PurePath, PurePath]]) -> Plan:
    """The plan of a probe config (modeconn.probe.ProbeConfig). `aligned_pair(a, b)`: where A's
    canonical form and B aligned to A are kept, for `align`."""
    groups = run_groups(cfg.runs, cfg.groups)
    pairs = run_pairs(cfg.runs, cfg.pairs, groups)
    paths = []
    for a, b in pairs:
        group = pair_group(groups, a, b)
        paths.append(NamedPath(f"{a}--{b}", group, WeightPath("linear", (cfg.runs[a], cfg.runs[b]))))
        if cfg.align is not None:
            a_form, b_aligned = aligned_pair(a, b)
            paths.append(NamedPath(f"{a}--{b}:aligned", f"{group}, aligned",
                                   WeightPath("linear", (str(a_form) if cfg.align.residual else cfg.runs[a], str(b_aligned)))))
    for spec in cfg.paths:
        paths.append(NamedPath(spec.name or "--".join(map(label, spec.points)), spec.group,
                               WeightPath(spec.kind, tuple(spec.points))))
    for spec in cfg.stars:
        for i, path in enumerate(star(spec.centre, spec.anchors)):
            paths.append(NamedPath(f"{spec.name or 'star'}/{i}:{label(path.points[1])}", spec.group, path))
    grids = {}
    for spec in cfg.planes:
        named = NamedPath(spec.name or "plane:" + "--".join(map(label, spec.points)), spec.group,
                          Plane(tuple(spec.points)))
        paths.append(named)
        grids[named.name] = axis_grid(spec.range[0], spec.range[-1], spec.resolution)
    if not paths:
        raise ConfigError("nothing to probe: give runs (pairs of them), paths, stars or planes")
    names = [p.name for p in paths]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"path names must be unique; repeated: {', '.join(repeated)}")
    items = work_items(paths, ts, grids)
    return Plan(paths, items, measurements(items), pairs if cfg.align is not None else [])
