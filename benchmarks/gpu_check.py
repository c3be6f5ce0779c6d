"""The GPU validation in one go (issue "GPU validation"): bf16 training, MFU, Muon overhead, compile,
NS accuracy, probe speed and exact resume on one H100/H200, written to one JSON file.

    python benchmarks/gpu_check.py OUT_DIR              # on the GPU machine (benchmarks/gpu_check.sh)
    python benchmarks/gpu_check.py OUT_DIR --cpu-smoke  # the same steps on tiny, on the CPU, in seconds

Every figure comes from the product itself: train.py runs (their metrics.jsonl: tokens/s, MFU),
probe.py (its rows' seconds), modeconn.spectra and modeconn.optim.muon. Sections run in order,
each within its own try, and OUT_DIR/gpu_check.json is rewritten after each one, so a section that
breaks (or a run cut by the time limit) leaves the others' figures and its own error line.
- micro_batch: the largest micro-batch of gpt2 x 1024 that fits, from the peak memory of a
  forward/backward at two small batches (linear in the batch) plus the optimizer's 16 bytes per
  parameter; train runs fall back to smaller ones if they still run out of memory.
- train: gpt2-124M, bf16, ZeRO-1, 1 GPU: AdamW compile off and on; Muon (compile on) with NS in
  bf16 (standard) and in fp16 (Gram). tokens/s and MFU = tokens/s x (6N + 12 L d T) / peak, peak
  the device's bf16 dense figure (train.py's table); Muon's overhead = its step time over AdamW's.
- ns_error: NS of every block matrix of the trained export, bf16 standard / fp16 Gram / fp32,
  against the exact NS polynomial of its float64 singular values (relative Frobenius error).
- probe: seconds per point of the straight path between the AdamW and Muon exports (spectra off),
  and the spectra of one checkpoint: ours (float64 Gram, CPU) and torch's svdvals on the GPU.
- resume: tiny, bf16, 20 steps, stopped after 10 and resumed, against an unbroken run: bitwise?
The smoke test runs each on tiny in fp32 with fewer steps (6; resume stopped after 3), compile off.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402


class Check:
    """The settings of a full check and of the CPU smoke test, side by side."""

    def __init__(self, smoke: bool, data: str, out: Path):
        self.smoke, self.data, self.out = smoke, data, out
        self.device = "cpu" if smoke else "cuda"
        self.preset = "tiny" if smoke else "gpt2"
        self.block = 64 if smoke else 1024
        self.precision = "fp32" if smoke else "bf16"  # bf16 on CPU is ~100x slower than fp32
        self.steps = 6 if smoke else 40
        self.resume_steps = 6 if smoke else 20
        self.log_every = 2 if smoke else 5
        self.compile = not smoke  # torch.compile is a GPU figure; the smoke test checks the plumbing
        self.val_windows = 4 if smoke else 64
        self.eval_batch = 2 if smoke else 16
        self.results: dict = {"smoke": smoke, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "errors": {}}

    def save(self) -> None:
        path = self.out / "gpu_check.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.results, indent=1))
        os.replace(tmp, path)


def environment() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "host": platform.node(), "cpus": os.cpu_count()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, memory_gib=round(props.total_memory / 2 ** 30, 1),
                    capability=f"{props.major}.{props.minor}", bf16_supported=torch.cuda.is_bf16_supported())
    for module in ("deepspeed", "transformers", "safetensors", "tiktoken"):
        try:
            info[module] = __import__(module).__version__
        except Exception as e:  # recorded, not fatal: the sections that need it say so
            info[module] = f"missing ({e})"
    return info


def micro_batch(check: Check) -> dict:
    """Peak memory of one bf16 forward/backward at batch 2 and 4 gives memory per window; add the
    optimizer's fp32 master, moments and gradient partition (16 bytes per parameter) and a 10 %
    margin, and take the largest candidate that fits."""
    from modeconn.model import GPT, ModelConfig

    if check.smoke:
        return {"micro_batch": 2, "candidates": [2], "note": "smoke: fixed"}
    model = GPT(ModelConfig.from_preset(check.preset, block_size=check.block)).cuda().to(torch.bfloat16)
    peaks = {}
    for batch in (2, 4):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        x = torch.randint(0, model.config.vocab_size, (batch, check.block), device="cuda")
        _, loss = model(x, x)
        loss.backward()
        model.zero_grad(set_to_none=True)
        peaks[batch] = torch.cuda.max_memory_allocated()
    per_window = (peaks[4] - peaks[2]) / 2
    fixed = peaks[2] - 2 * per_window + 16 * model.num_parameters()
    total = torch.cuda.get_device_properties(0).total_memory
    candidates = [b for b in (128, 96, 64, 48, 32, 24, 16) if fixed + b * per_window <= 0.9 * total]
    del model
    torch.cuda.empty_cache()
    return {"micro_batch": candidates[0] if candidates else 16, "candidates": candidates or [16],
            "gib_per_window": per_window / 2 ** 30, "fixed_gib": fixed / 2 ** 30}


def train_py(check: Check, name: str, keys: dict, batches: list[int]) -> dict:
    """One train.py run; the first micro-batch of `batches` that fits. Steady-state figures are the
    medians of the logged windows after the first two (compile and warm-up)."""
    base = {"model.preset": check.preset, "model.block_size": check.block, "model.dropout": 0.0,
            "data.dir": check.data, "data.val_windows": check.val_windows,
            "data.eval_batch_size": check.eval_batch, "deepspeed.zero_stage": 1,
            "deepspeed.precision": check.precision, "train.steps": check.steps, "train.log_every": check.log_every,
            "train.eval_every": 0, "checkpoint.every": 0, "checkpoint.export_init": False,
            "checkpoint.export_optimizer": False, "seed.init": 0, "seed.data": 0}
    config = keys.pop("config", "configs/train/tiny-adamw.yaml")
    failures = []
    for batch in batches:
        out = check.out / "runs" / f"{name}-mb{batch}"
        argv = [sys.executable, "train.py", "--config", config,
                *(f"--{k}={v}" for k, v in {**base, "train.micro_batch": batch, **keys, "out_dir": out}.items())]
        start = time.perf_counter()
        proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if proc.returncode == 0:
            break
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        failures.append({"micro_batch": batch, "status": proc.returncode, "tail": tail})
        if "out of memory" not in (proc.stderr + proc.stdout).lower():
            raise RuntimeError(f"{name}: train.py exited {proc.returncode}: {' | '.join(tail)}")
    else:
        raise RuntimeError(f"{name}: every micro-batch ran out of memory: {failures}")
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steady = [r for r in logs if r.get("kind") == "train"][2:] or [r for r in logs if r.get("kind") == "train"]
    tokens_per_s = statistics.median(r["tokens_per_s"] for r in steady)
    tokens_per_step = batch * check.block
    row = {"micro_batch": batch, "tokens_per_s": tokens_per_s, "step_seconds": tokens_per_step / tokens_per_s,
           "final_loss": steady[-1]["loss"], "wall_seconds": wall, "out_dir": str(out), "oom_retries": failures}
    if all("mfu" in r for r in steady):
        row["mfu"] = statistics.median(r["mfu"] for r in steady)
    return row


def train(check: Check) -> dict:
    batches = [b for b in check.results["micro_batch"]["candidates"]]
    compile_on = {"train.compile": check.compile}
    muon = {"config": "configs/train/tiny-muon.yaml", **compile_on}
    runs = {"adamw_compile_off": {"train.compile": False},
            "adamw_compile_on": dict(compile_on),
            "muon_bf16_standard": {**muon, "optim.muon.ns_method": "standard", "optim.muon.ns_dtype":
                                   "float32" if check.smoke else "bfloat16"},
            "muon_fp16_gram": {**muon, "optim.muon.ns_method": "gram", "optim.muon.ns_dtype":
                               "float32" if check.smoke else "float16"}}
    out = {}
    if not check.compile:  # the smoke test: compile on would be the compile-off run again
        out["adamw_compile_on"] = {"skipped": "torch.compile is measured on the GPU only"}
        del runs["adamw_compile_on"]
    for name, keys in runs.items():
        try:
            out[name] = train_py(check, name, keys, batches)
            batches = [b for b in batches if b <= out[name]["micro_batch"]]  # what fits once fits again
        except Exception as e:
            check.results["errors"][f"train.{name}"] = str(e)
        check.results["train"] = out
        check.save()
    adamw = out.get("adamw_compile_on") if check.compile else out.get("adamw_compile_off")
    for name in ("muon_bf16_standard", "muon_fp16_gram"):
        if adamw and name in out:
            same_batch = out[name]["micro_batch"] == adamw["micro_batch"]
            out[name]["overhead_over_adamw"] = (out[name]["step_seconds"] / adamw["step_seconds"] - 1
                                                if same_batch else None)
    if check.compile and "adamw_compile_off" in out and adamw:
        out["compile_speedup"] = adamw["tokens_per_s"] / out["adamw_compile_off"]["tokens_per_s"]
    out["targets"] = {"mfu_adamw_compile_at_least": 0.50, "muon_overhead_at_most": 0.01}
    return out


def ns_error(check: Check) -> dict:
    """NS of each block matrix of the trained export against the exact polynomial of its float64
    singular values: U p(...p(s / ||s||)) V^T, p(x) = a x + b x^3 + c x^5."""
    from modeconn.hf import load_model
    from modeconn.optim.newton_schulz import DEFAULT_COEFFICIENTS, gram_newton_schulz, newton_schulz
    from modeconn.spectra import weight_matrices

    export = Path(check.results["train"]["adamw_compile_off"]["out_dir"]) / "final"
    matrices = weight_matrices(load_model(export))
    a, b, c = DEFAULT_COEFFICIENTS
    forms = {"bf16_standard": (newton_schulz, torch.bfloat16), "fp16_gram": (gram_newton_schulz, torch.float16),
             "fp32_standard": (newton_schulz, torch.float32)}
    errors: dict[str, list[float]] = {form: [] for form in forms}
    for w in matrices.values():
        w = w.to(check.device)
        u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
        x = s / s.norm()
        for _ in range(5):
            x = a * x + b * x ** 3 + c * x ** 5
        exact = (u * x) @ vh
        for form, (fn, dtype) in forms.items():
            got = fn(w.float(), 5, DEFAULT_COEFFICIENTS, 1e-7, dtype).double()
            errors[form].append(((got - exact).norm() / exact.norm()).item())
    return {"matrices": len(matrices), "export": str(export),
            **{form: {"max": max(v), "median": statistics.median(v)} for form, v in errors.items()}}


def probe(check: Check) -> dict:
    """probe.py on the straight path AdamW export -> Muon export, 5 points, spectra off; then the
    spectra of one checkpoint, ours and torch's svdvals on the device."""
    from modeconn.hf import load_model
    from modeconn.spectra import singular_values, summarize, weight_matrices

    runs = check.results["train"]
    a = Path(runs["adamw_compile_off"]["out_dir"]) / "final"
    b = Path(runs["muon_bf16_standard"]["out_dir"]) / "final"
    out_dir = check.out / "probe"
    argv = [sys.executable, "probe.py", f"--runs={{a: {a}, b: {b}}}", "--t_values=[0.0, 0.25, 0.5, 0.75, 1.0]",
            f"--data.dir={check.data}", f"--data.val_windows={check.val_windows}",
            f"--data.eval_batch_size={check.eval_batch}", "--spectra.enabled=false", "--plots=false",
            f"--out_dir={out_dir}"]
    start = time.perf_counter()
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"probe.py exited {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}")
    wall = time.perf_counter() - start
    rows = [json.loads(line) for line in (out_dir / "results.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "seconds" in r]
    result = {"points": len(rows), "seconds_per_point": statistics.median(r["seconds"] for r in rows),
              "tokens_per_point": check.val_windows * check.block, "wall_seconds": wall}
    model = load_model(a)
    timings = {}
    for name, fn in {"ours_float64_gram_cpu": lambda: singular_values(model),
                     "svdvals_float32_device": lambda: _device_svdvals(model, check.device, torch.float32),
                     "svdvals_float64_device": lambda: _device_svdvals(model, check.device, torch.float64)}.items():
        best = float("inf")
        for _ in range(2):
            start = time.perf_counter()
            {k: summarize(v.cpu()) for k, v in fn().items()}
            best = min(best, time.perf_counter() - start)
        timings[name] = best
    result["spectra_seconds_per_checkpoint"] = timings
    result["spectra_matrices"] = len(weight_matrices(model))
    return result


def _device_svdvals(model, device: str, dtype: torch.dtype) -> dict:
    from modeconn.spectra import weight_matrices

    values = {k: torch.linalg.svdvals(w.to(device, dtype)) for k, w in weight_matrices(model).items()}
    if device == "cuda":
        torch.cuda.synchronize()
    return values


def resume(check: Check) -> dict:
    """tiny, 20 steps in bf16: unbroken, and stopped after step 10 then resumed with --resume=auto;
    the final weights compared bit for bit."""
    from safetensors.torch import load_file

    steps = check.resume_steps
    keys = {"model.preset": "tiny", "model.block_size": 64, "data.dir": check.data, "data.val_windows": 4,
            "data.eval_batch_size": 2, "deepspeed.zero_stage": 1, "deepspeed.precision": check.precision,
            "train.steps": steps, "train.micro_batch": 4, "train.log_every": 2, "train.eval_every": 0,
            "checkpoint.every": 2, "checkpoint.export_init": False}

    def run(out: Path, *extra: str) -> None:
        argv = [sys.executable, "train.py", "--config", "configs/train/tiny-adamw.yaml",
                *(f"--{k}={v}" for k, v in keys.items()), f"--out_dir={out}", *extra]
        proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"train.py {' '.join(extra)} exited {proc.returncode}: "
                               f"{proc.stderr.strip().splitlines()[-1:]}")

    whole, broken = check.out / "resume" / "whole", check.out / "resume" / "broken"
    run(whole)
    run(broken, f"--train.stop_at_step={steps // 2}")
    run(broken, "--resume=auto")
    a, b = (load_file(str(next((d / "final").glob("*.safetensors")))) for d in (whole, broken))
    diffs = {k: (a[k].float() - b[k].float()).abs().max().item() for k in a}
    return {"tensors": len(a), "bit_identical": all(torch.equal(a[k], b[k]) for k in a),
            "max_abs_diff": max(diffs.values()), "precision": check.precision, "steps": steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny on the CPU: checks the script, not the GPU")
    parser.add_argument("--data", default="data/shakespeare", help="a prepared data directory (prepare.py)")
    args = parser.parse_args()
    if not args.cpu_smoke and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device here; use --cpu-smoke to check the script on the CPU")
    args.out.mkdir(parents=True, exist_ok=True)
    check = Check(args.cpu_smoke, args.data, args.out)
    check.results["environment"] = environment()
    for name, section in (("micro_batch", micro_batch), ("train", train), ("ns_error", ns_error),
                          ("probe", probe), ("resume", resume)):
        start = time.perf_counter()
        try:
            check.results[name] = section(check)
        except Exception as e:  # the other sections' figures still count; this one says why it has none
            check.results["errors"][name] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        check.results.setdefault("section_seconds", {})[name] = round(time.perf_counter() - start, 1)
        check.save()
        print(f"gpu_check: {name} done in {check.results['section_seconds'][name]:.0f} s", flush=True)
    check.results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    check.save()
    print(json.dumps(check.results, indent=1))


if __name__ == "__main__":
    main()
