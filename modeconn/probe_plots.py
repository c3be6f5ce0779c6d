"""PNG plots of a probe batch: loss and error along the paths (endpoints marked), barriers by
path and their statistics by group, stable rank of every matrix along each path, spectra
histograms at chosen t, and loss and error over each plane (its three checkpoints marked)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from modeconn.paths import path_slug  # noqa: E402


def plot_all(files, paths, by_path: dict, table: list[dict], stats: list[dict], spectra_cfg, planes: dict) -> None:
    """`files`: the batch's file names (modeconn.probe_store.ProbeFiles)."""
    plots = files.plots
    plots.mkdir(parents=True, exist_ok=True)
    if stats:
        plot_groups(plots / "groups.png", stats)
    for name, rows in planes.items():
        if rows:
            plot_plane(plots / f"plane_{path_slug(name)}.png", name, rows)
    groups = list(dict.fromkeys(p.group for p in paths))
    for group in groups:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for p in (p for p in paths if p.group == group):
            rows = by_path[p.name]
            ts = [r["t"] for r in rows]
            for ax, metric in zip(axes, ("loss", "token_error")):
                line, = ax.plot(ts, [r[metric] for r in rows], marker=".", label=p.name)
                ends = [r for r in rows if r["t"] in (0.0, 1.0)]
                ax.scatter([r["t"] for r in ends], [r[metric] for r in ends], s=60, color=line.get_color(), zorder=3)
        for ax, label in zip(axes, ("validation loss (nats)", "token error")):
            ax.set_xlabel("t")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
        fig.suptitle(f"{group}: along each path (endpoints marked)")
        fig.tight_layout()
        fig.savefig(plots / f"paths_{path_slug(group)}.png", dpi=110)
        plt.close(fig)

    with_barriers = [e for e in table if "loss_barrier" in e]
    if with_barriers:
        fig, axes = plt.subplots(1, 2, figsize=(11, 0.5 * len(with_barriers) + 2))
        labels = [f"[{e['group']}] {e['path']}" for e in with_barriers]
        for ax, metric in zip(axes, ("loss_barrier", "token_error_barrier")):
            ax.barh(labels, [e[metric] for e in with_barriers])
            ax.set_xlabel(metric.replace("_", " "))
            ax.tick_params(axis="y", labelsize=7)
        axes[1].set_yticklabels([])
        fig.suptitle("barriers (against the line between endpoint values), by group")
        fig.tight_layout()
        fig.savefig(plots / "barriers.png", dpi=110)
        plt.close(fig)

    if not spectra_cfg.enabled:
        return
    for p in paths:
        rows = [r for r in by_path[p.name] if "spectra" in r]
        if not rows:
            continue
        fig, ax = plt.subplots(figsize=(7, 4))
        for matrix in rows[0]["spectra"]:
            ax.plot([r["t"] for r in rows], [r["spectra"][matrix]["stable_rank"] for r in rows], label=matrix, lw=1)
        ax.set_xlabel("t")
        ax.set_ylabel("stable rank ‖W‖F² / ‖W‖2²")
        ax.set_title(f"{p.name}: stable rank per matrix", fontsize=9)
        ax.legend(fontsize=6, ncol=3)
        fig.tight_layout()
        fig.savefig(plots / f"stable_rank_{path_slug(p.name)}.png", dpi=110)
        plt.close(fig)
        saved = [(t, files.spectra(p.name, t)) for t in spectra_cfg.histogram_at]
        saved = [(t, f) for t, f in saved if f.is_file()]
        if saved:
            fig, ax = plt.subplots(figsize=(7, 4))
            for t, f in saved:
                values = [v for s in load_file(str(f)).values() for v in s.tolist()]
                ax.hist(values, bins=60, histtype="step", label=f"t={t:g}")
            ax.set_xlabel("singular value (all matrices)")
            ax.set_ylabel("count")
            ax.set_title(f"{p.name}: spectra", fontsize=9)
            ax.legend()
            fig.tight_layout()
            fig.savefig(plots / f"spectra_{path_slug(p.name)}.png", dpi=110)
            plt.close(fig)


def plot_groups(target: Path, stats: list[dict]) -> None:
    """Mean ± std of the loss and error barriers and the endpoint distance per group of paths."""
    quantities = [("loss_barrier", "loss barrier (nats)"), ("token_error_barrier", "token error barrier"),
                  ("endpoint_distance", "endpoint distance ‖θB − θA‖")]
    groups = list(dict.fromkeys(s["group"] for s in stats))
    fig, axes = plt.subplots(1, len(quantities), figsize=(4.2 * len(quantities), 0.45 * len(groups) + 2.2))
    for ax, (quantity, label) in zip(axes, quantities):
        mine = {s["group"]: s for s in stats if s["quantity"] == quantity}
        ys = [i for i, g in enumerate(groups) if g in mine]
        means = [mine[groups[i]]["mean"] for i in ys]
        errors = [mine[groups[i]]["std"] or 0.0 for i in ys]
        ax.errorbar(means, ys, xerr=errors, fmt="o", capsize=4)
        for y in ys:  # the spread: min and max
            ax.plot([mine[groups[y]]["min"], mine[groups[y]]["max"]], [y, y], color="grey", lw=0.8, zorder=0)
        ax.set_yticks(range(len(groups)))
        ax.set_yticklabels([f"{g} (n={mine[g]['n']})" if g in mine else g for g in groups] if ax is axes[0] else [])
        ax.set_ylim(-0.5, len(groups) - 0.5)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle("by group of paths: mean ± std (bars), min to max (grey)")
    fig.tight_layout()
    fig.savefig(target, dpi=110)
    plt.close(fig)


def plot_plane(target: Path, name: str, rows: list[dict]) -> None:
    alphas, betas = sorted({r["alpha"] for r in rows}), sorted({r["beta"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, metric in zip(axes, ("loss", "token_error")):
        value = {(r["alpha"], r["beta"]): r[metric] for r in rows}
        grid = [[value.get((a, b), float("nan")) for a in alphas] for b in betas]
        filled = ax.contourf(alphas, betas, grid, levels=20, cmap="viridis")
        fig.colorbar(filled, ax=ax, label=metric.replace("_", " "))
        for (a, b), label in (((0, 0), "A"), ((1, 0), "B"), ((0, 1), "C")):
            ax.scatter([a], [b], color="white", edgecolor="black", zorder=3)
            ax.annotate(label, (a, b), textcoords="offset points", xytext=(5, 5), color="white")
        ax.set_xlabel("α (towards B)")
        ax.set_ylabel("β (towards C)")
    fig.suptitle(f"{name}: θA + α(θB − θA) + β(θC − θA)", fontsize=9)
    fig.tight_layout()
    fig.savefig(target, dpi=110)
    plt.close(fig)
