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

import torch
from torch import Tensor, nn

from vitkit.models.base import zero_init_
from vitkit.models.vit import ViTConfig, VisionTransformer, closed_form_size, tiny
from vitkit.models.vit_formats import DEIT_FORMATS, DEIT_RESIZE, RESIZE_CHOICES, WEIGHTS
from vitkit.registry import register_family
from vitkit.specs import PreprocessConfig

__all__ = ["DeiTConfig", "DistilledVisionTransformer"]


@dataclass
class DeiTConfig(ViTConfig):
    dist_head: bool = True  # False: no head on the distillation token (transformers' DeiTForImageClassification)


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

    def set_distilled_training(self, enable: bool = True) -> None:
        self.distilled_training = enable

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


def _deit(size: str, res: int) -> dict:
    dims = {"tiny": (192, 3), "small": (384, 6), "base": (768, 12)}[size]
    return dict(embed_dim=dims[0], num_heads=dims[1], depth=12, patch_size=16, img_size=res)


_NAMES = [(s, r) for s in ("tiny", "small", "base") for r in (224, 384)]
PLAIN = {f"deit_{s}_patch16_{r}": _deit(s, r) for s, r in _NAMES}
DISTILLED = {f"deit_{s}_distilled_patch16_{r}": _deit(s, r) for s, r in _NAMES}
# DeiT evaluates with ImageNet mean/std, resize to size / 0.875 then centre-crop (main.py --eval-crop-ratio 0.875)
DATA_CFGS = {n: PreprocessConfig(crop_pct=0.875 if c["img_size"] == 224 else 1.0)
             for n, c in {**PLAIN, **DISTILLED}.items()}

_PAPER = "Touvron et al. 2021, arXiv 2012.12877"
_REFS = {**{n: closed_form_size(c) for n, c in PLAIN.items()},
         **{n: closed_form_size(c, prefix_tokens=2, heads=2) for n, c in DISTILLED.items()}}
for _cls, _table in ((VisionTransformer, PLAIN), (DistilledVisionTransformer, DISTILLED)):
    register_family("deit", _cls, _table, DATA_CFGS, formats=DEIT_FORMATS, weights=WEIGHTS, references=_REFS,
                    tiny=tiny, paper=_PAPER, resize=DEIT_RESIZE, resize_choices=RESIZE_CHOICES)
