"""Checkpoint formats of DeiT, built from ViT's (``vitkit.families.vit.formats``): the official release files
(facebookresearch/deit ``models.py``: timm's ``VisionTransformer`` names inside ``{'model': state_dict}``), timm's files
and transformers' ``DeiT*`` classes (ViT's transformers layout, which reads both), and how each source resizes the
position embedding.
"""
from __future__ import annotations

from vitkit.families.vit.formats import (HF_FORMAT, HF_RESIZE_SOURCE, RESIZE_CHOICES, TIMM_FORMAT, from_timm,
                                         looks_like_timm_vit, timm_hints)
from vitkit.specs import ResizeRule, SourceFormat

__all__ = ["FORMATS", "RESIZE", "RESIZE_CHOICES", "OFFICIAL_FORMAT"]

OFFICIAL_FORMAT = SourceFormat(
    "official", lambda v: v.container == "model" and looks_like_timm_vit(v), from_timm, timm_hints,
    description="facebookresearch/deit release: timm's names inside {'model': state_dict}")

# Detection order: the most specific signature first.
FORMATS = (HF_FORMAT, OFFICIAL_FORMAT, TIMM_FORMAT)

# ---------------------------------------------------------------------------------- resizing for another input size
# Each source is resized the way its own code does it; a source with no resize code of its own (timm's files, vitkit's
# folders) the way DeiT's official code does. tests/test_pos_embed_resize.py checks every entry against that code's
# output.
_DEIT = ResizeRule("bicubic", "facebookresearch/deit main.py@7e160fe (--finetune)")
RESIZE = {"official": _DEIT, "timm": _DEIT, "vitkit": _DEIT,
          "hf": ResizeRule("bicubic", HF_RESIZE_SOURCE.format("deit"))}
