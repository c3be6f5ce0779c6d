"""Optimizers and their parameter groups.

`build_optimizer(cfg, model)` returns a plain torch optimizer over role-based parameter groups;
DeepSpeed wraps it as a client optimizer at any ZeRO stage. New optimizers (the distributed Muon)
register a builder in OPTIMIZERS.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal, Optional

import torch
import torch.nn as nn

from modeconn.errors import ConfigError
from modeconn.optim.lion import Lion
from modeconn.optim.muon import Muon, MuonConfig, fused_adamw_supported, muon_param_groups
from modeconn.optim.roles import parameter_roles

OptimizerName = Literal["adamw", "sgd", "lion", "muon"]
DEFAULT_BETAS = {"adamw": (0.9, 0.95), "lion": (0.9, 0.99)}


@dataclass
class AuxAdamWConfig:
    """Muon's auxiliary AdamW: embeddings, lm_head, norm gains and biases (gains and biases never decayed)."""

    lr: float = 3e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1


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
    muon: MuonConfig = field(default_factory=MuonConfig)  # muon: lr and weight_decay above are Muon's
    aux: AuxAdamWConfig = field(default_factory=AuxAdamWConfig)  # muon: the AdamW for the other parameters

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


def _adamw(model, cfg):
    # torch's fused kernel, as nanoGPT uses on CUDA; on CPU the default single-tensor path spends most
    # of a step in elementwise calls (79 ms of sqrt per step at paper-small, benchmarks/RESULTS.md)
    fused = fused_adamw_supported(model.parameters())
    return torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, betas=tuple(cfg.betas or DEFAULT_BETAS["adamw"]),
                             eps=cfg.eps, fused=fused or None)


def _sgd(model, cfg):
    return torch.optim.SGD(param_groups(model, cfg), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)


def _lion(model, cfg):
    return Lion(param_groups(model, cfg), lr=cfg.lr, betas=tuple(cfg.betas or DEFAULT_BETAS["lion"]))


def _muon(model, cfg):
    groups = muon_param_groups(parameter_roles(model), cfg.muon, model.config.n_head, cfg.lr, cfg.weight_decay,
                               cfg.aux.lr, cfg.aux.betas, cfg.aux.eps, cfg.aux.weight_decay, cfg.decay_embeddings)
    return Muon(groups, cfg.muon)


OPTIMIZERS: dict[str, Callable[[nn.Module, OptimConfig], torch.optim.Optimizer]] = {
    "adamw": _adamw, "sgd": _sgd, "lion": _lion, "muon": _muon}

# Per-parameter state tensors (what a world-size-independent state must keep), by optimizer and,
# for Muon, by side: momentum on its matrices, AdamW's two moments on the rest.
STATE_KEYS = {"adamw": ("exp_avg", "exp_avg_sq"), "sgd": ("momentum_buffer",), "lion": ("exp_avg",)}
MUON_STATE_KEYS = {"muon": ("momentum_buffer",), "adamw": STATE_KEYS["adamw"]}


def group_state_keys(optimizer_name: str, group: dict) -> tuple[str, ...]:
    if optimizer_name != "muon":
        return STATE_KEYS[optimizer_name]
    return MUON_STATE_KEYS["muon" if group["use_muon"] else "adamw"]


def state_keys_by_param(optimizer: torch.optim.Optimizer, optimizer_name: str) -> dict[str, tuple[str, ...]]:
    """{parameter name: its state keys}, from the groups' `names`."""
    return {name: group_state_keys(optimizer_name, g) for g in optimizer.param_groups for name in g["names"]}


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    return OPTIMIZERS[cfg.name](model, cfg)


def describe_routing(optimizer: torch.optim.Optimizer) -> str:
    """One line per parameter group: which optimizer, lr, weight decay, and its parameters."""
    lines = []
    for g in optimizer.param_groups:
        kind = "muon" if g.get("use_muon") else ("adamw" if "use_muon" in g else type(optimizer).__name__.lower())
        detail = ""
        if g.get("use_muon"):
            n_matrices = sum(len(m) for m in g["matrices"])
            detail = f", {n_matrices} matrices orthogonalised separately"
        names = g.get("names", [])
        shown = ", ".join(names[:4]) + (f", ... ({len(names)} in all)" if len(names) > 4 else "")
        lines.append(f"  {kind}: lr {g['lr']:g}, weight decay {g['weight_decay']:g}{detail}: {shown}")
    return "optimizer routing:\n" + "\n".join(lines)
