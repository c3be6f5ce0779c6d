"""probe.py at gpt2 size (random weights): memory and time of streamed path points, against a
plain evaluation of one model and against the naive way; and a batch of many pairs against
today's per-path probe.

    python benchmarks/probe.py --data data/shakespeare [--preset gpt2] [--val-windows 16] [--block 1024]
    python benchmarks/probe.py --many-pairs --data data/shakespeare [--batch-val-windows 4] [--batch-block 256]

Each measurement runs in its own process (so each peak RSS is its own):
- plain:  load one export with our loader, evaluate it on the validation batches;
- probe:  probe.py's Prober on the straight path between two exports, 3 points and 11 points,
          spectra off (time per point, peak RSS; flat in the number of points?);
- spectra: singular values and summaries of all block matrices of one model, ours (float64 Gram
          matrix, eigenvalues, batched by shape) and float64 SVD (the way before), at gpt2 and at
          paper-small size;
- naive:  the way public scripts do it: both state dicts in memory (GPT2LMHeadModel.from_pretrained
          twice), interpolate a third state dict, load it into a third model, evaluate; 3 points.
With --many-pairs (the probe at scale):
- batch-3, batch-6: the Prober on all pairs of 3 and of 6 checkpoints (3 and 15 pairs), 11 points
          each, spectra on: time per pair, evaluations, peak RSS (flat in the number of pairs?);
- per-path: today's per-path probe, kept here as the reference: each path on its own, its 11
          points each streamed and evaluated, endpoints included, with float64 SVD spectra, and its
          summary's distances (endpoint distance and the 10 steps of the path length, each streamed);
          run on the first `--per-path-pairs` pairs (its time per pair does not depend on how many).
Prints one JSON object with the ratios the issues set targets for.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss_split_mb() -> dict:
    """Resident memory now, split into anonymous (tensors) and file-backed (memory-mapped
    checkpoints: page cache the kernel can drop) — peak RSS counts both."""
    out = {}
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile"):
                out[f"{key.lower()}_mb_at_end"] = int(value.split()[0]) / 1024
    return out


def _batches(data: str, block: int, windows: int, batch: int):
    from modeconn.data.loader import TokenWindows, ValidationSet

    return list(ValidationSet(TokenWindows(Path(data), "val", block), windows).batches(batch))


def measure(kind: str, args, a: str, b: str) -> dict:
    import torch

    from modeconn.metrics import evaluate_lm

    torch.set_num_threads(os.cpu_count() or 1)
    batches = _batches(args.data, args.block, args.val_windows, args.batch)
    if kind == "plain":
        from modeconn.hf import load_model

        model = load_model(Path(a)).eval()
        start = time.perf_counter()
        evaluate_lm(lambda x: model(x)[0], batches)
        return {"seconds": time.perf_counter() - start, "peak_rss_mb": _peak_mb(), **_rss_split_mb()}
    if kind.startswith("probe"):
        from modeconn.config import DataConfig
        from modeconn.distributed import World
        from modeconn.probe import ProbeConfig, Prober, SpectraConfig

        points = int(kind.split("-")[1])
        with tempfile.TemporaryDirectory() as out:
            cfg = ProbeConfig(runs={"a": a, "b": b}, t_values=[i / (points - 1) for i in range(points)],
                              data=DataConfig(dir=args.data, val_windows=args.val_windows, eval_batch_size=args.batch),
                              spectra=SpectraConfig(enabled=False), plots=False, out_dir=out)
            prober = Prober(cfg, World(0, 1, 0, torch.device("cpu")))
            start = time.perf_counter()
            prober.run()
            total = time.perf_counter() - start
            rows = [json.loads(line) for line in (Path(out) / "results.jsonl").read_text().splitlines()]
        return {"points": points, "seconds_per_point": sum(r["seconds"] for r in rows) / len(rows),
                "seconds_total_with_summary": total, "peak_rss_mb": _peak_mb(), **_rss_split_mb()}
    if kind.startswith("spectra"):
        from modeconn.hf import load_model
        from modeconn.model import GPT, ModelConfig
        from modeconn.spectra import singular_values, summarize, svdvals_reference, weight_matrices

        if kind == "spectra":
            model = load_model(Path(a))
        else:  # spectra-<preset>: a fresh model of another size
            torch.manual_seed(0)
            model = GPT(ModelConfig.from_preset(kind.split("-", 1)[1]))
        out = {"matrices": len(weight_matrices(model))}
        for method in ("ours", "float64_svd"):
            best = math.inf
            for _ in range(2):  # best of 2: this shared machine's noise
                start = time.perf_counter()
                if method == "ours":
                    values = singular_values(model)
                else:
                    values = {k: svdvals_reference(w) for k, w in weight_matrices(model).items()}
                {k: summarize(v) for k, v in values.items()}
                best = min(best, time.perf_counter() - start)
            out[f"{method}_seconds"] = best
        return out
    if kind.startswith("batch-"):
        return _batch(args, int(kind.split("-")[1]), a)
    if kind == "per-path":
        return _per_path(args, a)
    if kind == "naive":
        from transformers import GPT2LMHeadModel

        ma, mb = GPT2LMHeadModel.from_pretrained(a), GPT2LMHeadModel.from_pretrained(b)
        sa, sb = ma.state_dict(), mb.state_dict()
        model = GPT2LMHeadModel.from_pretrained(a).eval()
        times = []
        for t in (0.0, 0.5, 1.0):
            start = time.perf_counter()
            model.load_state_dict({k: (1 - t) * sa[k] + t * sb[k] for k in sa})
            with torch.no_grad():
                evaluate_lm(lambda x: model(x).logits, batches)
            times.append(time.perf_counter() - start)
        return {"seconds_per_point": sum(times) / len(times), "peak_rss_mb": _peak_mb(), **_rss_split_mb()}
    raise ValueError(kind)


def _batch_exports(root: str, n: int) -> dict[str, str]:
    return {f"run{i}": str(Path(root) / f"run{i}") for i in range(n)}


def _batch(args, n: int, root: str) -> dict:
    """The Prober on all pairs of the first n checkpoints, 11 points, spectra on."""
    import torch

    from modeconn.config import DataConfig
    from modeconn.distributed import World
    from modeconn.probe import ProbeConfig, Prober

    with tempfile.TemporaryDirectory() as out:
        cfg = ProbeConfig(runs=_batch_exports(root, n), t_step=0.1, plots=False, out_dir=out,
                          data=DataConfig(dir=args.data, val_windows=args.batch_val_windows, eval_batch_size=args.batch))
        start = time.perf_counter()
        result = Prober(cfg, World(0, 1, 0, torch.device("cpu"))).run()
        total = time.perf_counter() - start
    pairs = n * (n - 1) // 2
    return {"checkpoints": n, "pairs": pairs, "points": pairs * 11, "evaluations": result["evaluations"],
            "seconds": total, "seconds_per_pair": total / pairs, "peak_rss_mb": _peak_mb()}


def _per_path(args, root: str) -> dict:
    """Today's per-path probe (before batches shared their checkpoints and spectra came from the
    Gram matrix), kept as the reference: every path alone, each of its 11 points streamed and
    evaluated, endpoints included, float64 SVD spectra with their summaries."""
    import torch

    from modeconn.data.loader import TokenWindows, ValidationSet
    from modeconn.metrics import batch_sums
    from modeconn.model import GPT
    from modeconn.paths import WeightPath
    from modeconn.spectra import summarize, svdvals_reference, weight_matrices
    from modeconn.stream import WeightSource, check_compatible, combine, load_point

    exports = _batch_exports(root, args.checkpoints)
    pairs = list(itertools.combinations(exports.values(), 2))[: args.per_path_pairs]
    start = time.perf_counter()
    for a, b in pairs:
        sources = [WeightSource(Path(a)), WeightSource(Path(b))]
        cfg = check_compatible(sources)
        model = GPT(cfg).eval()
        val = ValidationSet(TokenWindows(Path(args.data), "val", cfg.block_size), args.batch_val_windows)
        batches = list(val.batches(args.batch))
        line, ts = WeightPath("linear", (a, b)), [i / 10 for i in range(11)]
        for t in ts:
            with torch.no_grad():
                load_point(model, sources, line.coefficients(t))
                [batch_sums(model(x)[0], y) for x, y in batches]
                {k: summarize(svdvals_reference(w)) for k, w in weight_matrices(model).items()}
        # its summary: the endpoint distance and the path length, each step streamed as the probe did
        for t0, t1 in [(0.0, 1.0)] + list(zip(ts, ts[1:])):
            diff = [(0, line.coefficients(t1)[0][1] - line.coefficients(t0)[0][1]),
                    (1, line.coefficients(t1)[1][1] - line.coefficients(t0)[1][1])]
            sum(combine(sources, diff, name).double().square().sum().item() for name in sources[0].shapes)
    total = time.perf_counter() - start
    return {"pairs": len(pairs), "seconds": total, "seconds_per_pair": total / len(pairs), "peak_rss_mb": _peak_mb()}


def main_batch(args) -> None:
    import torch

    from modeconn.hf import save_hf
    from modeconn.model import GPT, ModelConfig

    cfg = ModelConfig.from_preset(args.preset, block_size=args.batch_block)
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.checkpoints):
            torch.manual_seed(seed)
            save_hf(GPT(cfg), cfg, Path(tmp) / f"run{seed}")

        def child(kind: str) -> dict:
            cmd = [sys.executable, __file__, "--data", args.data, "--preset", args.preset, "--many-pairs",
                   "--batch-val-windows", str(args.batch_val_windows), "--batch-block", str(args.batch_block),
                   "--batch", str(args.batch), "--checkpoints", str(args.checkpoints),
                   "--per-path-pairs", str(args.per_path_pairs), "--one", kind, tmp, tmp]
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            if proc.returncode:
                raise RuntimeError(proc.stderr[-3000:])
            return json.loads(proc.stdout.strip().splitlines()[-1])

        runs = {kind: child(kind) for kind in ("batch-3", f"batch-{args.checkpoints}", "per-path")}
    small, large, per_path = runs["batch-3"], runs[f"batch-{args.checkpoints}"], runs["per-path"]
    print(json.dumps({
        "benchmark": "probe-batch", "preset": args.preset,
        "validation": {"windows": args.batch_val_windows, "block": args.batch_block, "batch": args.batch},
        "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "runs": runs,
        "ratios": {
            "per_path_seconds_per_pair_over_batch": per_path["seconds_per_pair"] / large["seconds_per_pair"],
            "batch_peak_rss_15_pairs_over_3_pairs": large["peak_rss_mb"] / small["peak_rss_mb"],
        },
    }, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="data/shakespeare")
    parser.add_argument("--preset", default="gpt2")
    parser.add_argument("--block", type=int, default=1024)
    parser.add_argument("--val-windows", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--many-pairs", action="store_true", help="the batch benchmark (all pairs, spectra on)")
    parser.add_argument("--batch-val-windows", type=int, default=4)
    parser.add_argument("--batch-block", type=int, default=256)
    parser.add_argument("--checkpoints", type=int, default=6)
    parser.add_argument("--per-path-pairs", type=int, default=3)
    parser.add_argument("--one", nargs=3, metavar=("KIND", "A", "B"), help=argparse.SUPPRESS)  # child process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], args, args.one[1], args.one[2])))
        return
    if args.many_pairs:
        main_batch(args)
        return

    import torch

    from modeconn.hf import save_hf
    from modeconn.model import GPT, ModelConfig

    cfg = ModelConfig.from_preset(args.preset, block_size=args.block)
    with tempfile.TemporaryDirectory() as tmp:
        exports = []
        for seed in (0, 1):
            torch.manual_seed(seed)
            save_hf(GPT(cfg), cfg, Path(tmp) / f"run{seed}")
            exports.append(str(Path(tmp) / f"run{seed}"))
        model_mb = sum(p.numel() for p in GPT(cfg).parameters()) * 4 / 2 ** 20

        def child(kind: str) -> dict:
            cmd = [sys.executable, __file__, "--data", args.data, "--preset", args.preset, "--block", str(args.block),
                   "--val-windows", str(args.val_windows), "--batch", str(args.batch), "--one", kind, *exports]
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            if proc.returncode:
                raise RuntimeError(proc.stderr[-3000:])
            return json.loads(proc.stdout.strip().splitlines()[-1])

        runs = {kind: child(kind) for kind in ("plain", "probe-3", "probe-11", "spectra", "spectra-paper-small",
                                               "naive")}
    plain, p3, p11, naive = runs["plain"], runs["probe-3"], runs["probe-11"], runs["naive"]
    result = {
        "benchmark": "probe", "preset": args.preset, "model_mb_fp32": model_mb,
        "validation": {"windows": args.val_windows, "block": args.block, "batch": args.batch},
        "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "runs": runs,
        "ratios": {
            "probe_peak_rss_11_points_over_3_points": p11["peak_rss_mb"] / p3["peak_rss_mb"],
            "probe_peak_rss_over_plain_evaluation": p11["peak_rss_mb"] / plain["peak_rss_mb"],
            "probe_extra_rss_over_model_bytes": (p11["peak_rss_mb"] - plain["peak_rss_mb"]) / model_mb,
            "probe_time_per_point_over_plain_evaluation": p11["seconds_per_point"] / plain["seconds"],
            "naive_time_per_point_over_probe": naive["seconds_per_point"] / p11["seconds_per_point"],
            "naive_peak_rss_over_probe": naive["peak_rss_mb"] / p11["peak_rss_mb"],
        },
        "spectra_seconds_per_checkpoint": runs["spectra"]["ours_seconds"],
        "spectra_float64_svd_over_ours": runs["spectra"]["float64_svd_seconds"] / runs["spectra"]["ours_seconds"],
        "spectra_paper_small_ours_over_float64_svd": (runs["spectra-paper-small"]["ours_seconds"]
                                                      / runs["spectra-paper-small"]["float64_svd_seconds"]),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
