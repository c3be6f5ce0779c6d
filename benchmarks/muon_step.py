"""Optimizer step time and memory per rank: our distributed Muon vs DeepSpeed's built-in Muon
(`"optimizer": {"type": "Muon"}`) vs AdamW, side by side in one run.

    python benchmarks/muon_step.py [--preset paper-small] [--stages 1 2] [--ranks 2] [--steps 15] [--rounds 2]
                                   [--optimizers NAME ...]

Each (stage, optimizer) runs in its own group of gloo CPU processes (one thread each, fp32
weights), so each peak RSS is that configuration's own. Per rank and step we time the forward +
backward and `engine.step()` separately: DeepSpeed's Muon does its momentum and Newton–Schulz
while it reduces gradients, at the end of backward (its gradient-partition epilogue, at ZeRO-1 and
2 alike in DeepSpeed 0.19), so the sum of both, `train_step_s`, is the fair comparison;
`engine_step_s` is reported next to it. The default micro-batch is small (2 x 64 tokens) so that
the optimizer, not the 50257-way head, dominates the step: a step's optimizer work is the same at
any batch size.

Timing on a shared machine: every step starts at a barrier, so a step takes as long as its slowest
rank; configurations run in `--rounds` interleaved rounds, so that a slow spell of the machine hits
all of them; each time is reported as the minimum over all timed steps (noise only ever adds time,
as with `timeit`) and as the median. Ratios use the minimum. Next to the wall times, `*_cpu_s` are
the CPU seconds of each rank's main thread (torch runs on it, one thread), slowest rank per step,
minimum over steps: the compute on a step's critical path, without waiting for the other ranks or
for the machine (steal time is not CPU time), hence usable with more ranks than cores; gloo's
transfers run on its own threads and are left out of them.

Both Muons get the same routing (block matrices to Muon; embeddings, head, gains and biases to
AdamW) and the same matrices (c_attn whole, as DeepSpeed sees it): DeepSpeed routes by name
substrings ("embed", "lm_head"), which would send GPT-2's wte and wpe to Muon, so the benchmark
registers the embeddings under an extra name containing "embed" (same modules, same computation).
Each Muon uses its own default Newton–Schulz: ours quintic with 5 steps in fp32 on CPU, DeepSpeed's
Gram NS in fp16 (what it picks on a CPU with fp16 matmuls). Two pairs then share their arithmetic
and differ mainly in how the work is distributed: ours with NS in bf16 (its GPU default) against
DeepSpeed's "standard" quintic NS (bf16), and our Gram form in fp16 (`ns_method: gram`) against
DeepSpeed's default. `ns_s` is the time of that NS on the matrices the rank orthogonalises, measured
alone (one rank at a time, best of 3) for the slowest rank, and `ns_share` = ns_s / train_step_s.

Muon state per rank counts the tensors each Muon keeps between steps: our momentum; DeepSpeed's
momentum plus its staged momentum copy. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# ours_muon: our default on CPU (fp32 NS); ours_muon_bf16_ns: NS in bf16, as on GPU and as torch.optim.Muon;
# ours_muon_gram_fp16_ns: our Gram-form NS in fp16. deepspeed_muon: its default Gram NS (fp16 here), the class
# of arithmetic of ours_muon_gram_fp16_ns; deepspeed_muon_standard_ns: its "standard" quintic NS, in bf16, the
# same arithmetic as ours_muon_bf16_ns. Those pairs differ mainly in how the work is distributed.
OPTIMIZERS = ("ours_muon", "ours_muon_bf16_ns", "ours_muon_gram_fp16_ns", "deepspeed_muon",
              "deepspeed_muon_standard_ns", "adamw")
OURS_NS = {"ours_muon": dict(ns_dtype="float32"), "ours_muon_bf16_ns": dict(ns_dtype="bfloat16"),
           "ours_muon_gram_fp16_ns": dict(ns_dtype="float16", ns_method="gram")}
DEEPSPEED_NS_METHOD = {"deepspeed_muon": "gram", "deepspeed_muon_standard_ns": "standard"}


def _model(preset: str, block: int):
    from modeconn.model import GPT, ModelConfig

    torch.manual_seed(0)
    return GPT(ModelConfig.from_preset(preset, block_size=block, dropout=0.0))


def _name_embeddings_for_deepspeed(model) -> None:
    """DeepSpeed tags Muon parameters by name ("embed" and "lm_head" excluded): list the embeddings
    first under names containing "embed", so that named_parameters() reports those names."""
    t = model.transformer
    aliases = [("embed_tokens", t.wte), ("embed_positions", t.wpe)]
    t._modules = OrderedDict(aliases + list(t._modules.items()))


def _state_bytes(tensors) -> int:
    seen = {}
    for x in tensors:
        if torch.is_tensor(x) and x.numel() > 1:
            seen[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
    return sum(seen.values())


def _muon_state(engine, optimizer_name: str) -> int:
    opt = engine.optimizer
    client = opt.optimizer if hasattr(opt, "optimizer") else opt
    momentum = [s["momentum_buffer"] for s in client.state.values() if "momentum_buffer" in s]
    if optimizer_name in DEEPSPEED_NS_METHOD:
        momentum += [staged for staged, _ in getattr(opt, "_muon_pending_momentum", {}).values()]
    return _state_bytes(momentum)


def _ns_time(optimizer_name: str, engine, model, ours) -> tuple[float, int]:
    """Seconds of this rank's Newton–Schulz work per step, measured alone (one rank at a time, best
    of 3), and its matrix count."""
    if optimizer_name in OURS_NS:
        from modeconn.optim.muon import orthogonalise, resolve_dtype

        shapes = [(m.rows, m.cols) for m in ours.owned_matrices()]
        dtype = resolve_dtype(ours.cfg, torch.device("cpu"))
        run = lambda g: orthogonalise(g, ours.cfg, dtype)  # noqa: E731
    else:
        from deepspeed.runtime.zero.muon.original_muon import (zeropower_via_gram_newtonschulz,
                                                               zeropower_via_newtonschulz5)

        # DeepSpeed orthogonalises every Muon parameter that touches this rank's partition, whole.
        opt = engine.optimizer
        params = [p for group in opt.params_in_partition for p in group if getattr(p, "use_muon", False)]
        shapes = [tuple(p.shape) for p in params]
        ns = (zeropower_via_gram_newtonschulz if DEEPSPEED_NS_METHOD[optimizer_name] == "gram"
              else zeropower_via_newtonschulz5)
        run = lambda g: ns(g, steps=5)  # noqa: E731
    inputs = [torch.randn(*s) for s in shapes]
    for g in inputs:
        run(g)  # warm-up (and compilation for each shape, for DeepSpeed's)

    def timed() -> float:
        start = time.perf_counter()
        for g in inputs:
            run(g)
        return time.perf_counter() - start

    seconds = 0.0
    for turn in range(dist.get_world_size()):  # one rank at a time, so that ranks do not share cores
        dist.barrier()
        if turn == dist.get_rank():
            seconds = min(timed() for _ in range(3))
    return seconds, len(shapes)


def _rank(rank: int, world: int, port: int, args, stage: int, optimizer_name: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    os.dup2(2, 1)  # DeepSpeed logs to stdout; the parent's stdout carries only the JSON
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    import deepspeed

    from modeconn.optim import OptimConfig, build_optimizer
    from modeconn.optim.muon import MuonConfig

    model = _model(args.preset, args.block)
    config = {"train_micro_batch_size_per_gpu": args.micro_batch, "gradient_accumulation_steps": 1,
              "gradient_clipping": 1.0, "zero_optimization": {"stage": stage}, "steps_per_print": 10 ** 9,
              "zero_allow_untested_optimizer": True}
    ours = None
    if optimizer_name in DEEPSPEED_NS_METHOD:
        _name_embeddings_for_deepspeed(model)
        config["optimizer"] = {"type": "Muon", "params": {"lr": 0.02, "momentum": 0.95, "weight_decay": 0.1,
                                                          "adam_lr": 3e-3, "betas": [0.9, 0.95], "eps": 1e-8,
                                                          "ns_method": DEEPSPEED_NS_METHOD[optimizer_name]}}
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    else:
        cfg = (OptimConfig(name="muon", lr=0.02, muon=MuonConfig(**OURS_NS[optimizer_name], split_qkv=False))
               if optimizer_name in OURS_NS else OptimConfig(name="adamw", lr=3e-3))
        ours = build_optimizer(model, cfg)
        engine, *_ = deepspeed.initialize(model=model, optimizer=ours, config=config)
        if optimizer_name in OURS_NS:
            ours.attach(engine, model)
        else:
            ours = None
    gen = torch.Generator().manual_seed(rank)
    fwd_bwd, step, fwd_bwd_cpu, step_cpu = [], [], [], []  # per timed step
    for i in range(args.warmup + args.steps):
        x = torch.randint(0, model.config.vocab_size, (args.micro_batch, args.block + 1), generator=gen)
        dist.barrier()
        t0, c0 = time.perf_counter(), time.thread_time()
        engine.backward(engine(x[:, :-1], x[:, 1:])[1])
        t1, c1 = time.perf_counter(), time.thread_time()
        engine.step()
        t2, c2 = time.perf_counter(), time.thread_time()
        if i >= args.warmup:
            fwd_bwd.append(t1 - t0)
            step.append(t2 - t1)
            fwd_bwd_cpu.append(c1 - c0)
            step_cpu.append(c2 - c1)
    ns_s, ns_matrices = (_ns_time(optimizer_name, engine, model, ours) if optimizer_name != "adamw" else (0.0, 0))
    row = {"rank": rank, "forward_backward_s": fwd_bwd, "engine_step_s": step, "forward_backward_cpu_s": fwd_bwd_cpu,
           "engine_step_cpu_s": step_cpu, "ns_s": ns_s, "ns_matrices": ns_matrices,
           "muon_state_mb": _muon_state(engine, optimizer_name) / 2 ** 20,
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    Path(out, f"{rank}.json").write_text(json.dumps(row))
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)  # DeepSpeed's and gloo's threads can abort a finished process at interpreter teardown


def run_config(args, stage: int, optimizer_name: str) -> list[dict]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_rank, args=(args.ranks, port, args, stage, optimizer_name, out), nprocs=args.ranks,
                           join=True, start_method="spawn")
        return [json.loads(Path(out, f"{r}.json").read_text()) for r in range(args.ranks)]


def summarise(rounds: list[list[dict]]) -> dict:
    """One configuration's rounds (each a list of per-rank rows). The slowest rank sets the pace of
    each synchronous step; memory per rank is its largest."""
    out = {}
    for clock in ("_s", "_cpu_s"):
        per_step = {"forward_backward": [], "engine_step": [], "train_step": []}
        for rows in rounds:
            for fwd_bwd, step in zip(zip(*(r["forward_backward" + clock] for r in rows)),
                                     zip(*(r["engine_step" + clock] for r in rows))):
                per_step["forward_backward"].append(max(fwd_bwd))
                per_step["engine_step"].append(max(step))
                per_step["train_step"].append(max(a + b for a, b in zip(fwd_bwd, step)))
        for key, times in per_step.items():
            out[key + clock], out[key + "_median" + clock] = min(times), statistics.median(times)
    every_row = [r for rows in rounds for r in rows]
    out.update({k: max(r[k] for r in every_row) for k in ("muon_state_mb", "peak_rss_mb")})
    out["ns_s"] = min(max(r["ns_s"] for r in rows) for rows in rounds)  # slowest rank, best round
    out["ns_matrices_per_rank"] = [r["ns_matrices"] for r in rounds[0]]
    out["ns_share"] = out["ns_s"] / out["train_step_s"]
    return out


# (ours, DeepSpeed's) with the same class of NS arithmetic: what differs is how the work is distributed
SAME_ARITHMETIC = (("ours_muon_bf16_ns", "deepspeed_muon_standard_ns"), ("ours_muon_gram_fp16_ns", "deepspeed_muon"))


def ratios(runs: dict) -> dict:
    """Ours over DeepSpeed's Muon (its default, and the same-arithmetic pairs) and Muon over AdamW,
    for the configurations that ran."""
    out = {}

    def compare(a: str, b: str, keys) -> None:
        if a in runs and b in runs:
            out.update({f"{key}_{a}_over_{b}": runs[a][key] / runs[b][key] for key in keys})

    times = ("train_step_s", "engine_step_s", "train_step_cpu_s", "engine_step_cpu_s")
    for name in OURS_NS:
        compare(name, "deepspeed_muon", times + ("muon_state_mb", "peak_rss_mb"))
        compare(name, "adamw", ("train_step_s", "train_step_cpu_s"))
    compare("deepspeed_muon", "adamw", ("train_step_s", "train_step_cpu_s"))
    compare(*SAME_ARITHMETIC[0], times + ("ns_s",))
    compare(*SAME_ARITHMETIC[1], ("ns_s",))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="paper-small")
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved repetitions of every configuration")
    parser.add_argument("--optimizers", nargs="+", choices=OPTIMIZERS, default=list(OPTIMIZERS),
                        help="the configurations to run (ratios for the pairs that ran)")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    result = {"benchmark": "muon_step", "preset": args.preset, "ranks": args.ranks, "micro_batch": args.micro_batch,
              "block": args.block, "dtype": "float32", "device": "cpu", "machine": platform.processor() or
              platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__, "rounds": args.rounds,
              "steps_per_round": args.steps, "stages": {}}
    names = [name for name in OPTIMIZERS if name in args.optimizers]
    measured = {(stage, name): [] for stage in args.stages for name in names}
    for _ in range(args.rounds):
        for stage, name in measured:
            measured[stage, name].append(run_config(args, stage, name))
    for stage in args.stages:
        runs = {name: summarise(measured[stage, name]) for name in names}
        runs["ratios"] = ratios(runs)
        result["stages"][f"zero{stage}"] = runs
        print(json.dumps({f"zero{stage}": runs["ratios"]}), file=sys.stderr, flush=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
