"""probe.py at gpt2 size (random weights): memory and time of streamed path points, against a
plain evaluation of one model and against the naive way.

    python benchmarks/probe.py --data data/shakespeare [--preset gpt2] [--val-windows 16] [--block 1024]

Each measurement runs in its own process (so each peak RSS is its own):
- plain:  load one export with our loader, evaluate it on the validation batches;
- probe:  probe.py's Prober on the straight path between two exports, 3 points and 11 points,
          spectra off (time per point, peak RSS; flat in the number of points?);
- spectra: singular values and summaries of all block matrices of one model;
- naive:  the way public scripts do it: both state dicts in memory (GPT2LMHeadModel.from_pretrained
          twice), interpolate a third state dict, load it into a third model, evaluate; 3 points.
Prints one JSON object with the ratios the issue sets targets for.
"""

from __future__ import annotations

import argparse
import json
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
    if kind == "spectra":
        from modeconn.hf import load_model
        from modeconn.spectra import singular_values, summarize

        model = load_model(Path(a))
        start = time.perf_counter()
        values = singular_values(model)
        {k: summarize(v) for k, v in values.items()}
        return {"seconds": time.perf_counter() - start, "matrices": len(values)}
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="data/shakespeare")
    parser.add_argument("--preset", default="gpt2")
    parser.add_argument("--block", type=int, default=1024)
    parser.add_argument("--val-windows", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--one", nargs=3, metavar=("KIND", "A", "B"), help=argparse.SUPPRESS)  # child process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], args, args.one[1], args.one[2])))
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

        runs = {kind: child(kind) for kind in ("plain", "probe-3", "probe-11", "spectra", "naive")}
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
        "spectra_seconds_per_checkpoint": runs["spectra"]["seconds"],
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
