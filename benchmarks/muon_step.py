"""Optimizer step time, traffic and memory per rank: our distributed Muon vs DeepSpeed's built-in Muon
(`"optimizer": {"type": "Muon"}`) vs AdamW, side by side in one run, at ZeRO 1-3 and any number of ranks.

    python benchmarks/muon_step.py [--preset paper-small] [--stages 1 2 3] [--ranks 2 4 8] [--steps 15]
                                   [--rounds 2] [--ns-repeats 3] [--optimizers NAME ...]

Each (ranks, stage, optimizer) runs in its own group of gloo CPU processes (one thread each, fp32
weights), so each peak RSS is that configuration's own. Configurations: see OPTIMIZERS. At ZeRO-3
DeepSpeed's Muon refuses `reduce_scatter`, so it runs with `"reduce_scatter": false` (whole
gradient buckets all-reduced); AdamW runs both ways (`adamw`, `adamw_allreduce`) to show the price
of that setting, and ours runs both ways too (`ours_muon`, `ours_muon_allreduce`).

Deterministic figures, the same on any machine (benchmarks/step_counters.py):
- bytes sent and received per rank per step, counted by wrapping torch.distributed's collectives
  (the volumes of the bandwidth-optimal algorithms); `extra_bytes_per_step` is a configuration's
  bytes beyond `adamw`'s at the same stage, i.e. beyond AdamW in its best configuration;
- the NS makespan: the multiply-adds of the matrices the busiest rank orthogonalises per step (the
  shapes recorded at each Muon's NS entry point, counted by torch's FlopCounterMode);
- memory: Muon state per rank (our momentum; DeepSpeed's momentum plus, at ZeRO-1/2, its staged
  copy), and the peak transient allocation (torch's profiler, one extra step): the most bytes
  allocated beyond those live at the start of `engine.step()` (`peak_transient_engine_step_mb`) and
  of the whole forward + backward + step (`peak_transient_train_step_mb`). At ZeRO-3 both Muons do
  all their work inside `engine.step()`; at ZeRO-1/2 DeepSpeed's runs at the end of backward, which
  only the second window sees.

Times: per rank and step the forward + backward and `engine.step()` separately; `train_step_s`, their
sum, is the fair comparison. Every step starts at a barrier, so a step takes as long as its slowest
rank; configurations run in `--rounds` interleaved rounds, so that a slow spell of the machine hits
all of them; each time is the minimum over all timed steps (noise only ever adds time, as with
`timeit`) and the median. Ratios use the minimum. Next to the wall times, `*_cpu_s` are the CPU
seconds of each rank's main thread (torch runs on it, one thread), slowest rank per step, minimum
over steps: the compute on a step's critical path, without waiting for other ranks or for the
machine, hence usable with more ranks than cores; gloo's transfers run on its own threads and are
left out of them. `ns_s` is that rank's NS work of one step timed alone (one rank at a time). The
default micro-batch is small (2 x 64 tokens) so that the optimizer, not the 50257-way head,
dominates the step: a step's optimizer work is the same at any batch size.

Both Muons get the same routing (block matrices to Muon; embeddings, head, gains and biases to
AdamW) and the same matrices (c_attn whole, as DeepSpeed sees it): DeepSpeed routes by name
substrings ("embed", "lm_head"), which would send GPT-2's wte and wpe to Muon, so the benchmark
registers the embeddings under an extra name containing "embed" (same modules, same computation).
Pairs with the same NS arithmetic (SAME_ARITHMETIC) differ only in how the work is distributed:
ours in fp32 against DeepSpeed's quintic NS in fp32 (its fallback where the accelerator lacks bf16,
set here by replacing its `ns_compute_dtype`; the pair a CPU can afford at gpt2 size, since bf16
and fp16 products are ~100x slower there), ours in bf16 against its "standard" NS (bf16), and our
Gram form in fp16 against its default. Prints one JSON object.
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
# same arithmetic as ours_muon_bf16_ns; deepspeed_muon_fp32_ns: that quintic NS in fp32 (DeepSpeed's own fallback
# where the accelerator lacks bf16), the same arithmetic as ours_muon, and the pair that gpt2 size can afford on a
# CPU, where bf16 and fp16 products are ~100x slower. adamw: reduce_scatter on (DeepSpeed's default, the fewest
# bytes); *_allreduce: reduce_scatter off, the configuration DeepSpeed's Muon needs at ZeRO-3 (and, with gloo on
# a CPU, the faster one: its reduce-scatter is slower than its all-reduce).
OPTIMIZERS = ("ours_muon", "ours_muon_allreduce", "ours_muon_bf16_ns", "ours_muon_gram_fp16_ns", "deepspeed_muon",
              "deepspeed_muon_standard_ns", "deepspeed_muon_fp32_ns", "adamw", "adamw_allreduce")
OURS_NS = {"ours_muon": dict(ns_dtype="float32"), "ours_muon_allreduce": dict(ns_dtype="float32"),
           "ours_muon_bf16_ns": dict(ns_dtype="bfloat16"),
           "ours_muon_gram_fp16_ns": dict(ns_dtype="float16", ns_method="gram")}
DEEPSPEED_NS_METHOD = {"deepspeed_muon": "gram", "deepspeed_muon_standard_ns": "standard",
                       "deepspeed_muon_fp32_ns": "standard"}
ADAMW = ("adamw", "adamw_allreduce")


def _reduce_scatter(optimizer_name: str, stage: int) -> bool:
    """DeepSpeed's Muon refuses reduce_scatter at ZeRO-3 (it all-reduces whole buckets instead)."""
    return not (optimizer_name.endswith("_allreduce") or (stage == 3 and optimizer_name in DEEPSPEED_NS_METHOD))


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


