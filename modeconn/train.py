"""Train a GPT-2 under DeepSpeed ZeRO (stages 0-3), on one CPU or many GPUs.

    python train.py --config configs/train/tiny-adamw.yaml                  # one process
    deepspeed --num_gpus 2 train.py --config configs/train/tiny-adamw.yaml  # or torchrun, SLURM: see launch/
    python train.py --config ... --resume=auto                              # continue the latest checkpoint

The trainer composes the components: model (modeconn.model), data (modeconn.data.loader),
optimizer (modeconn.optim), schedule, DeepSpeed engine, checkpoints, exports and metrics. Read
`Trainer.fit` top to bottom for the loop.
"""

from __future__ import annotations

import math
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Protocol, runtime_checkable

import numpy as np
import torch

from modeconn import config as config_lib
from modeconn.atomic import clean_leftovers
from modeconn.checkpoint import COMPLETE, CheckpointConfig, Checkpointer, tag_for
from modeconn.config import DataConfig, SeedConfig
from modeconn.data.loader import TokenWindows, TrainLoader, ValidationSet
from modeconn.distributed import (World, all_reduce_sum, any_rank, barrier, held_by_rank0, init_distributed, shutdown,
                                  strip_launcher_args)
from modeconn.errors import CheckpointError, ConfigError, ModeconnError
from modeconn.export import TRAINER_STATE, export, load_optimizer_state, read_trainer_state
from modeconn.fit import PathFitConfig, PathPoint, build_path_point
from modeconn.hf import load_hf, read_meta
from modeconn.lock import lock_for_directory
from modeconn.logger import MetricsLogger, WandbConfig, format_duration
from modeconn.metrics import add_sums, batch_sums, means
from modeconn.model import GPT, ModelConfig
from modeconn.optim import OptimConfig, build_optimizer, describe_routing, state_keys_by_param
from modeconn.schedule import ScheduleConfig, lr_multiplier


@dataclass
class InitConfig:
    # An export or HF GPT-2 directory: start from its weights with a fresh optimizer (branching).
    from_: Optional[str] = field(default=None, metadata={"key": "from"})


@dataclass
class LoopConfig:
    steps: int = 200  # optimizer steps
    micro_batch: int = 8  # windows per rank per forward/backward
    grad_accum: int = 1  # micro-batches per optimizer step
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off
    log_every: int = 10
    eval_every: int = 50  # 0: evaluate only at the end
    activation_checkpointing: bool = False
    compile: bool = False  # torch.compile through DeepSpeed (GPU)
    peak_tflops: Optional[float] = None  # per device, for MFU; default: known bf16 peak of the GPU
    # Save a checkpoint and exit (status 0) after this step, e.g. to fit a time-limited allocation;
    # the schedule still runs to `steps`, so --resume=auto continues as if never stopped.
    stop_at_step: Optional[int] = None

    def __post_init__(self):
        if min(self.steps, self.micro_batch, self.grad_accum, self.log_every) < 1 or self.eval_every < 0:
            raise ConfigError("train.steps, micro_batch, grad_accum, log_every must be >= 1; eval_every >= 0")


