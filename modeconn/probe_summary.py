"""A probe batch's summaries, from its rows: barriers and distances per path, statistics per
group of paths, and their CSV files and console lines. Pure functions of the rows (distances
come in as a function), so they can be recomputed from results.jsonl at any time."""

from __future__ import annotations

import csv
import math
import statistics
from pathlib import Path
from typing import Callable, Iterable

from modeconn.barrier import barriers

# The per-path quantities that group statistics are taken over.
GROUP_QUANTITIES = ("loss_barrier", "loss_barrier_vs_mean", "loss_barrier_normalised", "token_error_barrier",
                    "token_error_barrier_vs_mean", "token_error_barrier_normalised", "endpoint_distance", "path_length")


def path_table(paths, by_path: dict[str, list[dict]], distance: Callable) -> list[dict]:
    """One entry per path (planes left out): endpoint values, barriers of loss and token error
    with the t of their maxima, the endpoint distance and the path length. `distance(named, t0, t1)`
    is ‖θ(t1) − θ(t0)‖."""
    table = []
    for named in paths:
        points = by_path[named.name]
        ts = [r["t"] for r in points]
        entry = {"path": named.name, "group": named.group, "kind": named.path.kind,
                 "points": " | ".join(named.path.points), "n_points": len(points)}
        if ts and ts[0] == 0.0 and ts[-1] == 1.0:
            for metric in ("loss", "token_error"):
                b = barriers(ts, [r[metric] for r in points])
                entry.update({f"{metric}_A": b["endpoints"][0], f"{metric}_B": b["endpoints"][1],
                              f"{metric}_barrier": b["linear"], f"{metric}_barrier_t": b["linear_t"],
                              f"{metric}_barrier_normalised": b["linear_normalised"],
                              f"{metric}_barrier_vs_mean": b["mean"], f"{metric}_barrier_vs_mean_t": b["mean_t"]})
            entry["endpoint_distance"] = distance(named, 0.0, 1.0)
            entry["path_length"] = sum(distance(named, a, b) for a, b in zip(ts, ts[1:]))
        table.append(entry)
    return table


def group_statistics(table: list[dict]) -> list[dict]:
    """Per group and quantity: n, mean, std (sample, n − 1; empty for n = 1), min and max over the
    group's complete paths."""
    out = []
    for group in dict.fromkeys(e["group"] for e in table):
        entries = [e for e in table if e["group"] == group and "loss_barrier" in e]
        for quantity in GROUP_QUANTITIES:
            values = [e[quantity] for e in entries if isinstance(e.get(quantity), float) and math.isfinite(e[quantity])]
            if values:
                out.append({"group": group, "quantity": quantity, **describe(values)})
    return out


def describe(values: list[float]) -> dict:
    """n, mean, std (sample, n − 1; None for n = 1), min and max; None where there are no values."""
    return {"n": len(values), "mean": statistics.fmean(values) if values else None,
            "std": statistics.stdev(values) if len(values) > 1 else None,
            "min": min(values) if values else None, "max": max(values) if values else None}


def write_csv(target: Path, rows: list[dict], fields: Iterable[str] | None = None) -> None:
    fields = list(fields) if fields is not None else list(dict.fromkeys(k for r in rows for k in r))
    with open(target, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in rows)


def _spread(stat: dict, digits: int = 4) -> str:
    std = f" ± {stat['std']:.{digits}f}" if stat["std"] is not None else ""
    return f"{stat['mean']:.{digits}f}{std} [{stat['min']:.{digits}f}, {stat['max']:.{digits}f}]"


def path_lines(table: list[dict]) -> list[str]:
    return [f"{e['group']:>16} | {e['path']}: loss barrier {e['loss_barrier']:.4f} at t={e['loss_barrier_t']:g} | "
            f"error barrier {e['token_error_barrier']:.4f} | distance {e['endpoint_distance']:.2f}, "
            f"length {e['path_length']:.2f}" for e in table if "loss_barrier" in e]


def group_lines(stats: list[dict]) -> list[str]:
    """One line per group: mean ± std [min, max] of the barriers and the distance."""
    lines = []
    for group in dict.fromkeys(s["group"] for s in stats):
        mine = {s["quantity"]: s for s in stats if s["group"] == group}
        parts = [f"{name} {_spread(mine[q])}" for q, name in (("loss_barrier", "loss barrier"),
                                                             ("token_error_barrier", "error barrier"),
                                                             ("endpoint_distance", "distance")) if q in mine]
        n = next(iter(mine.values()))["n"]
        lines.append(f"{'group':>16} | {group} (n={n}): " + " | ".join(parts))
    return lines


def plane_lines(planes: dict[str, list[dict]]) -> list[str]:
    lines = []
    for name, rows in planes.items():
        if not rows:
            continue
        at = {(r["alpha"], r["beta"]): r["loss"] for r in rows}
        low = min(rows, key=lambda r: r["loss"])
        corners = ", ".join(f"{name_} {at[c]:.4f}" for name_, c in (("A", (0.0, 0.0)), ("B", (1.0, 0.0)),
                                                                    ("C", (0.0, 1.0))) if c in at)
        lines.append(f"{'plane':>16} | {name}: loss {corners}; lowest {low['loss']:.4f} at "
                     f"(α, β) = ({low['alpha']:g}, {low['beta']:g})")
    return lines
