"""Training objectives as small objects, separate from the loop (timm ``task/`` and DeiT ``losses.py`` style).

A task turns ``(model, batch, generator)`` into a dict holding the scalar ``loss`` to minimise and summed metrics
(``correct``, ``count``); the loop only backpropagates ``loss`` and averages the rest. A task also evaluates a model on
a held-out loader and names the metric ``best/`` is selected on. Classification, distillation and masked-image
modelling are three tasks of the one loop.
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
           "TeacherInput", "MaskedImageModellingTask", "TokenizerInput"]

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


# ------------------------------------------------------------------------------------- masked image modelling
@dataclass
class TokenizerInput:
    """The tokenizer's view of a training batch: the model's normalisation undone (raw RGB in [0, 1]) and the image
    resized to ``size`` = the patch grid × the tokenizer's downsampling (BEiT: 14 × 8 = 112 px for 224/16)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    size: tuple[int, int]

    def __call__(self, x: Tensor) -> Tensor:
        mean, std = (torch.tensor(v, device=x.device, dtype=torch.float32).view(1, -1, 1, 1)
                     for v in (self.mean, self.std))
        raw = x.float() * std + mean  # (B, 3, H, W) in [0, 1]
        if tuple(raw.shape[-2:]) != self.size:
            raw = F.interpolate(raw, size=self.size, mode="bilinear", align_corners=False, antialias=True)
        return raw.clamp(0.0, 1.0)


class MaskedImageModellingTask:
    """BEiT's pre-training objective (Bao et al. 2021, §2.3 eq. 1): for each image, a blockwise mask M of about 40%
    of its patches (``vitkit.data.BlockwiseMasking``, drawn from the step's generator, so a resumed run draws the same
    masks), the masked patches replaced by the model's mask token, and cross-entropy between the model's logits at
    the masked positions and the visual tokenizer's ids of the whole image there:

        max Σ_x E_M [ Σ_{i ∈ M} log p_MIM(z_i | x^M) ]

    ``mim_top1`` (the share of masked positions whose id is predicted) selects ``best/``."""

    metric, higher_is_better = "mim_top1", True

    def __init__(self, tokenizer: nn.Module, masking, tokenizer_input: TokenizerInput, eval_seed: int = 0):
        self.tokenizer, self.masking, self.tokenizer_input = tokenizer, masking, tokenizer_input
        self.eval_seed = eval_seed
        for p in self.tokenizer.parameters():
            p.requires_grad_(False)

    def prepare(self, model: FamilyModel) -> None:
        if model.mim_vocab_size != self.tokenizer.vocab_size:
            raise ValueError(f"the model predicts {model.mim_vocab_size} visual tokens but the tokenizer has "
                             f"{self.tokenizer.vocab_size}: build it with mim_vocab_size={self.tokenizer.vocab_size}")

    def masks(self, batch: int, g: torch.Generator, device: torch.device) -> Tensor:
        """(B, N) bool: one blockwise mask per image, row-major over the patch grid."""
        return torch.stack([self.masking(g).flatten() for _ in range(batch)]).to(device)

    def targets(self, images: Tensor) -> Tensor:
        """(B, N) token ids of the unmasked images."""
        self.tokenizer.eval()
        with torch.no_grad(), torch.autocast(images.device.type, enabled=False):
            return self.tokenizer.tokenize(self.tokenizer_input(images)).flatten(1)

    def _step(self, model: nn.Module, images: Tensor, mask: Tensor) -> dict[str, Tensor]:
        labels = self.targets(images)[mask]  # (M,) ids at the masked positions, image by image, row-major
        logits = model(images, mask=mask)  # (M, V): FamilyModel.forward with a mask, through any wrapper
        return {"loss": F.cross_entropy(logits.float(), labels),
                "correct": (logits.detach().argmax(dim=-1) == labels).sum(), "count": torch.tensor(labels.numel())}

    def __call__(self, model: nn.Module, batch: Any, g: torch.Generator) -> dict[str, Tensor]:
        images, _ = batch
        return self._step(model, images, self.masks(images.shape[0], g, images.device))

    def evaluate(self, model: nn.Module, loader, device: torch.device, amp_dtype: torch.dtype | None,
                 class_names: list[str] | None = None) -> Evaluation:
        """Mean masked-token cross-entropy and accuracy over ``loader``, with masks from a generator seeded by
        ``eval_seed`` (the same masks at every evaluation)."""
        from vitkit.train.process import autocast
        was_training = model.training
        model.eval()
        g = torch.Generator().manual_seed(self.eval_seed)
        loss_sum, correct, count, images_seen = 0.0, 0, 0, 0
        with torch.no_grad():
            for images, _ in loader:
                images = images.to(device)
                with autocast(device, amp_dtype):
                    out = self._step(model, images, self.masks(images.shape[0], g, device))
                n = int(out["count"])
                loss_sum, correct, count = loss_sum + float(out["loss"]) * n, correct + int(out["correct"]), count + n
                images_seen += images.shape[0]
        model.train(was_training)
        metrics = {"loss": loss_sum / max(count, 1), "mim_top1": correct / max(count, 1)}  # a fraction, as top1
        return Evaluation(metrics, None, images_seen)
