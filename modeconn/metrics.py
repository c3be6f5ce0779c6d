"""Validation loss and token error of a language model over a fixed set of batches."""

from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn.functional as F

Logits = Callable[[torch.Tensor], torch.Tensor]


def add_sums(sums: Iterable[tuple[float, int, int]]) -> tuple[float, int, int]:
    """(summed cross-entropy, errors, tokens) of many batches, added in the order given: the order
    fixes the rounding, so every way of splitting the batches (ranks, shards) adds them alike."""
    loss_sum, errors, tokens = 0.0, 0, 0
    for batch_loss, batch_errors, batch_tokens in sums:
        loss_sum, errors, tokens = loss_sum + batch_loss, errors + batch_errors, tokens + batch_tokens
    return loss_sum, errors, tokens


def means(loss_sum: float, errors: float, tokens: float) -> dict:
    """Token-weighted mean cross-entropy (nats) and token error (1 - next-token accuracy)."""
    return {"loss": loss_sum / tokens, "token_error": errors / tokens, "tokens": int(tokens)}


@torch.no_grad()
def evaluate_lm(logits_fn: Logits, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """`means` over the batches; also the sums, so that ranks can add them up before dividing."""
    loss_sum, errors, tokens = add_sums(batch_sums(logits_fn(x), y) for x, y in batches)
    return {**means(loss_sum, errors, tokens), "loss_sum": loss_sum, "errors": errors}


@torch.no_grad()
def batch_sums(logits: torch.Tensor, targets: torch.Tensor) -> tuple[float, int, int]:
    """(summed cross-entropy, wrong next-token predictions, tokens) of one batch."""
    logits, targets = logits.float(), targets.to(logits.device)
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="sum").item()
    return loss, int((logits.argmax(-1) != targets).sum().item()), targets.numel()
