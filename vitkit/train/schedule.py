"""Per-step learning-rate schedules: linear warm-up, then cosine (or linear, or constant) decay to ``min_lr``.

The schedule is a pure function of the step, so it has no state to checkpoint beyond the step counter (resuming
cannot drift). Conventions (vit_jax ``utils.create_learning_rate_schedule``, timm ``CosineLRScheduler`` per update):
optimiser step ``s`` (0-based) uses ``lr * (s + 1) / warmup`` during warm-up, so the first update is already
non-zero, then ``min_lr + (lr - min_lr) * 0.5 * (1 + cos(pi * p))`` with ``p = (s - warmup) / (total - warmup)``.

A time-budgeted run changes its length as the measured speed changes (``vitkit.train.budget``). After the warm-up,
``replanned`` lays out only the rest of the decay again, from the progress the current step has reached: the rate
stays continuous and never rises, so a transient slowdown cannot restart the cosine; restarting
a cosine from the current rate instead would keep the rate near its top at every re-plan, then drop it at the end.
The decays laid out so far are ``segments`` (saved with the run state): the schedule stays a function of the step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
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
    # re-planned decays, (first step, its progress, end step) by first step; empty: one decay after the warm-up
    segments: tuple[tuple[int, float, int], ...] = ()

    def __call__(self, step: int) -> float:
        """The learning rate of optimiser step ``step`` (0-based)."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return self.lr
        progress = self.progress(step)
        if self.kind == "linear":
            return self.min_lr + (self.lr - self.min_lr) * (1.0 - progress)
        return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def progress(self, step: int) -> float:
        """How far the decay is at ``step``: 0 at the end of the warm-up, 1 at ``total_steps``. A re-planned decay
        (``segments``) runs from the progress its first step had to 1 at its own end."""
        start, first, end = self._segment(step)
        return first + (1.0 - first) * min(1.0, (step - start) / max(1, end - start))

    def _segment(self, step: int) -> tuple[int, float, int]:
        """The decay ``step`` belongs to: the last one laid out at or before it, else the one after the warm-up."""
        for segment in reversed(self.segments):
            if segment[0] <= step:
                return segment
        return self.warmup_steps, 0.0, self.total_steps

    def replanned(self, step: int, total_steps: int) -> "WarmupSchedule":
        """This schedule with its length changed to ``total_steps`` at ``step``. After the warm-up, the rest of the
        decay, from the progress ``step`` has reached, is stretched or compressed over the steps left: the rate stays
        continuous and never rises, and keeps the decay's shape; the steps before keep their rates."""
        if step < self.warmup_steps or self.kind == "constant":
            return replace(self, total_steps=total_steps)
        kept = tuple(s for s in self.segments or (self._segment(step),) if s[0] < step)
        return replace(self, total_steps=total_steps, segments=kept + ((step, self.progress(step), total_steps),))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Give every parameter group ``lr`` times its ``lr_scale`` (layer-wise decay; 1 when absent)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
