"""Forward+backward time of our GPT-2 vs transformers' GPT2LMHeadModel on the same weights and
batch (fp32, CPU), and the tokenization throughput of prepare on the Shakespeare corpus.

    python benchmarks/model_step.py [--presets tiny gpt2] [--repeats 5]

Prints one JSON object. ratio = ours / HF step time (target <= 1.0).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from modeconn.data.prepare import PrepareConfig, prepare
from modeconn.hf import from_hf_state_dict, hf_config_dict
from modeconn.model import GPT, ModelConfig

BATCH = {"tiny": (8, 64), "gpt2": (1, 256), "paper-small": (8, 256)}


def step_time(logits_fn, params, x, y) -> float:
    start = time.perf_counter()
    logits = logits_fn(x)
    F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1)).backward()
    for p in params:
        p.grad = None
    return time.perf_counter() - start


def bench_model(preset: str, repeats: int, warmup: int = 2) -> dict:
    cfg = ModelConfig.from_preset(preset, dropout=0.0)
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(**{k: v for k, v in hf_config_dict(cfg).items() if k != "modeconn"}))
    ours = GPT(cfg)
    ours.load_state_dict(from_hf_state_dict(hf.state_dict(), cfg))
    hf.train(), ours.train()
    b, t = BATCH.get(preset, (1, 256))
    x = torch.randint(0, cfg.vocab_size, (b, t), generator=torch.Generator().manual_seed(1))
    y = torch.roll(x, -1, dims=1)
    runs = {"ours": (lambda z: ours(z)[0], list(ours.parameters())),
            "hf": (lambda z: hf(z).logits, list(hf.parameters()))}
    times = {k: [] for k in runs}
    for i in range(warmup + repeats):
        for name, (fn, params) in runs.items():  # interleaved, so drift hits both alike
            dt = step_time(fn, params, x, y)
            if i >= warmup:
                times[name].append(dt)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"preset": preset, "batch": [b, t], "parameters": ours.num_parameters(),
            "ours_s": round(med["ours"], 4), "hf_s": round(med["hf"], 4),
            "ratio": round(med["ours"] / med["hf"], 3),
            "hf_attention": hf.config._attn_implementation, "repeats": repeats}


def bench_prepare() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the JSON result
            out = prepare(PrepareConfig(out_dir=f"{tmp}/shakespeare"), progress=False)
        elapsed = time.perf_counter() - start
        meta = json.loads((out / "meta.json").read_text())
    tokens = meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"]
    return {"corpus": "shakespeare", "tokens": tokens, "seconds": round(elapsed, 2),
            "tokens_per_s_total": round(tokens / elapsed), "tokens_per_s_tokenizing": meta["tokens_per_second"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["tiny", "gpt2"])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    result = {
        "benchmark": "model_step", "date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "models": [bench_model(p, args.repeats) for p in args.presets],
        "prepare": bench_prepare(),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
