"""Learning-rate schedules: linear warm-up, then cosine decay, a tri-stage hold and exponential decay, or a constant
rate. The same function serves pretraining (OptimConfig) and each phase of fine-tuning."""
from __future__ import annotations

import math

from d2v.core.errors import ConfigError


def lr_at(o, step: int, total: int) -> float:
    """Learning rate of update `step` (0-based) of `total`, for a schedule `o` with the fields of OptimConfig: lr
    (the peak), schedule ("cosine" | "tri_stage" | "constant"), warmup_fraction, hold_fraction, final_lr_ratio."""
    warmup = int(round(o.warmup_fraction * total))
    if step < warmup:
        start = 0.01 if o.schedule == "tri_stage" else 0.0
        return o.lr * (start + (1 - start) * (step + 1) / warmup)
    if o.schedule == "constant":
        return o.lr
    if o.schedule == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return o.lr * (o.final_lr_ratio + (1 - o.final_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
    if o.schedule == "tri_stage":
        hold = int(round(o.hold_fraction * total))
        if step < warmup + hold:
            return o.lr
        progress = (step - warmup - hold) / max(1, total - warmup - hold)
        return o.lr * math.exp(math.log(max(o.final_lr_ratio, 1e-8)) * progress)
    raise ConfigError(f"unknown lr schedule {o.schedule!r}; use cosine, tri_stage or constant")


def set_lr(optimizer, lr: float) -> None:
    """Every parameter group at `lr`, times the group's "lr_scale" where it has one (layer-wise decay)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"] if "lr_scale" in group else lr
