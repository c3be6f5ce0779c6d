"""Singular-value spectra of a GPT-2's weight matrices, and their summaries.

The matrices of block i (our layout, [out, in]): q, k, v (rows 0:d, d:2d, 2d:3d of the fused
attention weight c_attn, GPT-2's order), o (attn.c_proj), fc (mlp.c_fc), proj (mlp.c_proj);
optionally the token and position embeddings.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.linalg
import torch
from scipy.linalg.blas import dsyrk

from modeconn.model import GPT


def weight_matrices(model: GPT, embeddings: bool = False) -> dict[str, torch.Tensor]:
    d = model.config.n_embd
    out = {}
    for i, block in enumerate(model.transformer.h):
        qkv = block.attn.c_attn.weight
        out.update({f"h.{i}.q": qkv[:d], f"h.{i}.k": qkv[d:2 * d], f"h.{i}.v": qkv[2 * d:],
                    f"h.{i}.o": block.attn.c_proj.weight, f"h.{i}.fc": block.mlp.c_fc.weight,
                    f"h.{i}.proj": block.mlp.c_proj.weight})
    if embeddings:
        out["wte"] = model.transformer.wte.weight[: model.config.vocab_size]
        out["wpe"] = model.transformer.wpe.weight
    return out


@torch.no_grad()
def svdvals_reference(w: torch.Tensor) -> torch.Tensor:
    """Descending singular values by float64 SVD (LAPACK gesdd): the oracle the fast form is tested against."""
    return torch.linalg.svdvals(w.detach().double()).float()


@torch.no_grad()
def singular_values_of(matrices: list[torch.Tensor]) -> list[torch.Tensor]:
    """Descending singular values of each matrix, from the eigenvalues of its smaller Gram matrix.

    For W (m × n), σ_i = √λ_i(G) with G = WᵀW (or WWᵀ, whichever is smaller). G is formed in
    float64 by BLAS syrk (one triangle: half a matrix product) and its eigenvalues alone are found
    in float64 by LAPACK syevd (no eigenvectors), both through scipy. Why this form: the symmetric
    eigensolver on G does about half the work of an SVD of W, and the product is level-3 BLAS.
    Measured at gpt2 size (72 matrices of 768 × 768 and 768 × 3072, 2 cores): 3.6 s against float64
    SVD's 12 s (benchmarks/RESULTS.md); the eigenvalue step (LAPACK's tridiagonal reduction, bound by
    level-2 BLAS: two threads give 1.2x) is two thirds of it. Slower, and so not used: torch's
    eigvalsh and matrix product (MKL) on the same matrices (4.8 s), batching same-shape matrices into
    one torch call (a loop inside, plus the copies: 6.0 s), and LAPACK's two-stage reduction in the
    OpenBLAS that scipy ships.

    Accuracy (tests/test_spectra.py, against float64 `svdvals`): the eigenvalues of G are found to
    within about n·ε·‖G‖ (ε = 2⁻⁵², n the short side), so every σ_i is within √(n·ε)·σ1 ≈ 3e-7·σ1
    of the truth, and within n·ε·(σ1/σ_i)² relative to itself: 1e-7 of σ_i for σ_i ≥ σ1/1000 at
    n = 768. Trained GPT-2 matrices have σ_min/σ1 of 1e-1 to 1e-3, so the values (returned in
    float32, as the SVD's are) match the SVD's to float32 rounding. Below √(n·ε)·σ1 (a rank-deficient
    matrix) a value is noise of that size, or 0, never NaN.
    """
    return [_gram_singular_values(w) for w in matrices]


# float64 scratch per matrix shape, reused across calls: a fresh one costs a page fault per 4 KiB
# (0.5 s per gpt2 checkpoint); GPT-2 has three block shapes (five with the embeddings).
_SCRATCH: dict[tuple[int, ...], np.ndarray] = {}


def _gram_singular_values(w: torch.Tensor) -> torch.Tensor:
    shape = tuple(w.shape)
    if shape not in _SCRATCH:
        _SCRATCH[shape] = np.empty(shape, dtype=np.float64)
    x = _SCRATCH[shape]  # [m, n], C order; x.T is the same memory in Fortran order
    x[...] = w.detach().float().cpu().numpy()
    tall = x.shape[0] >= x.shape[1]
    gram = dsyrk(1.0, x.T, trans=0 if tall else 1)  # xᵀx (tall) or xxᵀ (wide), upper triangle
    values = scipy.linalg.eigvalsh(gram, lower=False, driver="evd", overwrite_a=True, check_finite=False)
    return torch.from_numpy(np.sqrt(np.clip(values[::-1], 0.0, None))).float().to(w.device)


def svdvals(w: torch.Tensor) -> torch.Tensor:
    """Descending singular values of one matrix (`singular_values_of`)."""
    return singular_values_of([w])[0]


def singular_values(model: GPT, embeddings: bool = False) -> dict[str, torch.Tensor]:
    matrices = weight_matrices(model, embeddings)
    return dict(zip(matrices, singular_values_of(list(matrices.values()))))


def summarize(s: torch.Tensor) -> dict:
    """spectral norm σ1; stable rank ‖W‖F² / ‖W‖2²; condition number σ1 / σ(5th percentile);
    entropy effective rank exp(−Σ p log p) with p = σ / Σσ (Roy and Vetterli, 2007)."""
    s = s.double()
    top = s[0].item()
    p = s / s.sum()
    p = p[p > 0]
    return {"spectral_norm": top, "stable_rank": (s.square().sum() / top ** 2).item() if top else 0.0,
            "condition": top / torch.quantile(s, 0.05).item() if torch.quantile(s, 0.05) > 0 else math.inf,
            "effective_rank": math.exp(-(p * p.log()).sum().item())}


def spectrum_distance(s: torch.Tensor, reference: torch.Tensor) -> float:
    """‖σ − σ_ref‖ / ‖σ_ref‖: how far a layer's spectrum is from a reference (an endpoint's)."""
    return ((s - reference).norm() / reference.norm()).item()
