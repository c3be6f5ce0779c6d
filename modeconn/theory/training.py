"""Training the testbed's networks in memory: SGD, AdamW, Muon (ours) and Lion (ours), with the
seed of the initialisation and the seed of the data order kept apart.

Muon's routing is the product's, by role: the hidden layer's weight matrix goes to Muon; the
output layer (the network's "head") and the biases go to the auxiliary AdamW.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn
from torch.func import functional_call

from modeconn.errors import ConfigError
from modeconn.optim.lion import Lion
from modeconn.optim.muon import Muon, MuonConfig, muon_param_groups
from modeconn.optim.newton_schulz import ScaleMode
from modeconn.optim.roles import parameter_roles
from modeconn.theory.nets import Task

OptimizerName = Literal["sgd", "adamw", "muon", "lion"]


@dataclass
class OptimSpec:
    name: OptimizerName = "adamw"
    lr: float = 1e-2
    steps: int = 1000
    batch_size: int = 0  # 0: full batch
    warmup: float = 0.0  # share of the steps with a linear warm-up from 0
    decay: Literal["cosine", "constant"] = "cosine"  # after the warm-up: cosine to 0, or constant
    weight_decay: float = 0.0
    momentum: float = 0.0  # sgd
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adamw (lion: its own default)
    aux_lr: float = 1e-2  # muon: the auxiliary AdamW's lr (output layer, biases)
    ns_dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # muon: Newton–Schulz dtype (auto: fp32 on CPU)
    muon_scale: ScaleMode = "original"  # muon: the update scale (see modeconn.optim.muon.update_scale)

    def __post_init__(self):
        if self.decay not in ("cosine", "constant"):
            raise ConfigError(f"optimizer {self.name}: decay must be cosine or constant, got {self.decay!r}")
        if self.name not in ("sgd", "adamw", "muon", "lion"):
            raise ConfigError(f"optimizer {self.name!r} is not one of sgd, adamw, muon, lion")
        if self.steps < 1 or self.lr <= 0 or self.batch_size < 0 or not 0 <= self.warmup < 1:
            raise ConfigError(f"optimizer {self.name}: needs steps >= 1, lr > 0, batch_size >= 0, warmup in [0, 1)")


def make_optimizer(net: nn.Module, params: dict[str, nn.Parameter], spec: OptimSpec) -> torch.optim.Optimizer:
    """The optimizer over `params` (the trained copies of `net`'s parameters, by name)."""
    plist = list(params.values())
    if spec.name == "sgd":
        return torch.optim.SGD(plist, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay)
    if spec.name == "adamw":
        return torch.optim.AdamW(plist, lr=spec.lr, betas=tuple(spec.betas), weight_decay=spec.weight_decay)
    if spec.name == "lion":
        return Lion(plist, lr=spec.lr, weight_decay=spec.weight_decay)
    cfg = MuonConfig(ns_dtype=spec.ns_dtype, scale=spec.muon_scale)
    roles = {name: role for name, _, role in parameter_roles(net)}
    groups = muon_param_groups([(n, p, roles[n]) for n, p in params.items()], cfg, 1, spec.lr, spec.weight_decay,
                               spec.aux_lr, spec.betas, 1e-8, aux_weight_decay=0.0)
    return Muon(groups, cfg)


def lr_factor(step: int, spec: OptimSpec) -> float:
    warmup_steps = int(spec.warmup * spec.steps)
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if spec.decay == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, spec.steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def train(net: nn.Module, task: Task, state: dict[str, torch.Tensor], spec: OptimSpec,
          data_seed: int) -> tuple[dict[str, torch.Tensor], float]:
    """Train from `state` (not modified); returns the final parameters and the final full training loss."""
    params = {n: nn.Parameter(t.clone()) for n, t in state.items()}
    optimizer = make_optimizer(net, params, spec)
    n = len(task.y_train)
    batch = spec.batch_size or n
    order, cursor = None, n
    g = torch.Generator().manual_seed(data_seed)
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"]  # the peak lr the schedule scales
    for step in range(spec.steps):
        factor = lr_factor(step, spec)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor
        if batch < n:
            if cursor + batch > n:  # a new epoch in a new order; the short tail is dropped
                order, cursor = torch.randperm(n, generator=g), 0
            index = order[cursor:cursor + batch]
            cursor += batch
            x, y = task.x_train[index], task.y_train[index]
        else:
            x, y = task.x_train, task.y_train
        loss = task.loss(functional_call(net, params, (x,)), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    final = {k: p.detach().clone() for k, p in params.items()}
    return final, evaluate(net, task, final)["train_loss"]


@torch.no_grad()
def evaluate(net: nn.Module, task: Task, state: dict[str, torch.Tensor]) -> dict:
    out_train = functional_call(net, state, (task.x_train,))
    out_test = functional_call(net, state, (task.x_test,))
    return {"train_loss": task.loss(out_train, task.y_train).item(), "test_loss": task.loss(out_test, task.y_test).item(),
            "train_error": task.error(out_train, task.y_train), "test_error": task.error(out_test, task.y_test)}
