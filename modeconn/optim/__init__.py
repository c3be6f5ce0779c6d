"""Optimizers and their parameter groups.

`build_optimizer(cfg, model)` returns a plain torch optimizer over role-based parameter groups;
DeepSpeed wraps it as a client optimizer at any ZeRO stage. New optimizers (the distributed Muon)
register a builder in OPTIMIZERS.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Optional

import torch
import torch.nn as nn

from modeconn.errors import ConfigError
from modeconn.optim.lion import Lion
from modeconn.optim.roles import parameter_roles

OptimizerName = Literal["adamw", "sgd", "lion"]
DEFAULT_BETAS = {"adamw": (0.9, 0.95), "lion": (0.9, 0.99)}


@dataclass
class OptimConfig:
    name: OptimizerName = "adamw"
    lr: float = 6e-4  # peak learning rate; the schedule scales it
    weight_decay: float = 0.1  # decoupled; never on norm gains and biases
    decay_embeddings: bool = True  # weight decay on token/position embeddings too (nanoGPT does)
    betas: Optional[list[float]] = None  # adamw: (0.9, 0.95); lion: (0.9, 0.99)
    eps: float = 1e-8  # adamw
    momentum: float = 0.9  # sgd
    nesterov: bool = False  # sgd

    def __post_init__(self):
        if self.lr <= 0 or self.weight_decay < 0:
            raise ConfigError(f"optim.lr must be > 0 and optim.weight_decay >= 0 (got {self.lr}, {self.weight_decay})")
        if self.betas is not None and (len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas)):
            raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {self.betas}")


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Two groups: decayed (matrices, head, embeddings unless excluded) and not decayed (gains,
    biases). Each group records its parameter names and its peak lr (`initial_lr`)."""
    decay, no_decay = {"params": [], "names": []}, {"params": [], "names": []}
    for name, p, role in parameter_roles(model):
        if not p.requires_grad:
            continue
        decayed = role in ("matrix", "head") or (role == "embedding" and cfg.decay_embeddings)
        group = decay if decayed else no_decay
        group["params"].append(p)
        group["names"].append(name)
    decay["weight_decay"], no_decay["weight_decay"] = cfg.weight_decay, 0.0
    groups = [g for g in (decay, no_decay) if g["params"]]
    for g in groups:
        g["initial_lr"] = cfg.lr
    return groups


def _adamw(groups, cfg):
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas or DEFAULT_BETAS["adamw"]), eps=cfg.eps)


def _sgd(groups, cfg):
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)


def _lion(groups, cfg):
    return Lion(groups, lr=cfg.lr, betas=tuple(cfg.betas or DEFAULT_BETAS["lion"]))


OPTIMIZERS: dict[str, Callable[[list[dict], OptimConfig], torch.optim.Optimizer]] = {
    "adamw": _adamw, "sgd": _sgd, "lion": _lion}

# Per-parameter state tensors of each optimizer (what a world-size-independent state must keep).
STATE_KEYS = {"adamw": ("exp_avg", "exp_avg_sq"), "sgd": ("momentum_buffer",), "lion": ("exp_avg",)}


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    return OPTIMIZERS[cfg.name](param_groups(model, cfg), cfg)
