"""DeiT (Touvron et al., "Training data-efficient image transformers & distillation through attention", ICML 2021,
arXiv 2012.12877).

The non-distilled DeiTs are ViTs with a different training recipe and ImageNet normalisation. The distilled ones add a
distillation token after the class token (token order [cls, dist, patches], the position embedding covers both) and a
second head on it. At inference the model returns the mean of the two heads' logits, as facebookresearch/deit's
``DistilledVisionTransformer`` and timm do; ``set_distilled_training(True)`` makes a training-mode forward return
both logits for the distillation loss (timm's switch).

transformers' ``DeiTForImageClassification`` keeps the distillation token in the sequence but classifies from the class
token alone (no distillation head); ``dist_head=False`` builds that model so its checkpoints load exactly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from vitkit.families.contract import zero_init_
from vitkit.families.vit.model import ViTConfig, VisionTransformer

__all__ = ["PlainDeiTConfig", "DeiTConfig", "DeiT", "DistilledVisionTransformer"]


@dataclass
class PlainDeiTConfig(ViTConfig):
    """ViT's fields; the official constructor is timm 0.3.2's ``VisionTransformer`` (facebookresearch/deit
    ``models.py``@7e160fe passes every keyword to it; ``qk_scale`` is ViT's field)."""

    refused_options: ClassVar[dict[str, str]] = {
        "hybrid_backbone": "an nn.Module wrapped by timm 0.3.2's HybridEmbed, not data; vitkit builds the ViT paper's "
                           "ResNet hybrid itself from resnet={'num_layers': ..., 'width_factor': ...} (R50+ViT-B/16: "
                           "vit_base_r50_s16_224 / _384)"}


@dataclass
class DeiTConfig(PlainDeiTConfig):
    dist_head: bool = True  # False: no head on the distillation token (transformers' DeiTForImageClassification)


class DeiT(VisionTransformer):
    """A non-distilled DeiT: a ViT with DeiT's recipe (only its config's refusals differ)."""

    config_cls = PlainDeiTConfig


class DistilledVisionTransformer(VisionTransformer):
    config_cls = DeiTConfig
    num_dist_tokens = 1

    def __init__(self, cfg: DeiTConfig):
        super().__init__(cfg)
        self.distilled_training = False
        self.dist_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.head_dist = self._make_head(cfg.num_classes) if cfg.dist_head else None
        nn.init.trunc_normal_(self.dist_token, std=0.02)
        zero_init_(*self.classifiers())

    def classifiers(self) -> list[nn.Linear]:
        return [h for h in (self.head, getattr(self, "head_dist", None)) if isinstance(h, nn.Linear)]

    def reset_classifier(self, num_classes: int) -> None:
        if self.cfg.dist_head:
            self.head_dist = self._make_head(num_classes)
        super().reset_classifier(num_classes)

    def set_distilled_training(self, enable: bool = True) -> bool:
        """A training-mode forward returns (class-head, distillation-head) logits while enabled; True when the model
        has a distillation head and switched it, False for ``dist_head=False`` (one head: nothing to switch)."""
        if self.head_dist is None:
            self.distilled_training = False
            return False
        self.distilled_training = enable
        return True

    def prefix_tokens(self, B: int) -> list[Tensor]:
        return [self.cls_token.expand(B, -1, -1), self.dist_token.expand(B, -1, -1)]

    def readout_weights(self, features: Tensor) -> Tensor:
        """Both heads' tokens, averaged as the logits are; the class token alone without a distillation head."""
        weights = features.new_zeros(features.shape[:2])  # (B, N)
        weights[:, :2] = 0.5 if self.head_dist is not None else torch.tensor([1.0, 0.0])
        return weights

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        x_cls, x_dist = self.pre_logits(self.fc_norm(x[:, 0])), self.pre_logits(self.fc_norm(x[:, 1]))  # (B, D) each
        if self.head_dist is None:  # DeiTForImageClassification: the class token alone is classified
            x_cls = self.head_drop(x_cls)
            return x_cls if pre_logits else self.head(x_cls)
        if pre_logits:
            return (x_cls + x_dist) / 2
        logits, logits_dist = self.head(self.head_drop(x_cls)), self.head_dist(self.head_drop(x_dist))
        if self.distilled_training and self.training:
            return logits, logits_dist
        return (logits + logits_dist) / 2  # the official code averages logits at inference
