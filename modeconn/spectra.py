"""Singular-value spectra of a GPT-2's weight matrices, and their summaries.

The matrices of block i (our layout, [out, in]): q, k, v (rows 0:d, d:2d, 2d:3d of the fused
attention weight c_attn, GPT-2's order), o (attn.c_proj), fc (mlp.c_fc), proj (mlp.c_proj);
optionally the token and position embeddings.
"""

from __future__ import annotations

import math

import torch

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
def svdvals(w: torch.Tensor) -> torch.Tensor:
    """Descending singular values, computed in float64 for the small ones' sake."""
    return torch.linalg.svdvals(w.detach().double()).float()


def singular_values(model: GPT, embeddings: bool = False) -> dict[str, torch.Tensor]:
    return {name: svdvals(w) for name, w in weight_matrices(model, embeddings).items()}


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
