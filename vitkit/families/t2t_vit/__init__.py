"""Tokens-to-Token ViT (Yuan et al., ICCV 2021, arXiv 2101.11986): soft-split T2T layers, then a ViT backbone.

``model.py`` the architecture, ``formats.py`` the official release layout and how it resizes, ``catalog.py`` the
variants, the official release files and published sizes.
"""
from vitkit.families.contract import Family
from vitkit.families.t2t_vit import catalog
from vitkit.families.t2t_vit.formats import FORMATS, RESIZE, RESIZE_CHOICES
from vitkit.families.t2t_vit.model import T2TViT, T2TViTConfig

__all__ = ["FAMILY", "T2TViT", "T2TViTConfig"]

FAMILY = Family("t2t_vit", "T2T-ViT", "Yuan et al. 2021, arXiv 2101.11986", T2TViT, catalog.VARIANTS,
                catalog.DATA_CFGS, formats=FORMATS, weights=catalog.WEIGHTS, references=catalog.REFERENCES,
                tiny=catalog.tiny, resize=RESIZE, resize_choices=RESIZE_CHOICES)