def _instrument_newton_schulz(optimizer_name: str, log) -> None:
    """Route each Muon's calls into its NS through `log`, which records the shape of every matrix this
    rank orthogonalises; for deepspeed_muon_fp32_ns, make DeepSpeed's quintic NS compute in fp32."""
    if optimizer_name in OURS_NS:
        import modeconn.optim.muon as ours

        log.wrap(ours, "orthogonalise")  # _muon_group looks it up in the module at call time
    elif optimizer_name in DEEPSPEED_NS_METHOD:
        from deepspeed.runtime.zero.muon import original_muon as theirs

        if optimizer_name == "deepspeed_muon_fp32_ns":  # before the first call compiles the NS
            theirs.ns_compute_dtype = lambda ns_method="gram": torch.float32
        # DeepSpeed imports muon_update (compiled, NS inside) from the module at each call
        log.wrap(theirs, "muon_update")


def _newton_schulz(optimizer_name: str, ours):
    """The NS a rank runs on one matrix, as (function, extra args, extra kwargs)."""
    if ours is not None:
        import modeconn.optim.muon as muon

        return muon.orthogonalise, (ours.cfg, muon.resolve_dtype(ours.cfg, torch.device("cpu"))), {}
    from deepspeed.runtime.zero.muon import original_muon as theirs

    fn = (theirs.zeropower_via_gram_newtonschulz if DEEPSPEED_NS_METHOD[optimizer_name] == "gram"
          else theirs.zeropower_via_newtonschulz5)
    return fn, (), {"steps": 5}


def _ns_cost(shapes, optimizer_name: str, ours) -> dict:
    """Multiply-adds of the NS of each shape, counted on meta tensors."""
    from step_counters import multiply_adds

    fn, args, kwargs = _newton_schulz(optimizer_name, ours)
    return {shape: multiply_adds(fn, shape, *args, **kwargs) for shape in set(shapes)}


def _ns_time(shapes, optimizer_name: str, ours, repeats: int) -> float:
    """Seconds of this rank's NS work of one step (the matrices it orthogonalised then, through the
    same function), measured alone: one rank at a time, best of `repeats`."""
    if not repeats:
        return 0.0
    fn, args, kwargs = _newton_schulz(optimizer_name, ours)
    inputs = [torch.randn(*shape) for shape in shapes]
    for g in inputs:
        fn(g, *args, **kwargs)  # warm-up (and compilation for each shape, for DeepSpeed's)

    def timed() -> float:
        start = time.perf_counter()
        for g in inputs:
            fn(g, *args, **kwargs)
        return time.perf_counter() - start

    seconds = 0.0
    for turn in range(dist.get_world_size()):  # one rank at a time, so that ranks do not share cores
        dist.barrier()
        if turn == dist.get_rank():
            seconds = min(timed() for _ in range(repeats))
    return seconds


