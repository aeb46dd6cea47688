"""Learning-rate schedules as pure functions of the optimiser step (open_clip's scheduler.py)."""

from __future__ import annotations

import math


def warmup_cosine(
    step: int, base_lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0
) -> float:
    """Linear warm-up from base_lr / warmup_steps to base_lr, then cosine decay to
    base_lr * min_lr_ratio at `total_steps`."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    floor = base_lr * min_lr_ratio
    return floor + 0.5 * (base_lr - floor) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer, lr: float) -> None:
    """Write `lr` into every parameter group (scaled by the group's `lr_scale`, default 1)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
