"""Validation loss and token error of a language model over a fixed set of batches."""

from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn.functional as F

Logits = Callable[[torch.Tensor], torch.Tensor]


@torch.no_grad()
def evaluate_lm(logits_fn: Logits, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """Token-weighted mean cross-entropy (nats) and token error (1 - next-token accuracy).

    Also returns the sums, so that ranks can add them up before dividing.
    """
    loss_sum, errors, tokens = 0.0, 0, 0
    for x, y in batches:
        batch_loss, batch_errors, batch_tokens = batch_sums(logits_fn(x), y)
        loss_sum, errors, tokens = loss_sum + batch_loss, errors + batch_errors, tokens + batch_tokens
    return {"loss": loss_sum / tokens, "token_error": errors / tokens,
            "loss_sum": loss_sum, "errors": errors, "tokens": tokens}


@torch.no_grad()
def batch_sums(logits: torch.Tensor, targets: torch.Tensor) -> tuple[float, int, int]:
    """(summed cross-entropy, wrong next-token predictions, tokens) of one batch."""
    logits, targets = logits.float(), targets.to(logits.device)
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="sum").item()
    return loss, int((logits.argmax(-1) != targets).sum().item()), targets.numel()
