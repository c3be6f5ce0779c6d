"""Overhead of train.py (one process, ZeRO-0, fp32, CPU) over a bare PyTorch loop, and the time of
a checkpoint and of an export at gpt2 size.

    python benchmarks/train_overhead.py --data data/shakespeare [--presets tiny paper-small] [--steps 30]

The bare loop does what a minimal nanoGPT loop does with the same model, batches, AdamW parameter
groups, lr schedule and gradient clipping. train.py's step time is read from its metrics.jsonl
(logged every 5 steps, as runs log), so it includes everything the trainer does. Prints one JSON object;
ratio = train.py / bare (target <= 1.10).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from modeconn.data.loader import TokenWindows, TrainLoader
from modeconn.model import GPT, ModelConfig
from modeconn.optim import OptimConfig, build_optimizer
from modeconn.schedule import ScheduleConfig, lr_multiplier

ROOT = Path(__file__).resolve().parents[1]


LOG_EVERY = 5  # train.py's step time is measured over windows of this many steps, as a run logs


def train_py(preset: str, data: str, steps: int, micro_batch: int, out: Path, block_size: int,
             checkpoint_every: int = 0) -> list[dict]:
    cmd = [sys.executable, "train.py", "--config", "configs/train/tiny-adamw.yaml", f"--model.preset={preset}",
           f"--model.block_size={block_size}", "--model.dropout=0.0", f"--data.dir={data}", f"--out_dir={out}",
           f"--train.steps={steps}", f"--train.micro_batch={micro_batch}", f"--train.log_every={LOG_EVERY}",
           "--train.eval_every=0", f"--checkpoint.every={checkpoint_every}", "--data.val_windows=4",
           "--data.eval_batch_size=1", "--checkpoint.export_optimizer=false"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def bare_loop(preset: str, data: str, steps: int, micro_batch: int, block_size: int) -> list[float]:
    cfg = ModelConfig.from_preset(preset, block_size=block_size, dropout=0.0)
    torch.manual_seed(0)
    model = GPT(cfg)
    opt = build_optimizer(model, OptimConfig(lr=3e-3))
    sched = ScheduleConfig()
    loader = TrainLoader(TokenWindows(Path(data), "train", block_size), micro_batch, seed=0)
    times = []
    for step in range(steps):
        start = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = g["initial_lr"] * lr_multiplier(sched, step, steps)
        x, y = loader.next_batch()
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        times.append(time.perf_counter() - start)
    return times


def bench_overhead(preset: str, data: str, steps: int, micro_batch: int, block_size: int, rounds: int = 2) -> dict:
    """Alternate bare loop and train.py `rounds` times (machine noise hits both alike); medians of
    steady-state step times, the first third of each run left out as warm-up."""
    warm = steps // 3
    bare, ours = [], []
    for _ in range(rounds):
        bare += bare_loop(preset, data, steps, micro_batch, block_size)[warm:]
        with tempfile.TemporaryDirectory() as tmp:
            rows = [r for r in train_py(preset, data, steps, micro_batch, Path(tmp) / "run", block_size)
                    if r["kind"] == "train" and r["step"] > warm]
        ours += [micro_batch * block_size / r["tokens_per_s"] for r in rows]
    b, o = statistics.median(bare), statistics.median(ours)
    return {"preset": preset, "batch": [micro_batch, block_size], "steps": steps, "rounds": rounds,
            "train_py_step_s": round(o, 4), "bare_step_s": round(b, 4), "ratio": round(o / b, 3)}


def bench_checkpoint(data: str) -> dict:
    """gpt2 (124M) at context 256: one DeepSpeed checkpoint (weights + AdamW state) and one export."""
    with tempfile.TemporaryDirectory() as tmp:
        rows = train_py("gpt2", data, 2, 1, Path(tmp) / "run", 256, checkpoint_every=1)
        ckpt = [r["seconds"] for r in rows if r["kind"] == "checkpoint"]
        export = [r["seconds"] for r in rows if r["kind"] == "export"]
        ckpt_bytes = sum(f.stat().st_size for f in (Path(tmp) / "run" / "checkpoints").rglob("*") if f.is_file())
    return {"preset": "gpt2", "checkpoint_s": round(min(ckpt), 2), "checkpoints_kept_bytes": ckpt_bytes,
            "export_s": round(export[0], 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="data/shakespeare")
    ap.add_argument("--presets", nargs="+", default=["tiny", "paper-small"])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--micro-batch", type=int, default=8)
    args = ap.parse_args()
    blocks = {"tiny": 64}
    result = {
        "benchmark": "train_overhead", "date": time.strftime("%Y-%m-%d"), "machine": platform.machine(),
        "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "overhead": [bench_overhead(p, args.data, args.steps, args.micro_batch, blocks.get(p, 256))
                     for p in args.presets],
        "checkpoint": bench_checkpoint(args.data),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
