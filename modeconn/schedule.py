"""Learning-rate schedules: a multiplier of the peak lr as a function of the optimizer step.

Kinds (warm-up is linear from 0 over `warmup_steps`, or `warmup_fraction` of the run):
- cosine: cosine decay from 1 to `min_lr_ratio` over the remaining steps
- linear: linear decay from 1 to `min_lr_ratio`
- constant: 1 after warm-up
- wsd: warm-up, stable at 1, then linear decay to `min_lr_ratio` over the last `decay_fraction`
The multiplier depends only on the step, so a resumed run needs no scheduler state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

from modeconn.errors import ConfigError


@dataclass
class ScheduleConfig:
    kind: Literal["cosine", "linear", "constant", "wsd"] = "cosine"
    warmup_steps: Optional[int] = None  # overrides warmup_fraction when given
    warmup_fraction: float = 0.05
    min_lr_ratio: float = 0.1  # final lr = min_lr_ratio * peak lr
    decay_fraction: float = 0.2  # wsd: the share of steps spent decaying

    def __post_init__(self):
        if not 0 <= self.warmup_fraction < 1 or not 0 <= self.min_lr_ratio <= 1 or not 0 < self.decay_fraction <= 1:
            raise ConfigError("schedule: warmup_fraction in [0, 1), min_lr_ratio in [0, 1], decay_fraction in (0, 1]")


def lr_multiplier(cfg: ScheduleConfig, step: int, total_steps: int) -> float:
    """Multiplier for optimizer step `step` (0-based) of `total_steps`."""
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(cfg.warmup_fraction * total_steps)
    if step < warmup:
        return (step + 1) / warmup
    if cfg.kind == "constant":
        return 1.0
    floor = cfg.min_lr_ratio
    if cfg.kind == "wsd":
        decay_start = total_steps - int(math.ceil(cfg.decay_fraction * total_steps))
        if step < max(decay_start, warmup):
            return 1.0
        progress = (step - max(decay_start, warmup)) / max(1, total_steps - max(decay_start, warmup))
        return 1.0 - (1.0 - floor) * min(progress, 1.0)
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    if cfg.kind == "linear":
        return 1.0 - (1.0 - floor) * progress
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
