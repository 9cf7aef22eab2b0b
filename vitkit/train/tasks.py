"""Training objectives as small objects, separate from the loop (timm ``task/`` and DeiT ``losses.py`` style).

A task turns ``(model, batch, generator)`` into a dict holding the scalar ``loss`` to minimise and summed metrics
(``correct``, ``count``); the loop only backpropagates ``loss`` and averages the rest. A task also evaluates a model on
a held-out loader and names the metric ``best/`` is selected on. Masked-image modelling will be a third task here,
not a fork of the loop.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitkit.data import MixupCutmix, SoftTargetCrossEntropy
from vitkit.families.contract import FamilyModel

__all__ = ["Task", "Evaluation", "ClassifyTask", "DistillTask", "distillation_loss", "load_teacher",
           "TeacherInput"]

log = logging.getLogger(__name__)


@dataclass
class Evaluation:
    """Scalar metrics of one evaluation (``loss``, ``top1``, ...) and the task's full result object, if any."""

    metrics: dict[str, float]
    details: Any = None
    num_samples: int = 0


class Task(Protocol):
    metric: str  # validation metric that selects best/
    higher_is_better: bool

    def prepare(self, model: nn.Module) -> None: ...
    def __call__(self, model: nn.Module, batch: Any, g: torch.Generator) -> dict[str, Tensor]: ...
    def evaluate(self, model: nn.Module, loader, device: torch.device, amp_dtype: torch.dtype | None,
                 class_names: list[str] | None = None) -> Evaluation: ...


class ClassifyTask:
    """Cross-entropy on hard labels (with label smoothing), or on Mixup/CutMix soft targets (timm's
    ``SoftTargetCrossEntropy``; the smoothing is then folded into the targets, as timm does)."""

    metric, higher_is_better = "top1", True

    def __init__(self, num_classes: int, mixup: MixupCutmix | None = None, label_smoothing: float = 0.0):
        self.num_classes, self.mixup, self.label_smoothing = num_classes, mixup, label_smoothing
        self.soft_ce = SoftTargetCrossEntropy()

    def prepare(self, model: nn.Module) -> None:
        pass

    def mix(self, images: Tensor, labels: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
        """``(images, targets)``: targets are (B, K) soft when mixing, else the (B,) labels."""
        if self.mixup is None:
            return images, labels
        return self.mixup(images, labels, g)

    def criterion(self, logits: Tensor, targets: Tensor) -> Tensor:
        logits = logits.float()  # the loss in float32 under autocast
        if targets.ndim == 2:
            return self.soft_ce(logits, targets)
        return F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)

    @staticmethod
    def counts(logits: Tensor, targets: Tensor) -> dict[str, Tensor]:
        """Training accuracy against the dominant class of the (possibly mixed) targets."""
        hard = targets.argmax(dim=-1) if targets.ndim == 2 else targets
        return {"correct": (logits.argmax(dim=-1) == hard).sum(), "count": torch.tensor(hard.numel())}

    def __call__(self, model: nn.Module, batch: Any, g: torch.Generator) -> dict[str, Tensor]:
        images, labels = batch
        images, targets = self.mix(images, labels, g)
        logits = model(images)  # (B, K)
        return {"loss": self.criterion(logits, targets), **self.counts(logits.detach(), targets)}

    def evaluate(self, model: nn.Module, loader, device: torch.device, amp_dtype: torch.dtype | None,
                 class_names: list[str] | None = None) -> Evaluation:
        from vitkit.evaluate import evaluate
        r = evaluate(model, loader, device=device, amp_dtype=amp_dtype, class_names=class_names, progress=False)
        metrics = {"loss": r.loss, "top1": r.top1}
        if r.top5 is not None:
            metrics["top5"] = r.top5
        return Evaluation(metrics, r, r.num_samples)


