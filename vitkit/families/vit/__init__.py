"""Vision Transformer (Dosovitskiy et al., ICLR 2021, arXiv 2010.11929): image patches as tokens of a plain
Transformer encoder, and the hybrid whose patches are cells of a ResNet's feature map (paper §3.1).

``model.py`` the architecture (``VisionTransformer``; ``HybridVisionTransformer`` builds the R50 hybrids),
``formats.py`` the timm / transformers layouts and how each resizes (DeiT's formats reuse them), ``jax.py`` the original
JAX ``.npz`` files, ``catalog.py`` the variants and named weights. DeiT and BEiT build on this folder
(``vitkit.families.deit``, ``vitkit.families.beit``).
"""
from vitkit.families.contract import Family
from vitkit.families.vit import catalog
from vitkit.families.vit.formats import FORMATS, RESIZE, RESIZE_CHOICES
from vitkit.families.vit.model import HybridConfig, HybridVisionTransformer, ViTConfig, VisionTransformer

__all__ = ["FAMILY", "ViTConfig", "VisionTransformer", "HybridConfig", "HybridVisionTransformer"]

FAMILY = Family("vit", "ViT", "Dosovitskiy et al. 2020, arXiv 2010.11929", VisionTransformer, catalog.VARIANTS,
                catalog.DATA_CFGS, formats=FORMATS, weights=catalog.WEIGHTS, references=catalog.REFERENCES,
                tiny=catalog.tiny, resize=RESIZE, resize_choices=RESIZE_CHOICES,
                model_classes={name: HybridVisionTransformer for name in catalog.HYBRIDS},
                task_fields=("representation_size",))  # a new task replaces the pre-training head (App. B.1.1)
