"""Learning-rate schedules as pure functions of the optimizer step (docs/design.md §6, §12)."""

from __future__ import annotations

import math
from typing import Literal


def lr_factor(
    step: int,
    n_steps: int,
    schedule: Literal["constant", "cosine", "linear"],
    warmup_steps: int = 0,
    cooldown_steps: int = 0,
    min_lr_factor: float = 0.1,
) -> float:
    """Multiplier of the base lr at optimizer step `step` (0-based) of `n_steps`.

    Linear warm-up from 1/warmup_steps to 1 over the first `warmup_steps`; then the schedule
    decays from 1 to `min_lr_factor` (cosine: min + (1 - min)(1 + cos(pi t)) / 2, linear:
    1 - (1 - min) t, with t going from 0 at the first decay step to 1 at the last; constant: 1);
    over the last `cooldown_steps` the multiplier is scaled by (C - i) / C at cooldown step i,
    falling linearly towards 0.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, n_steps - warmup_steps - cooldown_steps)
    t = min(1.0, (step - warmup_steps) / max(1, decay_steps - 1))
    if schedule == "cosine":
        factor = min_lr_factor + (1 - min_lr_factor) * 0.5 * (1 + math.cos(math.pi * t))
    elif schedule == "linear":
        factor = 1 - (1 - min_lr_factor) * t
    else:
        factor = 1.0
    cooldown_start = n_steps - cooldown_steps
    if cooldown_steps and step >= cooldown_start:
        factor *= max(0.0, 1 - (step - cooldown_start) / cooldown_steps)
    return factor
