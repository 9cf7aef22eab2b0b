"""MobileViT v1 (Mehta & Rastegari, ICLR 2022, arXiv 2110.02178): MobileNetV2 inverted residuals and MobileViT blocks
(local convolutions, a transformer across unfolded patches, fusion with the block input).

``model.py`` the architecture, ``formats.py`` the official ml-cvnets / timm / transformers layouts and the input each
source's weights expect, ``catalog.py`` the variants and named weights.
"""
from vitkit.families.contract import Family
from vitkit.families.mobilevit import catalog
from vitkit.families.mobilevit.formats import FORMATS
from vitkit.families.mobilevit.model import MobileViT, MobileViTConfig

__all__ = ["FAMILY", "MobileViTConfig", "MobileViT"]

FAMILY = Family("mobilevit", "MobileViT", "Mehta & Rastegari 2022, arXiv 2110.02178", MobileViT, catalog.VARIANTS,
                catalog.DATA_CFGS, formats=FORMATS, weights=catalog.WEIGHTS, references=catalog.REFERENCES,
                tiny=catalog.tiny)