def _rank(rank: int, world: int, port: int, args, stage: int, optimizer_name: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    os.dup2(2, 1)  # DeepSpeed logs to stdout; the parent's stdout carries only the JSON
    torch.set_num_threads(1)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from step_counters import CallLog, CollectiveCounter, peak_allocation

    dist.init_process_group("gloo", rank=rank, world_size=world)
    collectives = CollectiveCounter().install()  # before DeepSpeed's backend binds the collectives
    ns_log = CallLog()
    _instrument_newton_schulz(optimizer_name, ns_log)
    import deepspeed

    from modeconn.optim import OptimConfig, build_optimizer
    from modeconn.optim.muon import MuonConfig

    model = _model(args.preset, args.block)
    config = {"train_micro_batch_size_per_gpu": args.micro_batch, "gradient_accumulation_steps": 1,
              "gradient_clipping": 1.0, "steps_per_print": 10 ** 9, "zero_allow_untested_optimizer": True,
              "zero_optimization": {"stage": stage, "reduce_scatter": _reduce_scatter(optimizer_name, stage)}}
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
        optimizer = build_optimizer(model, cfg)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        if optimizer_name in OURS_NS:
            optimizer.attach(engine, model)
            ours = optimizer
    gen = torch.Generator().manual_seed(rank)

    def train_step() -> tuple[float, float, float, float]:
        x = torch.randint(0, model.config.vocab_size, (args.micro_batch, args.block + 1), generator=gen)
        dist.barrier()
        t0, c0 = time.perf_counter(), time.thread_time()
        with torch.profiler.record_function("train_step"):
            engine.backward(engine(x[:, :-1], x[:, 1:])[1])
            t1, c1 = time.perf_counter(), time.thread_time()
            with torch.profiler.record_function("engine_step"):
                engine.step()
        t2, c2 = time.perf_counter(), time.thread_time()
        return t1 - t0, t2 - t1, c1 - c0, c2 - c1

    times = {k: [] for k in ("forward_backward_s", "engine_step_s", "forward_backward_cpu_s", "engine_step_cpu_s")}
    sent, received, ns_calls = [], [], []  # per timed step
    for i in range(args.warmup + args.steps):
        collectives.reset()
        ns_log.reset()
        with collectives.counting(), ns_log.recording():
            step_times = train_step()
        if i >= args.warmup:
            for key, value in zip(times, step_times):
                times[key].append(value)
            sent.append(collectives.sent)
            received.append(collectives.received)
            ns_calls.append(list(ns_log.calls))
    calls_by_collective = dict(collectives.calls)  # of the last step
    with peak_allocation(["train_step", "engine_step"]) as peaks:  # one more step, profiled
        train_step()
    shapes = [[shape for _, shape in calls] for calls in ns_calls]
    costs = _ns_cost([s for step in shapes for s in step], optimizer_name, ours) if optimizer_name not in ADAMW else {}
    row = {"rank": rank, **times, "bytes_sent": sent, "bytes_received": received,
           "collective_calls": calls_by_collective,
           "ns_multiply_adds": [sum(costs[s] for s in step) for step in shapes],
           "ns_matrices": len(shapes[0]),
           "ns_s": _ns_time(shapes[0], optimizer_name, ours, args.ns_repeats) if optimizer_name not in ADAMW else 0.0,
           "peak_transient_train_step_mb": peaks["train_step"] / 2 ** 20,
           "peak_transient_engine_step_mb": peaks["engine_step"] / 2 ** 20,
           "muon_state_mb": _muon_state(engine, optimizer_name) / 2 ** 20,
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    Path(out, f"{rank}.json").write_text(json.dumps(row))
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)  # DeepSpeed's and gloo's threads can abort a finished process at interpreter teardown


def run_config(args, ranks: int, stage: int, optimizer_name: str) -> list[dict]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_rank, args=(ranks, port, args, stage, optimizer_name, out), nprocs=ranks,
                           join=True, start_method="spawn")
        return [json.loads(Path(out, f"{r}.json").read_text()) for r in range(ranks)]


