"""PVT v2 (Wang et al., CVMJ 2022, arXiv 2106.13797): PVT's four-stage pyramid (``vitkit.families.pvt``, its parent)
with overlapping patch embeddings, a convolutional feed-forward and, in B2-Li, linear spatial-reduction attention.

``model.py`` the architecture (on PVT's config and model base classes), ``formats.py`` the timm / official /
transformers layouts, ``catalog.py`` the variants and named weights.
"""
from vitkit.families.contract import Family
from vitkit.families.pvt_v2 import catalog
from vitkit.families.pvt_v2.formats import FORMATS
from vitkit.families.pvt_v2.model import PVTv2Config, PyramidVisionTransformerV2

__all__ = ["FAMILY", "PVTv2Config", "PyramidVisionTransformerV2"]

FAMILY = Family("pvt_v2", "PVT v2", "Wang et al. 2022, arXiv 2106.13797", PyramidVisionTransformerV2,
                catalog.VARIANTS, catalog.DATA_CFGS, formats=FORMATS, weights=catalog.WEIGHTS,
                references=catalog.REFERENCES, tiny=catalog.tiny, parent="pvt")
