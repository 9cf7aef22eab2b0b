"""Inference preprocessing for single photos: PIL image → normalised float tensor ``(3, H, W)``, driven entirely by
the model's ``data_cfg`` (``PreprocessConfig``), so users never have to know a checkpoint's mean, std or crop.

Convention: timm's eval transform (``transforms_imagenet_eval``), which is also what the DeiT and ViT papers'
evaluation code and transformers' PIL image processors do:

1. resize with **PIL** (``Image.resize``, the data_cfg's filter) so the shorter side is ``floor(size / crop_pct)``;
   the longer side is ``int(short * long / short_in)`` (torchvision's ``Resize(int)`` rounding). For a non-square
   input size both target sides are scaled by ``1 / crop_pct`` and the image is resized, aspect kept, to cover them.
   ``crop_mode='squash'`` (timm's name) resizes both sides to ``floor(side / crop_pct)`` instead, aspect not kept:
   torchvision's ``Resize((h, w))`` on a PIL image, which official evaluations such as CvT's and Swin's at 384 run;
2. centre-crop ``(H, W)``, offsets rounded like torchvision's ``CenterCrop``;
3. to ``[0, 1]``; for ``channel_order='BGR'`` swap to BGR (mean/std are given in the model's channel order);
   normalise with the data_cfg's mean/std.

Why PIL and not ``F.interpolate(..., antialias=True)``: measured on the 29 shared photos with DeiT-Tiny
(``deit_tiny_patch16_224``, resize 256 bicubic → crop 224), the PIL path is bit-identical to transformers'
``DeiTImageProcessorPil(size={'shortest_edge': 256})`` on 28 photos (the 29th differs only because transformers
floors an odd centre-crop offset where torchvision/timm round it), while ``F.interpolate`` bicubic+antialias differs
by up to 8 grey levels (mean 0.15), moving logits by up to 0.48 and top-1 probabilities by up to 0.022. PIL resamples
in two separable passes with 8-bit rounding in between; torch keeps floats. Dataset evaluation (``vitkit eval``) uses
``vitkit.data``'s tensor transforms instead, because dataset items are already ``uint8`` tensors.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from PIL import Image

from vitkit.data.functional import center_crop, normalize
from vitkit.data.images import pil_to_tensor, to_rgb
from vitkit.registry import PreprocessConfig

__all__ = ["eval_transform", "EvalTransform", "resize_size"]

_PIL_FILTERS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
                "nearest": Image.Resampling.NEAREST}


def resize_size(width: int, height: int, target: tuple[int, int], crop_pct: float,
                crop_mode: str = "center") -> tuple[int, int]:
    """``(new_width, new_height)`` before the centre crop to ``target = (H, W)`` (timm's eval sizes)."""
    scale_h, scale_w = (math.floor(t / crop_pct) for t in target)
    if crop_mode == "squash":  # both sides, aspect not kept
        return scale_w, scale_h
    if scale_h == scale_w:  # torchvision Resize(int): shorter side exact, longer side truncated
        short, long = min(width, height), max(width, height)
        new_long = int(scale_h * long / short)
        return (scale_h, new_long) if width <= height else (new_long, scale_h)
    ratio = max(scale_h / height, scale_w / width)  # cover both target sides, keep the aspect ratio
    return max(scale_w, round(width * ratio)), max(scale_h, round(height * ratio))


class EvalTransform:
    """``PIL.Image`` (any mode) → float32 ``(3, H, W)`` ready for the model; see the module docstring."""

    def __init__(self, data_cfg: PreprocessConfig):
        _check(data_cfg)
        self.data_cfg = data_cfg
        self.size = (int(data_cfg.input_size[1]), int(data_cfg.input_size[2]))  # (H, W)
        self.filter = _PIL_FILTERS[data_cfg.interpolation]

    def __call__(self, img: Image.Image) -> torch.Tensor:
        img = to_rgb(img)
        new_size = resize_size(img.width, img.height, self.size, self.data_cfg.crop_pct, self.data_cfg.crop_mode)
        if new_size != img.size:
            img = img.resize(new_size, self.filter)
        x = center_crop(pil_to_tensor(img), *self.size)  # (3, H, W) uint8
        if self.data_cfg.channel_order == "BGR":
            x = x.flip(0)  # (3, H, W) in B, G, R order
        return normalize(x, self.data_cfg.mean, self.data_cfg.std)  # (3, H, W) float32

    def __repr__(self) -> str:
        c = self.data_cfg
        return (f"EvalTransform(size={self.size}, crop_pct={c.crop_pct}, {c.crop_mode}, {c.interpolation}, "
                f"{c.channel_order}, "
                f"mean={c.mean}, std={c.std})")


def _check(data_cfg: PreprocessConfig) -> None:
    if not 0.0 < data_cfg.crop_pct <= 1.0:
        raise ValueError(f"data_cfg.crop_pct must be in (0, 1], got {data_cfg.crop_pct}")
    if data_cfg.crop_mode not in ("center", "squash"):
        raise ValueError(f"data_cfg.crop_mode must be 'center' or 'squash', got {data_cfg.crop_mode!r}")
    if data_cfg.interpolation not in _PIL_FILTERS:
        raise ValueError(f"data_cfg.interpolation {data_cfg.interpolation!r} is not one of {sorted(_PIL_FILTERS)}")
    if data_cfg.channel_order not in ("RGB", "BGR"):
        raise ValueError(f"data_cfg.channel_order must be 'RGB' or 'BGR', got {data_cfg.channel_order!r}")
    if min(data_cfg.std) <= 0:
        raise ValueError(f"data_cfg.std must be positive, got {data_cfg.std}")


def eval_transform(data_cfg: PreprocessConfig) -> Callable[[Image.Image], torch.Tensor]:
    """The inference transform for a model with this ``data_cfg`` (use ``model.data_cfg``)."""
    return EvalTransform(data_cfg)
