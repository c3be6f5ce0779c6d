"""Launch train.py the way users do (plain python, torchrun, the deepspeed launcher) in a subprocess."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from conftest import ROOT
from distributed import free_port

TRAIN_CONFIGS = ROOT / "configs" / "train"


def command(nproc: int, launcher: str, script: str = "train.py") -> list[str]:
    if launcher == "python":
        assert nproc == 1
        return [sys.executable, script]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script]
    if launcher == "deepspeed":
        exe = shutil.which("deepspeed") or str(Path(sys.executable).parent / "deepspeed")
        return [exe, f"--num_gpus={nproc}", f"--master_port={free_port()}", script]
    raise ValueError(launcher)


def env(**extra) -> dict:
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    e.update({k: str(v) for k, v in extra.items()})
    return e


def base_args(data_dir: Path, out_dir: Path, config: str = "tiny-adamw.yaml", **overrides) -> list[str]:
    args = {"data.dir": data_dir, "out_dir": out_dir, "data.val_windows": 16, "data.eval_batch_size": 4,
            "train.steps": 8, "train.micro_batch": 4, "train.log_every": 1, "train.eval_every": 0,
            "checkpoint.every": 3, "schedule.kind": "constant", "schedule.warmup_steps": 0}
    args.update(overrides)
    return ["--config", str(TRAIN_CONFIGS / config)] + [f"--{k}={v}" for k, v in args.items()]


def start(data_dir, out_dir, nproc=1, launcher="torchrun", extra_env=None, script="train.py",
          **overrides) -> subprocess.Popen:
    return subprocess.Popen(command(nproc, launcher, script) + base_args(data_dir, out_dir, **overrides), cwd=ROOT,
                            env=env(**(extra_env or {})), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def train(data_dir, out_dir, nproc=1, launcher="torchrun", check=True, extra_env=None, **overrides):
    proc = subprocess.run(command(nproc, launcher) + base_args(data_dir, out_dir, **overrides), cwd=ROOT,
                          env=env(**(extra_env or {})), capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def metrics(out_dir: Path, kind: str = "train") -> list[dict]:
    path = Path(out_dir) / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    return [r for r in rows if r["kind"] == kind]


def losses(out_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(out_dir)}


def weights(export_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(export_dir) / "model.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"{k} differs between {a} and {b}"
