"""Weight and activation matching at gpt2 size on the CPU: time and memory of aligning one
checkpoint to another.

    python benchmarks/align.py [--preset gpt2] [--threads 2] [--windows 8]

Two independently initialised models (random weights: no hidden answer to find, so every
symmetry is solved from scratch; the worst case for the Hungarian algorithm). Measured:
- permutations: heads and MLP units of every layer (the issue's target: <= 60 s on 2 cores);
- with the residual rotation: canonical form (fold + centre) of both, then heads, units and the
  rotation by coordinate descent until nothing changes (or 50 sweeps);
- the same two by activation matching on `--windows` random windows of the full context
  (both models' forward passes, the correlations, the same solvers);
- a check that the aligned B computes what B computed (max |Δ logit| on one batch).
Prints one JSON object; the ratios are to the 60 s target.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from modeconn import align as al  # noqa: E402
from modeconn.model import GPT, ModelConfig  # noqa: E402

TARGET_S = 60.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gpt2")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--windows", type=int, default=8, help="context-length windows for activation matching")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = ModelConfig.from_preset(args.preset)
    states = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        states.append({k: v.clone() for k, v in GPT(cfg).state_dict().items()})
    a, b = states
    x = torch.randint(0, cfg.vocab_size, (1, 128), generator=torch.Generator().manual_seed(0))

    def logits(state, c):
        model = GPT(c)
        model.load_state_dict(state)
        with torch.no_grad():
            return model(x)[0]

    results = {"preset": args.preset, "activation_tokens": args.windows * cfg.block_size,
               "parameters": sum(v.numel() for k, v in a.items() if k != "lm_head.weight"),
               "threads": args.threads, "machine": platform.processor() or platform.machine(),
               "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    reference = logits(b, cfg)
    windows = torch.randint(0, cfg.vocab_size, (args.windows, cfg.block_size), generator=torch.Generator().manual_seed(1))
    batches = list(windows.split(4))
    runs = {"permutations": al.AlignConfig(), "with_residual_rotation": al.AlignConfig(residual=True),
            "activations_permutations": al.AlignConfig(method="activations"),
            "activations_with_residual_rotation": al.AlignConfig(method="activations", residual=True)}
    for name, settings in runs.items():
        start = time.perf_counter()
        _, aligned, aligned_cfg, result = al.align(a, b, cfg, settings, batches)
        seconds = time.perf_counter() - start
        results[name] = {"seconds": round(seconds, 2), "ratio_to_target": round(seconds / TARGET_S, 3),
                         "sweeps": result.sweeps, "similarity_before": result.similarity_before,
                         "similarity_after": result.similarity_after,
                         "max_logit_change": (logits(aligned, aligned_cfg) - reference).abs().max().item()}
    results["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
