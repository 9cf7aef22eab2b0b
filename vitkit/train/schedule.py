"""Per-step learning-rate schedules: linear warm-up, then cosine (or linear, or constant) decay to ``min_lr``.

The schedule is a pure function of the step, so it has no state to checkpoint beyond the step counter (resuming
cannot drift). Conventions (vit_jax ``utils.create_learning_rate_schedule``, timm ``CosineLRScheduler`` per update):
optimiser step ``s`` (0-based) uses ``lr * (s + 1) / warmup`` during warm-up, so the first update is already
non-zero, then ``min_lr + (lr - min_lr) * 0.5 * (1 + cos(pi * p))`` with ``p = (s - warmup) / (total - warmup)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

__all__ = ["WarmupSchedule", "set_lr"]


@dataclass(frozen=True)
class WarmupSchedule:
    lr: float  # peak learning rate
    total_steps: int
    warmup_steps: int = 0
    min_lr: float = 0.0
    kind: Literal["cosine", "linear", "constant"] = "cosine"

    def __call__(self, step: int) -> float:
        """The learning rate of optimiser step ``step`` (0-based)."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return self.lr
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        if self.kind == "linear":
            return self.min_lr + (self.lr - self.min_lr) * (1.0 - progress)
        return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Give every parameter group ``lr`` times its ``lr_scale`` (layer-wise decay; 1 when absent)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
