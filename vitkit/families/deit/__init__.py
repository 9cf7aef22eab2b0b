"""DeiT (Touvron et al., ICML 2021, arXiv 2012.12877): ViTs trained on ImageNet-1k alone, and distilled ones with a
second token and head for the teacher's labels. A sub-family of ViT (``vitkit.families.vit``, its parent): its models
are ViT's with DeiT's refusals, or with the distillation token and head.

``model.py`` the plain (``DeiT``) and distilled (``DistilledVisionTransformer``) classes, ``formats.py`` the official /
timm / transformers layouts (ViT's pieces) and how each resizes, ``catalog.py`` the variants and named weights.
"""
from vitkit.families.contract import Family
from vitkit.families.deit import catalog
from vitkit.families.deit.formats import FORMATS, RESIZE, RESIZE_CHOICES
from vitkit.families.deit.model import DeiT, DeiTConfig, DistilledVisionTransformer, PlainDeiTConfig

__all__ = ["FAMILY", "PlainDeiTConfig", "DeiTConfig", "DeiT", "DistilledVisionTransformer"]

FAMILY = Family("deit", "DeiT", "Touvron et al. 2021, arXiv 2012.12877", DistilledVisionTransformer, catalog.VARIANTS,
                catalog.DATA_CFGS, formats=FORMATS, weights=catalog.WEIGHTS, references=catalog.REFERENCES,
                tiny=catalog.tiny, resize=RESIZE, resize_choices=RESIZE_CHOICES,
                model_classes={name: DeiT for name in catalog.PLAIN}, parent="vit", task_fields=("representation_size",))
