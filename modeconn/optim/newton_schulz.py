"""The arithmetic of Muon, with no optimizer around it: the quintic Newton–Schulz iteration (standard
and Gram forms), its multiply-add count (the cost model that balances owners), the unit it acts on
(`MatrixSlice`: a range of rows of a 2-D parameter) and the update's shape-dependent scale.

A leaf: it imports nothing of ours, so the optimizer (muon.py) and the exchanges
(muon_exchange.py) both build on it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

DEFAULT_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
ScaleMode = Literal["original", "match_rms_adamw", "spectral"]


def _wide_normalised(g: torch.Tensor, dtype: torch.dtype, eps: float) -> tuple[torch.Tensor, bool]:
    """g in `dtype`, transposed if tall, divided by its Frobenius norm; and whether it was tall."""
    x = g.to(dtype)
    tall = g.size(0) > g.size(1)
    if tall:
        x = x.T
    return x / x.norm().clamp(min=eps), tall


def newton_schulz(g: torch.Tensor, steps: int = 5, coefficients=DEFAULT_COEFFICIENTS, eps: float = 1e-7,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Approximate U V^T of g = U S V^T (singular values pushed into about [0.7, 1.2]).
    The same operations, in the same order, as torch.optim.Muon's, so bf16 results agree bit for bit."""
    a, b, c = coefficients
    x, tall = _wide_normalised(g, dtype, eps)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


GRAM_RESTART = 3  # the Gram form re-forms X and its Gram matrix every 3 steps


def gram_newton_schulz(g: torch.Tensor, steps: int = 5, coefficients=DEFAULT_COEFFICIENTS, eps: float = 1e-7,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`newton_schulz`'s iteration on the Gram matrix of the wide orientation X (m x n, m <= n), after
    Dao et al. (2026). With X_k = Q_k X_0 and G_k = X_k X_k^T, a step X_{k+1} = P_k X_k, where
    P_k = aI + bG_k + cG_k^2, is Q_{k+1} = P_k Q_k and G_{k+1} = P_k G_k P_k: m x m products, and X is
    multiplied only to form G and at the end. The iteration corrects rounding errors in X but not in
    G, so X and G are formed afresh every GRAM_RESTART steps (half precision drifts without it)."""
    a, b, c = coefficients
    x, tall = _wide_normalised(g, dtype, eps)
    gram, q = x @ x.T, None
    for k in range(1, steps + 1):
        p = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        p.diagonal().add_(a)
        q = p if q is None else p @ q
        if k == steps:
            break
        if k % GRAM_RESTART == 0:
            x, q = q @ x, None
            gram = x @ x.T
        else:
            gram = p @ gram @ p
    x = q @ x
    return x.T if tall else x


def ns_multiply_adds(rows: int, cols: int, steps: int = 5, method: str = "standard") -> int:
    """Multiply-adds of one matrix's Newton–Schulz, on the wide orientation (m <= n). Standard: per
    step X X^T (m^2 n), the polynomial (m^3), its product with X (m^2 n). Gram (where cheaper): X is
    multiplied twice per restart; per step P (m^3), Q (m^3) and G (2 m^3) except where skipped."""
    m, n = sorted((rows, cols))
    standard = steps * m * m * (2 * n + m)
    if method != "gram":
        return standard
    restarts = (steps - 1) // GRAM_RESTART
    return min(standard, (2 + 2 * restarts) * m * m * n + (4 * steps - 3 - 3 * restarts) * m ** 3)


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
