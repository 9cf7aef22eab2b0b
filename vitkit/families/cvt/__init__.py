"""CvT (Wu et al., ICCV 2021, arXiv 2103.15808): convolutional token embedding and convolutional projections in three
stages, no position embedding.

``model.py`` the architecture, ``formats.py`` the official and transformers layouts, ``catalog.py`` the variants and
named weights.
"""
from vitkit.families.contract import Family
from vitkit.families.cvt import catalog
from vitkit.families.cvt.formats import FORMATS
from vitkit.families.cvt.model import ConvolutionalVisionTransformer, CvTConfig

__all__ = ["FAMILY", "CvTConfig", "ConvolutionalVisionTransformer"]

FAMILY = Family("cvt", "CvT", "Wu et al. 2021, arXiv 2103.15808", ConvolutionalVisionTransformer, catalog.VARIANTS,
                catalog.DATA_CFGS, formats=FORMATS, weights=catalog.WEIGHTS, references=catalog.REFERENCES,
                tiny=catalog.tiny)
