"""The learning rate of each iteration: linear warmup, then constant, linear or cosine decay."""
from __future__ import annotations

import math

SCHEDULES = ("constant", "linear", "cosine")


def lr_at(i: int, total: int, lr: float, schedule: str = "constant", warmup: int = 0, min_lr: float = 0.0) -> float:
    """The lr of iteration i (0-based) of total: lr*(i+1)/warmup during warmup, then the schedule
    from lr down to min_lr over the remaining total - warmup iterations."""
    if i < warmup:
        return lr * (i + 1) / warmup
    if schedule == "constant":
        return lr
    t = (i - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return lr - (lr - min_lr) * t
    if schedule == "cosine":
        return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * t))
    raise ValueError(f"unknown lr schedule {schedule!r}")
