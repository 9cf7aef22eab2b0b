"""Test-time augmentation: score an image by the mean of its logits and those of its mirror image.

Left-right flip averaging is the evaluation of fast CIFAR-10 training (Keller Jordan's airbench averages the logits
of both views, as here). A recipe asks for it with ``train.eval_tta: hflip`` (validation, best-checkpoint selection
and the final test all use it), ``vitkit eval`` with ``--tta hflip``. It doubles the cost of evaluation.
"""
from __future__ import annotations

from torch import Tensor, nn

__all__ = ["TTA_MODES", "FlipAverage", "with_tta"]

TTA_MODES = ("none", "hflip")


class FlipAverage(nn.Module):
    """``(model(x) + model(x mirrored left-right)) / 2`` for images ``x`` of shape (B, C, H, W)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    def forward(self, x: Tensor) -> Tensor:
        return (self.model(x) + self.model(x.flip(-1))) / 2  # (B, classes)


def with_tta(model, mode: str):
    """``model`` evaluated with test-time augmentation ``mode`` (one of ``TTA_MODES``)."""
    if mode == "none":
        return model
    if mode == "hflip":
        return FlipAverage(model)
    raise ValueError(f"test-time augmentation must be one of {', '.join(TTA_MODES)}, got {mode!r}")
