"""Barriers of a quantity (loss, token error) along a path sampled at t = 0, ..., 1.

- linear: max_t [f(t) − ((1 − t) f(0) + t f(1))], against the straight line between the endpoint
  values (the seed study's form); 0 at the endpoints, so never negative once they are sampled;
- mean: max_t f(t) − ½ (f(0) + f(1)), against the endpoints' mean (may be negative);
- each also normalised by the mean endpoint value, with the t of its maximum (the first, on ties).
"""

from __future__ import annotations

from typing import Sequence

from modeconn.errors import ModeconnError


def barriers(ts: Sequence[float], values: Sequence[float]) -> dict:
    if len(ts) != len(values) or len(ts) < 2:
        raise ModeconnError(f"barriers need matching t and value lists of 2 or more points (got {len(ts)}, "
                            f"{len(values)})")
    if ts[0] != 0.0 or ts[-1] != 1.0 or any(a >= b for a, b in zip(ts, ts[1:])):
        raise ModeconnError(f"barriers need increasing t from 0 to 1 (got {list(ts)})")
    f0, f1 = values[0], values[-1]
    above_line = [f - ((1.0 - t) * f0 + t * f1) for t, f in zip(ts, values)]
    i_line = max(range(len(ts)), key=lambda i: (above_line[i], -i))
    i_peak = max(range(len(ts)), key=lambda i: (values[i], -i))
    mean = 0.5 * (f0 + f1)
    return {"linear": above_line[i_line], "linear_t": ts[i_line],
            "linear_normalised": above_line[i_line] / mean if mean else float("nan"),
            "mean": values[i_peak] - mean, "mean_t": ts[i_peak],
            "mean_normalised": (values[i_peak] - mean) / mean if mean else float("nan"),
            "endpoints": [f0, f1]}
