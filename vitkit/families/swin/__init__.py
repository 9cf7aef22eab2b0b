"""Swin Transformer v1 (Liu et al., ICCV 2021, arXiv 2103.14030): shifted-window attention in four stages.

``model.py`` the architecture, ``formats.py`` the official / timm / transformers layouts and how each resizes,
``catalog.py`` the variants and named weights.
"""
from vitkit.families.contract import Family
from vitkit.families.swin import catalog
from vitkit.families.swin.formats import FORMATS, RESIZE
from vitkit.families.swin.model import SwinConfig, SwinTransformer

__all__ = ["FAMILY", "SwinConfig", "SwinTransformer"]

FAMILY = Family("swin", "Swin", "Liu et al. 2021, arXiv 2103.14030", SwinTransformer, catalog.VARIANTS,
                catalog.DATA_CFGS, formats=FORMATS, weights=catalog.WEIGHTS, references=catalog.REFERENCES,
                tiny=catalog.tiny, resize=RESIZE)
