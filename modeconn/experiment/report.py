"""The experiment's report, from what its commands wrote: reports/<name>/report.md, results.json
and PNGs.

- Table 1 of the seed study: a row per dataset; for each pair of optimizers (AdamW–AdamW,
  Muon–Muon, AdamW–Muon) the straight-line loss barrier (every unaligned pair), the aligned one
  (independent inits, aligned) and the fitted chain's, as mean ± std over pairs, with n;
- every run's final validation loss and token error;
- the spectral figure: the stable rank of each block matrix along AdamW→Muon and same-optimizer
  paths, the study's matrix (report.highlight, h.1.fc) drawn bold, and each optimizer's band;
- the loss along the paths;
- a verdict per claim (reproduced / partly / not reproduced), judged against report.thresholds.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
import time
from pathlib import Path

from modeconn.atomic import atomic_write_text
from modeconn.experiment.plan import Plan
from modeconn.hf import read_meta
from modeconn.probe_store import read_rows
from modeconn.probe_summary import describe
from modeconn.verdicts import verdict

KINDS = ("linear", "aligned", "chain")  # the table's three barriers per pair of optimizers


def _summary(path: Path) -> dict[str, dict]:
    with open(path, newline="") as f:
        return {r["path"]: r for r in csv.DictReader(f)}


def _cell(stat: dict) -> str:
    if not stat["n"]:
        return "–"
    std = f" ± {stat['std']:.3f}" if stat["std"] is not None else ""
    return f"{stat['mean']:.3f}{std} (n={stat['n']})"


def _monotone(values: list[float], slack: float) -> bool:
    """Rises from the first value to the last, each dip at most `slack` of the whole rise."""
    rise = values[-1] - values[0]
    if rise <= 0:
        return False
    peak = values[0]
    for v in values:
        if peak - v > slack * rise:
            return False
        peak = max(peak, v)
    return True


def _commit() -> str | None:
    """The checkout's commit (with -dirty when files differ from it); None outside a git checkout."""
    import subprocess

    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