@dataclass
class DeepSpeedSection:
    zero_stage: Literal[0, 1, 2, 3] = 0
    precision: Literal["fp32", "bf16"] = "fp32"
    # Raw DeepSpeed config keys, merged last (e.g. {zero_optimization: {overlap_comm: true}}).
    overrides: dict = field(default_factory=dict)


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=lambda: ModelConfig.from_preset("tiny"))
    init: InitConfig = field(default_factory=InitConfig)
    data: DataConfig = field(default_factory=DataConfig)
    seed: SeedConfig = field(default_factory=SeedConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    # Given: train the free point of a path (a chain's bend, a Bezier control point, a star's
    # centre) between frozen checkpoints instead of a network (modeconn/fit.py).
    path_fit: Optional[PathFitConfig] = None
    out_dir: str = "out/train"
    # none: a new run (refuses an out_dir that holds one); auto: the latest complete checkpoint in
    # out_dir if any; or a path: a checkpoint (out_dir/checkpoints/step_N) or an export with trainer state.
    resume: str = "none"


# Keys of the DeepSpeed config that the trainer owns: the data loader and the loop depend on them.
_OWNED_DS_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")


def deepspeed_config(cfg: TrainConfig, world_size: int) -> dict:
    for key in _OWNED_DS_KEYS:
        if key in cfg.deepspeed.overrides:
            raise ConfigError(f"deepspeed.overrides.{key}: set train.micro_batch and train.grad_accum instead")
    ds = {
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "train_batch_size": cfg.train.micro_batch * cfg.train.grad_accum * world_size,
        "gradient_clipping": cfg.train.grad_clip,
        "zero_optimization": {"stage": cfg.deepspeed.zero_stage},
        "bf16": {"enabled": cfg.deepspeed.precision == "bf16"},
        "zero_allow_untested_optimizer": True,  # our optimizers are plain torch optimizers
        "steps_per_print": 2 ** 62,  # we log ourselves
    }
    merged = _deep_merge(ds, cfg.deepspeed.overrides)
    zero = merged.get("zero_optimization", {})
    if cfg.optim.name == "muon" and any(zero.get(k, {}).get("device", "none") != "none"
                                        for k in ("offload_optimizer", "offload_param")):
        # Muon exchanges matrix slices between the ranks' partitions, which offload moves or swaps out.
        raise ConfigError("optim.name=muon does not run with ZeRO offload (deepspeed.overrides.zero_optimization."
                          "offload_optimizer / offload_param); remove the offload or choose another optimizer")
    return merged


def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# bf16 dense peak per device, for MFU when train.peak_tflops is not given.
_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


@dataclass(frozen=True)
class ResumePlan:
    """Where a run starts: afresh, from a complete checkpoint, or from an export with trainer state."""
    kind: Literal["fresh", "checkpoint", "export"]
    path: Optional[Path] = None


@runtime_checkable
class EngineAttached(Protocol):
    """A piece that must learn the DeepSpeed engine once it exists: Muon (where its matrices lie in
    ZeRO's partitions), a path-fit point (ZeRO-3 partitions). Its builder gives it `attach`."""

    def attach(self, engine, model) -> None: ...


class LogWindow:
    """The training loss and throughput since the last log line. The loss is summed on the device,
    so a micro-step never waits for the host."""

    def __init__(self, device: torch.device, step: int):
        self.device, self.loss_sum = device, torch.zeros((), dtype=torch.float64, device=device)
        self.reset(step)

    def reset(self, step: int) -> None:
        self.loss_sum.zero_()
        self.from_step, self.tokens, self.start = step, 0, time.perf_counter()

    def close(self, step: int, micro_batches_per_step: int) -> tuple[float, float]:
        """(mean loss over every rank's micro-batches, tokens per second), then a new window."""
        loss_total, = all_reduce_sum([self.loss_sum.item()], self.device)
        loss = loss_total / (micro_batches_per_step * (step - self.from_step))
        tokens_per_s = self.tokens / (time.perf_counter() - self.start)
        self.reset(step)
        return loss, tokens_per_s


class Trainer:
    def __init__(self, cfg: TrainConfig, world: World):
        self.cfg, self.world = cfg, world
        self.out = Path(cfg.out_dir)
        self.stop_signal: Optional[str] = None
        self._grad_norm: Optional[float] = None
        self.step, self.tokens = 0, 0
        self.window = LogWindow(world.device, 0)
        self.checkpointer = Checkpointer(self.out / "checkpoints", world, cfg.checkpoint.keep_last)
        resume = self._resume_plan()
        if world.is_main:  # what a killed run left half-written (we hold out_dir's lock)
            for line in clean_leftovers(self.out):
                print(f"start: {line}", flush=True)
        self.checkpointer.remove_incomplete()

        # Model: fresh from seed.init, or weights of an export (init.from, or an export to resume from).
        weights_from = resume.path if resume.kind == "export" else cfg.init.from_
        if weights_from:
            model_cfg, weights = load_hf(Path(weights_from))
            cfg.model = model_cfg
        torch.manual_seed(cfg.seed.init)
        if cfg.path_fit is not None:  # the point starts at the mean of the frozen ones (or init.from)
            self.model = build_path_point(cfg.path_fit, cfg.seed.data, world.rank)
            cfg.model = self.model.config
        else:
            self.model = GPT(cfg.model)
        if weights_from:
            self.model.load_state_dict(weights)
        self.model.checkpoint_blocks = cfg.train.activation_checkpointing
        # Data before the engine: a bad data directory is reported before anything heavy runs.
        block = cfg.model.block_size
        self.loader = TrainLoader(TokenWindows(Path(cfg.data.dir), "train", block), cfg.train.micro_batch,
                                  seed=cfg.seed.data, rank=world.rank, world_size=world.world_size)
        val = ValidationSet(TokenWindows(Path(cfg.data.dir), "val", block), cfg.data.val_windows or None)
        self.validation = val.for_rank(cfg.data.eval_batch_size, world.rank, world.world_size)
        # Randomness during training (dropout) is per rank, from seed.data; the init is seed.init alone.
        torch.manual_seed(int(np.random.SeedSequence([cfg.seed.data, world.rank]).generate_state(1)[0]))

        import deepspeed

        self.optimizer = build_optimizer(self.model, cfg.optim)
        if world.is_main:
            print(describe_routing(self.optimizer), flush=True)
        self.engine, _, _, _ = deepspeed.initialize(
            model=self.model, optimizer=self.optimizer, config=deepspeed_config(cfg, world.world_size))
        for part in (self.model, self.optimizer):
            if isinstance(part, EngineAttached):
                part.attach(self.engine, self.model)
        if cfg.train.compile:
            self.engine.compile()

        self._restore(resume)
        self.logger = MetricsLogger(self.out, cfg.wandb, config_lib.to_dict(cfg), world.is_main, self.step)
        self.tokens_per_step = cfg.train.micro_batch * cfg.train.grad_accum * world.world_size * block

    # --- starting and resuming ------------------------------------------------------------------

    def _resume_plan(self) -> ResumePlan:
        cfg = self.cfg
        if cfg.resume == "none":
            if self.checkpointer.complete_tags() or (self.out / "final").exists():
                raise ModeconnError(f"{self.out} already holds a run; continue it with --resume=auto, or choose "
                                    f"another out_dir (nothing there is overwritten)")
            return ResumePlan("fresh")
        if cfg.resume == "auto":
            tag = self.checkpointer.resume_point()
            return ResumePlan("checkpoint", self.checkpointer.root / tag) if tag else ResumePlan("fresh")
        path = Path(cfg.resume)
        if (path / COMPLETE).is_file():
            problem = Checkpointer(path.parent, self.world, cfg.checkpoint.keep_last).damage(path.name)
            if problem:
                raise CheckpointError(f"--resume={cfg.resume}: the checkpoint is damaged ({problem})")
            return ResumePlan("checkpoint", path)
        if (path / TRAINER_STATE / "state.json").is_file():
            return ResumePlan("export", path)
        if (path / "config.json").is_file():
            raise CheckpointError(f"--resume={cfg.resume} is a weights-only export (no {TRAINER_STATE}/): start from "
                                  f"its weights with a fresh optimizer by --init.from={cfg.resume}, or export with "
                                  f"checkpoint.export_optimizer=true")
        raise CheckpointError(f"--resume={cfg.resume}: neither a complete checkpoint (no {COMPLETE}) nor an export "
                              f"with {TRAINER_STATE}/; use auto, none, out_dir/checkpoints/step_N or an export")

    def _restore(self, resume: ResumePlan) -> None:
        where = resume.path
        if resume.kind == "fresh":
            return
        if resume.kind == "checkpoint":
            client, loader_state = Checkpointer(where.parent, self.world, self.cfg.checkpoint.keep_last).load(
                self.engine, where.name, config_lib.to_dict(self.cfg.model))
        else:
            client, tensors = read_trainer_state(where)
            if client["optimizer"] != self.cfg.optim.name:
                raise CheckpointError(f"{where} holds {client['optimizer']} state; this run uses {self.cfg.optim.name}")
            load_optimizer_state(self.engine, self.model, tensors, self._state_keys(), client["step"],
                                 str(where))
            loader_state = client["loader"]
        self.step, self.tokens = client["step"], client["tokens"]
        self.window.reset(self.step)
        self.loader.load_state_dict(loader_state)
        if isinstance(self.model, PathPoint):
            self.model.resume_at(self.step, self.cfg.train.grad_accum)
        if self.world.is_main:
            print(f"resumed from {where} at step {self.step} ({self.tokens:,} tokens seen)", flush=True)

    def _save_config(self) -> None:
        path = self.out / "config.yaml"
        if path.is_file():  # a resume with changed settings (other than `resume` itself) keeps both
            try:
                saved = config_lib.to_dict(config_lib.load(TrainConfig, str(path)))
            except ConfigError:
                saved = None  # unreadable: kept, the resolved config goes beside it
            if saved is not None and {**saved, "resume": None} == {**config_lib.to_dict(self.cfg), "resume": None}:
                return
            path = self.out / f"config.resumed-at-step{self.step}.yaml"
        config_lib.save(self.cfg, path)

    # --- the loop ---------------------------------------------------------------------------------

    def fit(self) -> dict:
        cfg, total = self.cfg, self.cfg.train.steps
        self._install_signal_handlers()
        if self.world.is_main:
            self._print_start()
        self.engine.train()
        if cfg.checkpoint.export_init and self.step == 0:  # one already there from a killed start is reused
            self.export(self.out / "exports" / tag_for(0), {}, with_optimizer=False)
        if self.world.is_main:  # after the init export: a run refused there writes nothing
            self._save_config()
        self.run_start, self.start_step, last_val = time.perf_counter(), self.step, {}
        self.window.reset(self.step)
        while self.step < total:
            stop = self._stop_reason()
            if stop:
                return self._stop(last_val, stop)
            lr_scale = self.train_step()
            if self._logs_at(self.step):  # also before every checkpoint: a non-finite loss is never saved
                self._log_train(lr_scale)
            if (cfg.train.eval_every and self.step % cfg.train.eval_every == 0) or self.step == total:
                last_val = self._validate()
            if self._checkpoints_at(self.step):
                self.save_checkpoint()
            if cfg.checkpoint.export_every and self.step % cfg.checkpoint.export_every == 0 and self.step != total:
                self.export(self.out / "exports" / tag_for(self.step), last_val, with_optimizer=False)
        return self._finish(last_val)

    def train_step(self) -> float:
        """One optimizer step: the schedule's lr, grad_accum micro-batches, DeepSpeed's step at the
        accumulation boundary; returns the lr multiplier."""
        cfg = self.cfg
        lr_scale = lr_multiplier(cfg.schedule, self.step, cfg.train.steps)
        for group in self.engine.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lr_scale
        will_log = self._logs_at(self.step + 1)
        for _ in range(cfg.train.grad_accum):
            x, y = self.loader.next_batch()
            _, loss = self.engine(x.to(self.world.device), y.to(self.world.device))
            self.engine.backward(loss)
            if will_log and self.engine.is_gradient_accumulation_boundary():
                self._grad_norm = self._plain_grad_norm()
            self.engine.step()  # DeepSpeed applies the optimizer at the accumulation boundary
            self.window.loss_sum += loss.detach().double()
        self.step += 1
        self.tokens += self.tokens_per_step
        self.window.tokens += self.tokens_per_step
        return lr_scale

    def _stop_reason(self) -> Optional[str]:
        """Why to stop before the next step (a signal on any rank, train.stop_at_step), or None."""
        if any_rank(self.stop_signal is not None, self.world.device):
            return f"received {self.stop_signal or 'a stop signal on another rank'}"
        stop_at = self.cfg.train.stop_at_step
        if stop_at is not None and self.step >= stop_at:
            return f"reached train.stop_at_step={stop_at}"
        return None

    def _validate(self) -> dict:
        val = self.evaluate()
        self.logger.log("val", self.step, val, f"step {self.step:>6} | val loss {val['loss']:.4f} "
                        f"| val token error {val['token_error']:.4f}")
        return val

    def _finish(self, last_val: dict) -> dict:
        """The final export (unless this step's is there already), then the run's result."""
        final = self.out / "final"
        if exported_step(final) != self.step:  # absent, or from an earlier end (a run extended since)
            if not last_val:
                last_val = self.evaluate()
            self.export(final, last_val, with_optimizer=self.cfg.checkpoint.export_optimizer,
                        overwrite=final.exists())
        self.logger.close()
        return {"status": "finished", "step": self.step, "val": last_val, "export": str(final)}

    def _checkpoints_at(self, step: int) -> bool:
        every = self.cfg.checkpoint.every
        return bool(every and step % every == 0) or step == self.cfg.train.steps

    def _logs_at(self, step: int) -> bool:
        return step % self.cfg.train.log_every == 0 or self._checkpoints_at(step)

    def _log_train(self, lr_scale: float) -> None:
        total = self.cfg.train.steps
        loss, tokens_per_s = self.window.close(self.step, self.world.world_size * self.cfg.train.grad_accum)
        if not math.isfinite(loss):
            raise ModeconnError(f"training loss is {loss} at step {self.step}; stopping without saving (the last "
                                f"checkpoint is intact). Lower optim.lr or check the data")
        values = {"loss": loss, "lr": self.cfg.optim.lr * lr_scale, "tokens": self.tokens,
                  "tokens_per_s": tokens_per_s}
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is None:  # ZeRO-0 fp32 with a client optimizer keeps no norm
            grad_norm = self._grad_norm
        if grad_norm is not None:
            values["grad_norm"] = float(grad_norm)
        mfu = self._mfu(tokens_per_s)
        if mfu is not None:
            values["mfu"] = mfu
        rate = (self.step - self.start_step) / (time.perf_counter() - self.run_start)
        line = (f"step {self.step:>6}/{total} | loss {loss:.4f} | lr {values['lr']:.2e}"
                + (f" | grad norm {values['grad_norm']:.3f}" if "grad_norm" in values else "")
                + f" | {tokens_per_s:,.0f} tok/s" + (f" | MFU {mfu:.1%}" if mfu is not None else "")
                + f" | eta {format_duration((total - self.step) / max(rate, 1e-9))}")
        self.logger.log("train", self.step, values, line)

    def _mfu(self, tokens_per_s: float) -> Optional[float]:
        if self.world.device.type != "cuda":
            return None
        peak = self.cfg.train.peak_tflops
        if peak is None:
            name = torch.cuda.get_device_name(self.world.device)
            peak = next((v for k, v in _PEAK_TFLOPS.items() if k in name), None)
        if peak is None:
            return None
        m = self.cfg.model  # PaLM appendix B: 6N + 12 L d T flops per token for forward and backward
        flops_per_token = 6 * self.model.num_parameters() + 12 * m.n_layer * m.n_embd * m.block_size
        return tokens_per_s * flops_per_token / (peak * 1e12 * self.world.world_size)

    def _plain_grad_norm(self) -> Optional[float]:
        """Global gradient norm before clipping, where gradients are whole and already averaged
        (ZeRO-0, after backward at the boundary); None elsewhere (DeepSpeed reports those)."""
        if self.cfg.deepspeed.zero_stage != 0 or self.cfg.deepspeed.precision != "fp32":
            return None
        # float64 accumulation: an fp32 norm over millions of elements is off in the 5th digit
        norms = [torch.linalg.vector_norm(p.grad.detach(), dtype=torch.float64)
                 for p in self.model.parameters() if p.grad is not None]
        return torch.linalg.vector_norm(torch.stack(norms)).item() if norms else None

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Validation over the fixed windows, split over ranks, summed over ranks."""
        self.engine.eval()
        sums = []
        for (x, y), counted in self.validation.passes():
            logits, _ = self.engine(x.to(self.world.device))
            if counted:
                sums.append(batch_sums(logits, y))
        self.engine.train()
        return means(*all_reduce_sum(list(add_sums(sums)), self.world.device))

    # --- checkpoints, exports, signals ----------------------------------------------------------

    def save_checkpoint(self) -> Path:
        start = time.perf_counter()
        client = {"step": self.step, "tokens": self.tokens, "config": config_lib.to_dict(self.cfg)}
        path = self.checkpointer.save(self.engine, self.step, client, self.loader.state_dict(),
                                      config_lib.to_dict(self.cfg.model))
        self.logger.log("checkpoint", self.step, {"path": str(path), "seconds": time.perf_counter() - start},
                        f"step {self.step:>6} | checkpoint {path} ({time.perf_counter() - start:.1f} s)")
        return path

    def export(self, out: Path, val: dict, with_optimizer: bool, overwrite: bool = False) -> Path:
        start = time.perf_counter()
        meta = {"optimizer": self.cfg.optim.name, "seed_init": self.cfg.seed.init, "seed_data": self.cfg.seed.data,
                "step": self.step, "tokens": self.tokens, "val_loss": val.get("loss"),
                "val_token_error": val.get("token_error"), "zero_stage": self.cfg.deepspeed.zero_stage,
                "world_size": self.world.world_size, "config": config_lib.to_dict(self.cfg)}
        if self.cfg.path_fit is not None:
            meta["path_fit"] = config_lib.to_dict(self.cfg.path_fit)
        keys = self._state_keys() if with_optimizer else None
        trainer_state = {"step": self.step, "tokens": self.tokens, "loader": self.loader.state_dict(),
                         "optimizer": self.cfg.optim.name, "state_keys": keys or {}}
        outcome = export(self.engine, self.model, self.cfg.model, out, self.world, meta, keys, trainer_state, overwrite)
        seconds = time.perf_counter() - start
        self.logger.log("export", self.step, {"path": str(out), "seconds": seconds, "outcome": outcome},
                        f"step {self.step:>6} | export {out} ({seconds:.1f} s)" if outcome == "written" else
                        f"step {self.step:>6} | export {out} was already there with these weights; kept")
        return out

    def _state_keys(self) -> dict[str, tuple[str, ...]]:
        return state_keys_by_param(self.optimizer, self.cfg.optim.name)

    def _install_signal_handlers(self) -> None:
        def request_stop(signum, _frame):
            self.stop_signal = signal.Signals(signum).name

        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, request_stop)

    def _stop(self, last_val: dict, reason: str) -> dict:
        latest = self.checkpointer.latest()
        path = self.checkpointer.root / latest if latest == tag_for(self.step) else self.save_checkpoint()
        if self.world.is_main:
            print(f"{reason}: stopping at step {self.step} with checkpoint {path}; continue with --resume=auto",
                  flush=True)
        self.logger.close()
        return {"status": "stopped", "step": self.step, "val": last_val, "checkpoint": str(path)}

    def _print_start(self) -> None:
        c, w = self.cfg, self.world
        print(f"model: {c.model.n_layer} layers, d={c.model.n_embd}, {self.model.num_parameters() / 1e6:.2f}M "
              f"parameters | optimizer {c.optim.name} lr {c.optim.lr} | ZeRO-{c.deepspeed.zero_stage} "
              f"{c.deepspeed.precision} on {w.world_size} x {w.device.type} | global batch "
              f"{c.train.micro_batch}x{c.train.grad_accum}x{w.world_size} windows of {c.model.block_size} tokens | "
              f"steps {self.step}->{c.train.steps} | out {self.out}", flush=True)


def exported_step(export_dir: Path) -> Optional[int]:
    return read_meta(export_dir).get("step") if export_dir.is_dir() else None


def run(cfg: TrainConfig) -> dict:
    world = init_distributed()
    try:
        with held_by_rank0(lock_for_directory(Path(cfg.out_dir), "train.py"), world):
            result = Trainer(cfg, world).fit()
            barrier()
        return result
    finally:
        shutdown()


def main(argv=None) -> None:
    argv = strip_launcher_args(sys.argv[1:] if argv is None else list(argv))
    run(config_lib.from_cli(TrainConfig, argv, __doc__))