def summarise(rounds: list[list[dict]]) -> dict:
    """One configuration's rounds (each a list of per-rank rows). The slowest rank sets the pace of
    each synchronous step; bytes, NS work and memory per rank are the largest rank's."""
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
    first = rounds[0]
    # Deterministic figures (the same every step and round; the largest step is kept to show it if not)
    out["bytes_sent_per_step"] = max(max(r["bytes_sent"]) for r in every_row)
    out["bytes_received_per_step"] = max(max(r["bytes_received"]) for r in every_row)
    out["bytes_per_step"] = max(max(s + v for s, v in zip(r["bytes_sent"], r["bytes_received"])) for r in every_row)
    out["collective_calls_per_step"] = first[0]["collective_calls"]
    out["ns_multiply_adds_per_rank"] = [max(r["ns_multiply_adds"]) for r in first]
    out["ns_makespan_multiply_adds"] = max(out["ns_multiply_adds_per_rank"])
    out["ns_matrices_per_rank"] = [r["ns_matrices"] for r in first]
    out.update({k: max(r[k] for r in every_row) for k in ("peak_transient_train_step_mb",
                                                           "peak_transient_engine_step_mb", "muon_state_mb",
                                                           "peak_rss_mb")})
    out["ns_s"] = min(max(r["ns_s"] for r in rows) for rows in rounds)  # slowest rank, best round
    out["ns_share"] = out["ns_s"] / out["train_step_s"]
    return out


# (ours, DeepSpeed's) with the same NS arithmetic: what differs is how the work is distributed (and, for
# ours_muon at ZeRO-3, the gradient reduction: ours_muon_allreduce shares DeepSpeed's)
SAME_ARITHMETIC = (("ours_muon", "deepspeed_muon_fp32_ns"), ("ours_muon_allreduce", "deepspeed_muon_fp32_ns"),
                   ("ours_muon_bf16_ns", "deepspeed_muon_standard_ns"), ("ours_muon_gram_fp16_ns", "deepspeed_muon"))
COMPARED = ("train_step_s", "train_step_cpu_s", "engine_step_s", "engine_step_cpu_s", "bytes_per_step",
            "extra_bytes_per_step", "ns_makespan_multiply_adds", "ns_s", "peak_transient_train_step_mb",
            "peak_transient_engine_step_mb", "muon_state_mb", "peak_rss_mb")


def ratios(runs: dict) -> dict:
    """Ours over DeepSpeed's Muon, pair by pair of the same NS arithmetic; Muon over AdamW."""
    if "adamw" in runs:  # the bytes a Muon moves beyond AdamW's best configuration at this stage
        for name, run in runs.items():
            run["extra_bytes_per_step"] = run["bytes_per_step"] - runs["adamw"]["bytes_per_step"]
    out = {}

    def compare(a: str, b: str, keys) -> None:
        if a in runs and b in runs:
            out.update({f"{key}_{a}_over_{b}": runs[a][key] / runs[b][key] for key in keys
                        if key in runs[a] and runs[b].get(key)})

    for pair in SAME_ARITHMETIC:
        compare(*pair, COMPARED)
    for name in runs:
        if name not in ADAMW:
            compare(name, "adamw", ("train_step_s", "train_step_cpu_s", "bytes_per_step"))
    compare("adamw_allreduce", "adamw", ("train_step_s", "train_step_cpu_s", "bytes_per_step"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="paper-small")
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2])
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved repetitions of every configuration")
    parser.add_argument("--ns-repeats", type=int, default=3, help="best of N for NS alone (0: not timed)")
    parser.add_argument("--optimizers", nargs="+", choices=OPTIMIZERS, default=list(OPTIMIZERS),
                        help="the configurations to run (ratios for the pairs that ran)")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    result = {"benchmark": "muon_step", "preset": args.preset, "micro_batch": args.micro_batch, "block": args.block,
              "dtype": "float32", "device": "cpu", "machine": platform.processor() or platform.machine(),
              "cpus": os.cpu_count(), "torch": torch.__version__, "deepspeed": _deepspeed_version(),
              "date": time.strftime("%Y-%m-%d"), "rounds": args.rounds, "steps_per_round": args.steps, "runs": {}}
    names = [name for name in OPTIMIZERS if name in args.optimizers]
    measured = {(ranks, stage, name): [] for ranks in args.ranks for stage in args.stages for name in names}
    for _ in range(args.rounds):
        for key in measured:
            measured[key].append(run_config(args, *key))
    for ranks in args.ranks:
        for stage in args.stages:
            runs = {name: summarise(measured[ranks, stage, name]) for name in names}
            runs["ratios"] = ratios(runs)
            result["runs"].setdefault(f"{ranks}_ranks", {})[f"zero{stage}"] = runs
            print(json.dumps({f"{ranks}_ranks": {f"zero{stage}": runs["ratios"]}}), file=sys.stderr, flush=True)
    print(json.dumps(result, indent=2))


def _deepspeed_version() -> str:
    from importlib.metadata import version

    return version("deepspeed")


if __name__ == "__main__":
    main()