# ------------------------------------------------------------------------------------------------- distillation
def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, kind: str, tau: float = 1.0) -> Tensor:
    """DeiT ``losses.py``: *hard* = CE(student, argmax teacher); *soft* = KL(student/τ ‖ teacher/τ)·τ² summed and
    divided by ``student_logits.numel()`` (DeiT's normalisation, kept for parity; see facebookresearch/deit #61)."""
    student_logits, teacher_logits = student_logits.float(), teacher_logits.float()
    if kind == "hard":
        return F.cross_entropy(student_logits, teacher_logits.argmax(dim=1))
    kl = F.kl_div(F.log_softmax(student_logits / tau, dim=1), F.log_softmax(teacher_logits / tau, dim=1),
                  reduction="sum", log_target=True)
    return kl * (tau * tau) / student_logits.numel()


@dataclass
class TeacherInput:
    """Re-normalise (and resize) the student's input batch for a teacher trained with other statistics."""

    student_mean: tuple[float, ...]
    student_std: tuple[float, ...]
    teacher_mean: tuple[float, ...]
    teacher_std: tuple[float, ...]
    teacher_size: tuple[int, int] | None = None
    interpolation: str = "bicubic"

    def __call__(self, x: Tensor) -> Tensor:
        if (self.student_mean, self.student_std) != (self.teacher_mean, self.teacher_std):
            s_mean, s_std, t_mean, t_std = (torch.tensor(v, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
                                            for v in (self.student_mean, self.student_std,
                                                      self.teacher_mean, self.teacher_std))
            x = (x * s_std + s_mean - t_mean) / t_std  # (B, C, H, W) in the teacher's normalisation
        if self.teacher_size is not None and tuple(x.shape[-2:]) != tuple(self.teacher_size):
            x = F.interpolate(x, size=self.teacher_size, mode=self.interpolation, align_corners=False)
        return x


class DistillTask:
    """DeiT's ``DistillationLoss``: ``(1 - α) · base(cls head, targets) + α · distill(dist head, teacher)``.

    The teacher sees the same (augmented, mixed) batch under ``no_grad``. A distilled DeiT is switched to return both
    heads while training (``set_distilled_training``); a model with one head uses it for both terms (the
    "class-token only" row of DeiT Table 3).
    """

    metric, higher_is_better = "top1", True

    def __init__(self, base: ClassifyTask, teacher: nn.Module, kind: str = "hard", alpha: float = 0.5,
                 tau: float = 1.0, teacher_input: TeacherInput | None = None):
        self.base, self.teacher, self.kind, self.alpha, self.tau = base, teacher.eval(), kind, alpha, tau
        self.two_heads = False  # set by prepare: the student returns (class-head, distillation-head) logits
        self.teacher_input = teacher_input or (lambda x: x)
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    def prepare(self, model: FamilyModel) -> None:
        self.two_heads = model.set_distilled_training(True)

    def __call__(self, model: nn.Module, batch: Any, g: torch.Generator) -> dict[str, Tensor]:
        images, labels = batch
        images, targets = self.base.mix(images, labels, g)
        out = model(images)
        logits, logits_dist = out if self.two_heads else (out, out)  # (B, K) each
        with torch.no_grad():
            teacher_logits = self.teacher(self.teacher_input(images))  # (B, K)
        base = self.base.criterion(logits, targets)
        distill = distillation_loss(logits_dist, teacher_logits, self.kind, self.tau)
        loss = (1.0 - self.alpha) * base + self.alpha * distill
        mean_logits = (logits.detach() + logits_dist.detach()) / 2  # what the model predicts at inference
        return {"loss": loss, "base_loss": base.detach(), "distill_loss": distill.detach(),
                **self.base.counts(mean_logits, targets)}

    def evaluate(self, model, loader, device, amp_dtype, class_names=None) -> Evaluation:
        return self.base.evaluate(model, loader, device, amp_dtype, class_names)


def load_teacher(teacher: str, pretrained: str | None = None) -> nn.Module:
    """A teacher from a vitkit model folder, a run folder (its ``checkpoints/best``, else ``last``), or a
    registered name plus ``pretrained`` weights: the same resolution as ``vitkit eval`` (``load_target``)."""
    from vitkit.evaluate.targets import load_target
    if os.path.isdir(teacher):
        return load_target(teacher).model
    return load_target(pretrained, teacher).model
