"""Batch-level Mixup (Zhang et al. 2018) and CutMix (Yun et al. 2019) with soft, label-smoothed targets.

Follows timm's ``mixup.py`` in ``mode='batch'``: one lambda per batch, each image is mixed with the batch reversed
(``x.flip(0)``); when both alphas are set, CutMix is chosen with probability ``switch_prob``; mixing happens at all
with probability ``prob``; CutMix's box is centred uniformly, may be clipped by the border, and lambda is then
corrected to the box's true area (``correct_lam=True``). Targets are ``lam * onehot(y) + (1 - lam) *
onehot(y.flip(0))`` with timm's smoothing (``off = eps / K``, ``on = 1 - eps + eps / K``), which is exactly what
``F.cross_entropy(label_smoothing=eps)`` uses. Random draws come only from the generator passed in.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .rng import beta, coin, randrange

__all__ = ["MixupCutmix", "MixParams", "SoftTargetCrossEntropy", "smooth_one_hot", "cutmix_box"]


def smooth_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """``(B,)`` long → ``(B, num_classes)`` float: ``1 - eps + eps / K`` on the label, ``eps / K`` elsewhere."""
    off = smoothing / num_classes
    out = torch.full((labels.shape[0], num_classes), off, device=labels.device)  # (B, K)
    return out.scatter_(1, labels.long()[:, None], 1.0 - smoothing + off)


def cutmix_box(H: int, W: int, lam: float, g: torch.Generator) -> tuple[int, int, int, int]:
    """timm ``rand_bbox``: a box of side ``sqrt(1 - lam)`` of the image, centred uniformly, clipped to the image.

    Returns ``(y0, y1, x0, x1)``.
    """
    ratio = (1.0 - lam) ** 0.5
    cut_h, cut_w = int(H * ratio), int(W * ratio)
    cy, cx = randrange(g, 0, H), randrange(g, 0, W)
    y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, H)
    x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, W)
    return y0, y1, x0, x1


@dataclass(frozen=True)
class MixParams:
    """What one call decided: ``lam`` after area correction, and the CutMix box if any."""

    lam: float
    box: tuple[int, int, int, int] | None = None


class MixupCutmix:
    """``(images (B, C, H, W) float, labels (B,) long, generator) -> (images, soft_targets (B, num_classes))``."""

    def __init__(self, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0, prob: float = 1.0,
                 switch_prob: float = 0.5, label_smoothing: float = 0.1, num_classes: int = 1000):
        self.mixup_alpha, self.cutmix_alpha = mixup_alpha, cutmix_alpha
        self.prob, self.switch_prob = prob, switch_prob
        self.label_smoothing, self.num_classes = label_smoothing, num_classes

    def params(self, H: int, W: int, g: torch.Generator) -> MixParams:
        """Draw this batch's lambda (and box), as timm's ``_params_per_batch`` + ``cutmix_bbox_and_lam``."""
        if not (self.mixup_alpha > 0 or self.cutmix_alpha > 0) or not coin(g, self.prob):
            return MixParams(1.0)
        use_cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha <= 0 or coin(g, self.switch_prob))
        lam = beta(g, *(self.cutmix_alpha,) * 2) if use_cutmix else beta(g, *(self.mixup_alpha,) * 2)
        if not use_cutmix:
            return MixParams(lam)
        y0, y1, x0, x1 = cutmix_box(H, W, lam, g)
        return MixParams(1.0 - (y1 - y0) * (x1 - x0) / float(H * W), (y0, y1, x0, x1))

    def apply(self, images: torch.Tensor, labels: torch.Tensor, p: MixParams) -> tuple[torch.Tensor, torch.Tensor]:
        """Mix with given parameters; returns new tensors (the inputs are not modified)."""
        targets = self.targets(labels, p.lam)
        if p.lam == 1.0:
            return images, targets
        flipped = images.flip(0)  # (B, C, H, W): sample i is paired with sample B - 1 - i
        if p.box is None:
            return images * p.lam + flipped * (1.0 - p.lam), targets
        y0, y1, x0, x1 = p.box
        out = images.clone()
        out[:, :, y0:y1, x0:x1] = flipped[:, :, y0:y1, x0:x1]
        return out, targets

    def targets(self, labels: torch.Tensor, lam: float) -> torch.Tensor:
        y1 = smooth_one_hot(labels, self.num_classes, self.label_smoothing)  # (B, K)
        return y1 * lam + y1.flip(0) * (1.0 - lam)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor,
                 g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return self.apply(images, labels, self.params(images.shape[-2], images.shape[-1], g))

    def __repr__(self) -> str:
        return (f"MixupCutmix(mixup_alpha={self.mixup_alpha}, cutmix_alpha={self.cutmix_alpha}, prob={self.prob}, "
                f"switch_prob={self.switch_prob}, label_smoothing={self.label_smoothing}, "
                f"num_classes={self.num_classes})")


class SoftTargetCrossEntropy(nn.Module):
    """``mean_b sum_k -target[b, k] * log_softmax(logits)[b, k]`` (timm's ``SoftTargetCrossEntropy``)."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()
