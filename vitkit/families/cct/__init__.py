"""Compact Convolutional Transformer (Hassani et al. 2021, arXiv 2104.05704): a convolutional tokenizer, a small
Transformer encoder and sequence pooling instead of a class token.

``model.py`` the architecture, ``formats.py`` the official layout and how a checkpoint's position table is fitted,
``catalog.py`` the variants and the official files.
"""
from vitkit.families.cct import catalog
from vitkit.families.cct.formats import FORMATS
from vitkit.families.cct.model import CCT, CCTConfig
from vitkit.families.contract import Family

__all__ = ["FAMILY", "CCTConfig", "CCT"]

FAMILY = Family("cct", "CCT", "Hassani et al. 2021, arXiv 2104.05704", CCT, catalog.VARIANTS, catalog.DATA_CFGS,
                formats=FORMATS, weights=catalog.WEIGHTS, references=catalog.REFERENCES, tiny=catalog.tiny)
