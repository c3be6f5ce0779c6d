"""Muon (Jordan et al., 2024): momentum, then an orthogonalised update by Newton–Schulz, for the 2-D
weights inside the transformer blocks; an auxiliary AdamW for everything else.

For each Muon matrix W with gradient G (torch.optim.Muon's formulation):

    B <- mu * B + (1 - mu) * G                       momentum (EMA form)
    U <- (1 - mu) * G + mu * B   if nesterov else B
    O <- NS(U)                                       quintic Newton–Schulz, Frobenius-normalised,
                                                     on the wide orientation (tall matrices transposed)
    W <- W * (1 - lr * wd) - lr * scale(shape) * O   decoupled decay with the unadjusted lr

The unit of orthogonalisation is a *matrix*: a range of rows of a parameter. GPT-2's fused
attention weight c_attn [3d, d] is three matrices (Q, K, V, as in the seed study), or 3 x n_head
with `split_heads`. A row range of a row-major tensor is one contiguous run of its elements, which
is what lets the distributed version find each matrix inside ZeRO's flat partitions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch

from modeconn.errors import ConfigError

DEFAULT_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
ScaleMode = Literal["original", "match_rms_adamw", "spectral"]


@dataclass
class MuonConfig:
    momentum: float = 0.95
    nesterov: bool = True
    ns_steps: int = 5
    ns_coefficients: list[float] = field(default_factory=lambda: list(DEFAULT_COEFFICIENTS))
    ns_dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    eps: float = 1e-7
    scale: ScaleMode = "original"
    split_qkv: bool = True  # Q, K, V orthogonalised as separate matrices (the seed study)
    split_heads: bool = False  # and each head separately

    def __post_init__(self):
        if len(self.ns_coefficients) != 3 or self.ns_steps < 1 or not 0 <= self.momentum < 1:
            raise ConfigError("optim.muon: ns_coefficients must be 3 numbers, ns_steps >= 1, momentum in [0, 1)")
        if self.split_heads and not self.split_qkv:
            raise ConfigError("optim.muon.split_heads needs split_qkv")


def newton_schulz(g: torch.Tensor, steps: int = 5, coefficients=DEFAULT_COEFFICIENTS, eps: float = 1e-7,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Approximate U V^T of g = U S V^T (singular values pushed into about [0.7, 1.2]).
    The same operations, in the same order, as torch.optim.Muon's, so bf16 results agree bit for bit."""
    a, b, c = coefficients
    x = g.to(dtype)
    tall = g.size(0) > g.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def update_scale(rows: int, cols: int, mode: ScaleMode) -> float:
    if mode == "original":
        return math.sqrt(max(1.0, rows / cols))
    if mode == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return math.sqrt(rows / cols)  # spectral: sqrt(fan_out / fan_in) for a weight [out, in]


@dataclass(frozen=True)
class MatrixSlice:
    """Rows [row_start, row_end) of a 2-D parameter, orthogonalised as one matrix."""
    param: str
    row_start: int
    row_end: int
    cols: int

    @property
    def rows(self) -> int:
        return self.row_end - self.row_start


def muon_matrices(name: str, shape: tuple[int, int], n_head: int, cfg: MuonConfig) -> list[MatrixSlice]:
    """How one Muon parameter splits into matrices (data, not code paths: one rule per layout)."""
    rows, cols = shape
    if name.endswith("attn.c_attn.weight") and cfg.split_qkv:
        parts = 3 * n_head if cfg.split_heads else 3
        step = rows // parts
        return [MatrixSlice(name, i * step, (i + 1) * step, cols) for i in range(parts)]
    return [MatrixSlice(name, 0, rows, cols)]


def resolve_dtype(ns_dtype: str, device: torch.device) -> torch.dtype:
    if ns_dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[ns_dtype]


def apply_update(p: torch.Tensor, update: torch.Tensor, matrices: list[MatrixSlice], lr: float, wd: float,
                 cfg: MuonConfig, dtype: Optional[torch.dtype] = None) -> None:
    """Decay `p`, then subtract lr * scale * NS(update) matrix by matrix (rows of `p`). The lr and
    the scale are one factor, as in torch.optim.Muon, so the rounding is the same."""
    dtype = dtype or resolve_dtype(cfg.ns_dtype, update.device)
    p.mul_(1 - lr * wd)
    for m in matrices:
        orth = newton_schulz(update[m.row_start:m.row_end], cfg.ns_steps, tuple(cfg.ns_coefficients), cfg.eps, dtype)
        p[m.row_start:m.row_end].add_(orth, alpha=-lr * update_scale(m.rows, m.cols, cfg.scale))


class Muon(torch.optim.Optimizer):
    """Single-process Muon with the auxiliary AdamW in one optimizer.

    Param groups carry `use_muon` (True: 2-D block weights, with `matrices` per parameter) or
    False (AdamW with `betas`, `eps`). Every group has `lr`, `weight_decay`, `initial_lr`.
    """

    def __init__(self, groups: list[dict], cfg: MuonConfig):
        self.cfg = cfg
        super().__init__(groups, {})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["use_muon"]:
                self._muon_group(group)
            else:
                self._adamw_group(group)
        return loss

    def _muon_group(self, group: dict) -> None:
        mu, lr, wd = self.cfg.momentum, group["lr"], group["weight_decay"]
        for p, matrices in zip(group["params"], group["matrices"]):
            if p.grad is None:
                continue
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buf = state["momentum_buffer"]
            buf.lerp_(p.grad, 1 - mu)
            update = p.grad.lerp(buf, mu) if self.cfg.nesterov else buf
            apply_update(p, update, matrices, lr, wd, self.cfg)

    def _adamw_group(self, group: dict) -> None:
        (beta1, beta2), lr, wd, eps = group["betas"], group["lr"], group["weight_decay"], group["eps"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "exp_avg" not in state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
            state["step"] += 1
            t = state["step"].item()
            p.mul_(1 - lr * wd)
            state["exp_avg"].lerp_(p.grad, 1 - beta1)
            state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2 ** t)).add_(eps)
            p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1 ** t))
