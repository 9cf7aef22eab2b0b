"""Pyramid Vision Transformer v1 (Wang et al., ICCV 2021, arXiv 2102.12122): four stages of spatial-reduction
attention with per-stage position embeddings and a class token in the last stage.

``model.py`` the architecture (its config, stage and model base classes are PVT v2's too), ``formats.py`` the
official / transformers layouts (and helpers PVT v2's formats share), ``catalog.py`` the variants and named weights.
"""
from vitkit.families.contract import Family
from vitkit.families.pvt import catalog
from vitkit.families.pvt.formats import FORMATS
from vitkit.families.pvt.model import PVTConfig, PyramidVisionTransformer

__all__ = ["FAMILY", "PVTConfig", "PyramidVisionTransformer"]

FAMILY = Family("pvt", "PVT", "Wang et al. 2021, arXiv 2102.12122", PyramidVisionTransformer, catalog.VARIANTS,
                catalog.DATA_CFGS, formats=FORMATS, weights=catalog.WEIGHTS, references=catalog.REFERENCES,
                tiny=catalog.tiny)