class Report:
    def __init__(self, plan: Plan):
        self.plan, self.spec = plan, plan.spec
        self.thresholds = self.spec.report.thresholds
        self.highlight = self.spec.report.highlight
        self.rows: dict[str, dict[str, list[dict]]] = {}  # dataset -> path -> its rows by t (read once, in build)

    def _path_data(self, dataset: str) -> tuple[dict[str, dict], dict[str, list[dict]]]:
        """summary.csv by path name; each path's rows sorted by t."""
        folder = self.plan.probe_dir(dataset)
        summary = _summary(folder / "summary.csv")
        rows: dict[str, list[dict]] = {}
        for r in read_rows(folder / "results.jsonl"):
            if "t" in r:
                rows.setdefault(r["path"], []).append(r)
        self.rows[dataset] = {k: sorted(v, key=lambda r: r["t"]) for k, v in rows.items()}  # the figures' too
        return summary, self.rows[dataset]

    def build(self) -> dict:
        spec, plan = self.spec, self.plan
        results = {"experiment": spec.name, "datasets": {}, "runs": [], "claims": {}}
        for run in plan.runs:
            meta = read_meta(plan.final(run))
            results["runs"].append({"dataset": run.dataset, "run": run.name, "optimizer": run.optimizer,
                                    "seed_init": run.init, "seed_data": run.data, "steps": meta.get("step"),
                                    "val_loss": meta.get("val_loss"), "val_token_error": meta.get("val_token_error")})
        for dataset in spec.datasets:
            summary, rows = self._path_data(dataset)
            columns: dict[str, dict[str, list[float]]] = {}
            for pair in (p for p in plan.pairs if p.dataset == dataset):
                column = columns.setdefault(pair.optimizers, {kind: [] for kind in KINDS})
                for kind, name in (("linear", pair.name), ("aligned", f"{pair.name}:aligned"),
                                   ("chain", f"{pair.name}:chain")):
                    if name in summary and summary[name].get("loss_barrier"):
                        column[kind].append(float(summary[name]["loss_barrier"]))
            table = {col: {kind: describe(v) for kind, v in by_kind.items()} for col, by_kind in columns.items()}
            ranks = {name: [r["spectra"][self.highlight]["stable_rank"] for r in path_rows]
                     for name, path_rows in rows.items() if path_rows and "spectra" in path_rows[0]}
            results["datasets"][dataset] = {
                "table": table,
                "paths": {name: {"t": [r["t"] for r in path_rows], "loss": [r["loss"] for r in path_rows],
                                 "stable_rank": ranks.get(name)} for name, path_rows in rows.items()},
                "loss_barriers": {name: float(e["loss_barrier"]) for name, e in summary.items() if e.get("loss_barrier")},
                "endpoint_stable_rank": self._endpoint_ranks(dataset, rows)}
        results["claims"] = self._claims(results)
        return results

    def _endpoint_ranks(self, dataset: str, rows: dict[str, list[dict]]) -> dict[str, float]:
        """The highlighted matrix's stable rank of every run, from its rows at t = 0 or 1."""
        out = {}
        for run in (r for r in self.plan.runs if r.dataset == dataset):
            final = str(self.plan.final(run))
            for path_rows in rows.values():
                hit = next((r for r in path_rows if r.get("checkpoint") == final and "spectra" in r), None)
                if hit:
                    out[run.name] = hit["spectra"][self.highlight]["stable_rank"]
                    break
        return out

    def _bands(self, dataset: str, results: dict) -> dict[str, tuple[float, float]]:
        ranks = results["datasets"][dataset]["endpoint_stable_rank"]
        bands = {}
        for optimizer in self.spec.optimizers:
            mine = [v for name, v in ranks.items() if name.startswith(f"{optimizer}-")]
            if mine:
                bands[optimizer] = (min(mine), max(mine))
        return bands

    def _claims(self, results: dict) -> dict:
        th, claims = self.thresholds, {}
        same = [f"{o}--{o}" for o in self.spec.optimizers]
        cross_pairs = [p for p in self.plan.pairs if p.kind == "cross"]

        def per_dataset(fn) -> dict:
            return {d: fn(d, results["datasets"][d]) for d in self.spec.datasets}

        def chains(d, data):
            values = {col: data["table"].get(col, {}).get("chain", {"n": 0}) for col in same}
            parts = {f"{col}: fitted-chain loss barrier {_cell(v)} < {th.connected}":
                     v["n"] > 0 and v["max"] < th.connected for col, v in values.items() if v["n"]}
            return parts
        claims["chain"] = self._claim("A learned polygonal chain connects same-optimizer solutions (study: "
                                      "0.04-0.06 AdamW, 0.01-0.06 Muon, against 0.26-0.45 / 0.18-0.43 straight)",
                                      per_dataset(chains))

        def alignment(d, data):
            parts = {}
            for col in same:
                cell = data["table"].get(col)
                if cell and cell["aligned"]["n"]:
                    plain = statistics.fmean([data["loss_barriers"][p.name] for p in self.plan.pairs
                                              if p.dataset == d and p.kind == "init" and p.optimizers == col])
                    parts[f"{col}: aligned {cell['aligned']['mean']:.3f} <= {th.aligned_ratio} x straight "
                          f"{plain:.3f} (independent inits)"] = cell["aligned"]["mean"] <= th.aligned_ratio * plain
            return parts
        claims["alignment"] = self._claim("Aligning independent inits lowers the straight-line barrier", per_dataset(alignment))

        def stable_rank(d, data):
            bands, parts = self._bands(d, results), {}
            for first, second in self.spec.pairs.cross:
                if first in bands and second in bands:
                    a, b = statistics.fmean(bands[first]), statistics.fmean(bands[second])
                    parts[f"{self.highlight} stable rank {self.spec.label(second)} {b:.1f} / {self.spec.label(first)} "
                          f"{a:.1f} = {b / a:.2f} >= {th.stable_rank_ratio}"] = b / a >= th.stable_rank_ratio
            return parts
        claims["stable_rank"] = self._claim(f"Muon's {self.highlight} has a higher stable rank than AdamW's (study: "
                                            f"≈ 140 vs ≈ 60)", per_dataset(stable_rank))

        def rises(d, data):
            parts = {}
            for pair in (p for p in cross_pairs if p.dataset == d):
                values = data["paths"].get(pair.name, {}).get("stable_rank")
                if values:
                    parts[f"{pair.name}: {values[0]:.1f} -> {values[-1]:.1f}, monotone within {th.monotone_slack:.0%}"] = \
                        _monotone(values, th.monotone_slack)
            return parts
        claims["monotone"] = self._claim(f"Along AdamW→Muon paths the {self.highlight} stable rank rises monotonically "
                                         f"(study: 60.6 → 139.9)", per_dataset(rises))

        def flat_loss(d, data):
            return {f"{p.name}: loss barrier {data['loss_barriers'][p.name]:.3f} < {th.cross_loss_barrier}":
                    data["loss_barriers"][p.name] < th.cross_loss_barrier for p in cross_pairs
                    if p.dataset == d and p.name in data["loss_barriers"]}
        claims["cross_loss"] = self._claim("The loss barely moves along AdamW→Muon paths (study: 3.51 → max 3.55 → 3.48)",
                                           per_dataset(flat_loss))

        def bands(d, data):
            limits, parts = self._bands(d, results), {}
            for pair in (p for p in self.plan.pairs if p.dataset == d and p.kind != "cross"):
                values = data["paths"].get(pair.name, {}).get("stable_rank")
                low, high = limits.get(pair.a.optimizer, (math.nan, math.nan))
                if values and math.isfinite(low):
                    slack = th.band_slack * max(high - low, 1e-9 + 0.01 * high)
                    parts[f"{pair.name}: {min(values):.1f}..{max(values):.1f} within {low:.1f}..{high:.1f} "
                          f"± {slack:.1f}"] = low - slack <= min(values) and max(values) <= high + slack
            return parts
        claims["bands"] = self._claim("Same-optimizer paths stay inside their optimizer's stable-rank band",
                                      per_dataset(bands))

        def fair(d, data):
            finals = {o: [r["val_loss"] for r in results["runs"] if r["dataset"] == d and r["optimizer"] == o
                          and r["val_loss"] is not None] for o in self.spec.optimizers}
            parts = {}
            for first, second in self.spec.pairs.cross:
                if finals.get(first) and finals.get(second):
                    a, b = statistics.fmean(finals[first]), statistics.fmean(finals[second])
                    gap = abs(a - b) / min(a, b)
                    parts[f"final val loss {self.spec.label(first)} {a:.3f} vs {self.spec.label(second)} {b:.3f}: "
                          f"{gap:.1%} apart <= {th.loss_gap:.0%}"] = gap <= th.loss_gap
            return parts
        claims["fair"] = self._claim("The optimizers are compared at a similar loss (a precondition, not a claim of "
                                     "the study)", per_dataset(fair))
        return claims

    @staticmethod
    def _claim(text: str, by_dataset: dict[str, dict]) -> dict:
        parts = {f"{d}: {k}": v for d, p in by_dataset.items() for k, v in p.items()}
        return {"claim": text, "verdict": verdict(list(parts.values())) if parts else "not measured",
                "parts": parts}

    # --- writing -----------------------------------------------------------------------------------

    def write(self) -> Path:
        results = self.build()
        out = self.spec.report_path
        out.mkdir(parents=True, exist_ok=True)
        figures = {d: self._figures(d, results, out) for d in self.spec.datasets}
        results["generated"] = time.strftime("%Y-%m-%d")
        results["commit"] = _commit()
        if self.plan.log.is_file():  # every command's wall time, over however many invocations it took
            results["wall_seconds"] = round(sum(json.loads(line)["seconds"] for line in
                                                self.plan.log.read_text().splitlines() if line.strip()), 1)
        atomic_write_text(out / "results.json", json.dumps(results, indent=1))
        atomic_write_text(out / "report.md", self._markdown(results, figures))
        return out

    def _markdown(self, results: dict, figures: dict) -> str:
        spec, label = self.spec, self.spec.label
        columns = list(dict.fromkeys(c for d in results["datasets"].values() for c in d["table"]))

        def title(col: str) -> str:
            a, b = col.split("--")
            return f"{label(a)}–{label(b)}"
        lines = [f"# {spec.name}: optimizer-induced mode connectivity", "",
                 f"Generated by `python experiment.py --config <spec>` on {results['generated']}"
                 + (f" at commit {results['commit']}" if results.get("commit") else "")
                 + (f" ({results['wall_seconds'] / 60:.0f} min of commands on this machine)"
                    if "wall_seconds" in results else "")
                 + ". Every number below comes from the files the experiment wrote (`results.json` holds them all).",
                 "", "## Claims", "", "| claim | verdict |", "|---|---|"]
        lines += [f"| {c['claim']} | **{c['verdict']}** |" for c in results["claims"].values()]
        lines += ["", "## Table 1: loss barriers (against the line between the endpoints' losses)", "",
                  "Straight: every unaligned pair (other data order, other init, other optimizer from the same init); "
                  "aligned: independent inits after align.py; chain: the fitted polygonal chain. Mean ± std over "
                  "pairs (n).", "",
                  "| dataset | " + " | ".join(f"{title(c)} {k}" for c in columns for k in KINDS) + " |",
                  "|---|" + "---|" * (len(columns) * len(KINDS))]
        for d, data in results["datasets"].items():
            cells = [_cell(data["table"][c][k]) if c in data["table"] else "–" for c in columns for k in KINDS]
            lines.append(f"| {d} | " + " | ".join(cells) + " |")
        lines += ["", "## Runs", "", "| dataset | run | optimizer | seed.init | seed.data | steps | val loss | "
                  "val token error |", "|---|---|---|---|---|---|---|---|"]
        for r in results["runs"]:
            loss = f"{r['val_loss']:.4f}" if r["val_loss"] is not None else "–"
            err = f"{r['val_token_error']:.4f}" if r["val_token_error"] is not None else "–"
            lines.append(f"| {r['dataset']} | {r['run']} | {label(r['optimizer'])} | {r['seed_init']} | "
                         f"{r['seed_data']} | {r['steps']} | {loss} | {err} |")
        for d, files in figures.items():
            lines += ["", f"## {d}: spectra and loss along the paths", ""]
            lines += [f"![{name}]({file})" for name, file in files.items()]
        lines += ["", "## Verdicts in detail", ""]
        for c in results["claims"].values():
            lines += [f"**{c['claim']}: {c['verdict']}**", ""]
            lines += [f"- {part}: {'yes' if ok else 'no'}" for part, ok in c["parts"].items()] + [""]
        th = self.thresholds
        lines += ["Thresholds (report.thresholds in the spec): " + ", ".join(
            f"{k} {getattr(th, k)}" for k in th.__dataclass_fields__) + "."]
        return "\n".join(lines) + "\n"

    def _figures(self, dataset: str, results: dict, out: Path) -> dict[str, str]:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        data, files = results["datasets"][dataset], {}
        bands = self._bands(dataset, results)
        cross = [p for p in self.plan.pairs if p.dataset == dataset and p.kind == "cross"]
        same = [p for p in self.plan.pairs if p.dataset == dataset and p.kind != "cross"]
        groups = [("AdamW→Muon paths" if cross and cross[0].a.optimizer == "adamw" else "cross-optimizer paths", cross),
                  ("same-optimizer paths", same)]
        fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), sharey=True)
        for ax, (title, pairs) in zip(axes, groups):
            for pair in pairs:
                path_rows = [r for r in self.rows[dataset].get(pair.name, []) if "spectra" in r]
                if not path_rows:
                    continue
                ts = [r["t"] for r in path_rows]
                for matrix in path_rows[0]["spectra"]:
                    bold = matrix == self.highlight
                    ax.plot(ts, [r["spectra"][matrix]["stable_rank"] for r in path_rows],
                            color="C3" if bold else "grey", lw=2.2 if bold else 0.5, alpha=1.0 if bold else 0.35,
                            zorder=3 if bold else 1)
            for i, (optimizer, (low, high)) in enumerate(bands.items()):
                ax.axhspan(low, high, color=f"C{i}", alpha=0.15, label=f"{self.spec.label(optimizer)} band")
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("t")
            ax.grid(alpha=0.3)
        axes[0].set_ylabel(f"stable rank (bold: {self.highlight})")
        axes[0].legend(fontsize=8)
        fig.suptitle(f"{dataset}: stable rank of every block matrix along the paths")
        fig.tight_layout()
        files["spectra"] = f"spectra_{dataset}.png"
        fig.savefig(out / files["spectra"], dpi=110)
        plt.close(fig)

        fig, ax = plt.subplots(figsize=(8, 4.5))
        colours = {}
        for name, path in data["paths"].items():
            kind = "chain" if name.endswith(":chain") else "aligned" if name.endswith(":aligned") else "straight"
            pair = next((p for p in self.plan.pairs if p.name == name.split(":")[0]), None)
            key = f"{pair.optimizers if pair else '?'} {kind}"
            colour = colours.setdefault(key, f"C{len(colours)}")
            ax.plot(path["t"], path["loss"], color=colour, lw=1, label=key if key not in ax.get_legend_handles_labels()[1]
                    else None)
        ax.set(xlabel="t", ylabel="validation loss (nats)", title=f"{dataset}: loss along the paths")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        files["loss"] = f"loss_{dataset}.png"
        fig.savefig(out / files["loss"], dpi=110)
        plt.close(fig)
        return files
