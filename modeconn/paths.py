"""Paths between checkpoints, declared as linear combinations of their points.

Every point of every path here is θ = Σ_i c_i θ_i over the path's *points* (endpoints, bends,
control points, a centre), so one streaming routine (`modeconn.stream`) builds any of them tensor
by tensor, and a new kind of path is one more coefficient rule.

The t convention, everywhere: t runs over [0, 1] from the path's first point (t = 0) to its last
(t = 1).
- linear (A, B):            θ(t) = (1 − t) θA + t θB
- chain (A, b1, …, bk, B):  k + 1 straight segments, each an equal share 1/(k+1) of t; with one
                            bend the bend is at t = 0.5
- bezier (A, C, B):         θ(t) = (1 − t)² θA + 2t(1 − t) θC + t² θB (C is the control point, not on
                            the path except through its pull)
- star (centre; a1, …, ak): k linear paths, each from the centre (t = 0) to one anchor (t = 1)
- plane (A, B, C):          θ(α, β) = θA + α (θB − θA) + β (θC − θA), on a grid of (α, β)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

from modeconn.errors import ConfigError

PathKind = Literal["linear", "chain", "bezier"]
Coefficients = list[tuple[int, float]]  # (index into the path's points, coefficient)
_POINT_COUNTS = {"linear": (2, 2, "2 points (A, B)"), "chain": (3, 10 ** 9, "3 or more points (A, bends..., B)"),
                 "bezier": (3, 3, "3 points (A, control, B)")}


@dataclass(frozen=True)
class WeightPath:
    """A path through weight space over named points (not a file path: that is pathlib's)."""
    kind: PathKind
    points: tuple[str, ...]  # linear: (A, B); chain: (A, bends..., B); bezier: (A, control, B)

    def __post_init__(self):
        if self.kind not in _POINT_COUNTS:
            raise ConfigError(f"unknown path kind {self.kind!r}; valid kinds: {', '.join(_POINT_COUNTS)}")
        low, high, wording = _POINT_COUNTS[self.kind]
        if not low <= len(self.points) <= high:
            raise ConfigError(f"a {self.kind} path needs {wording}, got {len(self.points)}: {', '.join(self.points)}")

    def coefficients(self, t: float) -> Coefficients:
        """θ(t) as (point index, coefficient) pairs, in a fixed order (the order of summation)."""
        if not 0.0 <= t <= 1.0:
            raise ConfigError(f"t={t} is outside [0, 1]")
        if self.kind == "linear":
            return [(0, 1.0 - t), (1, t)]
        if self.kind == "bezier":
            return [(0, (1.0 - t) ** 2), (1, 2.0 * t * (1.0 - t)), (2, t ** 2)]
        segments = len(self.points) - 1
        i = min(int(t * segments), segments - 1)  # t = 1 belongs to the last segment
        local = t * segments - i
        return [(i, 1.0 - local), (i + 1, local)]


def star(centre: str, anchors: Sequence[str]) -> list[WeightPath]:
    """One linear path from the centre (t = 0) to each anchor (t = 1)."""
    return [WeightPath("linear", (centre, a)) for a in anchors]


def plane_coefficients(alpha: float, beta: float) -> Coefficients:
    """θA + α (θB − θA) + β (θC − θA) over the points (A, B, C)."""
    return [(0, 1.0 - alpha - beta), (1, alpha), (2, beta)]


@dataclass(frozen=True)
class Plane:
    """The plane through three checkpoints (A, B, C): A at (0, 0), B at (1, 0), C at (0, 1)."""

    points: tuple[str, ...]
    kind = "plane"

    def __post_init__(self):
        if len(self.points) != 3:
            raise ConfigError(f"a plane needs 3 points (A, B, C), got {len(self.points)}: {', '.join(self.points)}")

    def coefficients(self, alpha: float, beta: float) -> Coefficients:
        return plane_coefficients(alpha, beta)


def axis_grid(low: float, high: float, resolution: int) -> list[float]:
    """`resolution` evenly spaced values from low to high, both included (rounded like t_grid)."""
    if resolution < 2 or not low < high:
        raise ConfigError(f"a grid needs low < high and 2 or more points (got {low}..{high}, {resolution})")
    return [round(low + (high - low) * i / (resolution - 1), 12) for i in range(resolution)]


def t_grid(step: float = 0.1) -> list[float]:
    """0, step, ..., 1 (both ends included; values rounded so that 0.1 * 3 is 0.3)."""
    if not 0 < step <= 1:
        raise ConfigError(f"t step must be in (0, 1], got {step}")
    n = round(1 / step)
    if not math.isclose(n * step, 1.0, rel_tol=1e-9):
        raise ConfigError(f"t step {step} does not divide [0, 1] evenly; give the points as a list instead")
    return [round(i / n, 12) for i in range(n + 1)]


def path_slug(name: str) -> str:
    """A path's name as a file or directory name."""
    return name.replace("/", "_").replace(":", "_")
