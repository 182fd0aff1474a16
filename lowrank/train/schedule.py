"""Learning-rate schedules: the LR of an optimizer step as a plain function of the step.

    warmup:   lr(s) = lr * (s + 1) / (warmup + 1)             for s < warmup
    constant: lr(s) = lr
    linear:   lr(s) = min_lr + (lr - min_lr) * (1 - p)
    cosine:   lr(s) = min_lr + (lr - min_lr) * (1 + cos(pi * p)) / 2
              with p = (s - warmup) / max(1, total - warmup), the progress after warmup

s counts optimizer steps from 0. Warmup starts above zero, so the first step trains. A function
rather than a torch LR scheduler object: its whole state is the step number, which the
checkpoint already holds, so resuming cannot drift (nanoGPT's `get_lr`).
"""

from __future__ import annotations

import math

from ..errors import ConfigError

SCHEDULES = ("constant", "linear", "cosine")


def warmup_steps_for(total_steps: int, warmup_steps: int = 0, warmup_ratio: float = 0.0) -> int:
    """The warmup length: warmup_steps if set, else warmup_ratio of the run, rounded up."""
    if warmup_steps < 0 or not 0.0 <= warmup_ratio < 1.0:
        raise ConfigError(f"warmup_steps={warmup_steps}, warmup_ratio={warmup_ratio}: expected >= 0 and a ratio in [0, 1)")
    return warmup_steps if warmup_steps else math.ceil(warmup_ratio * total_steps)


def lr_at(step: int, total_steps: int, lr: float, schedule: str = "cosine", warmup: int = 0,
          min_lr: float = 0.0) -> float:
    """The learning rate of optimizer step `step` (0-based) in a run of total_steps steps."""
    if schedule not in SCHEDULES:
        raise ConfigError(f"lr_scheduler={schedule!r}: expected one of {', '.join(SCHEDULES)}")
    if step < warmup:
        return lr * (step + 1) / (warmup + 1)
    if schedule == "constant":
        return lr
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    if schedule == "linear":
        return min_lr + (lr - min_lr) * (1.0 - progress)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
