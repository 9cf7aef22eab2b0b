"""Class names for a model's head.

The ImageNet-1k names ship with vitkit (``vitkit/data/imagenet_classes.txt``: one short name per line in the
standard class-index order used by timm, torchvision and transformers' ``id2label``; 1000 lines, no trailing newline).
Two names occur twice in that list, as in the original synsets (``crane``: bird and machine; ``maillot``), so always
key on the class index, never on the name.
"""
from __future__ import annotations

import functools
import importlib.resources

from torch import nn

__all__ = ["imagenet_class_names", "resolve_class_names", "IMAGENET_1K"]

IMAGENET_1K = "imagenet-1k"  # PreprocessConfig.label_set value for heads in ImageNet-1k class order


@functools.lru_cache(maxsize=1)
def _read_imagenet() -> tuple[str, ...]:
    text = importlib.resources.files("vitkit").joinpath("data", "imagenet_classes.txt").read_text(encoding="utf-8")
    names = tuple(line.strip() for line in text.splitlines())
    if len(names) != 1000 or not all(names):
        raise RuntimeError(f"vitkit/data/imagenet_classes.txt is damaged: {len(names)} lines, expected 1000 names")
    return names


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names, index ``i`` = logit ``i`` of an ImageNet-1k head (a fresh list)."""
    return list(_read_imagenet())


def resolve_class_names(model: nn.Module) -> list[str]:
    """Names for each output of ``model``'s head, best source first.

    1. ``model.class_names`` (from the checkpoint: vitkit's config.json or transformers' ``id2label``), if it has one
       name per class;
    2. the ImageNet-1k list, when ``model.data_cfg.label_set == 'imagenet-1k'`` and the head has 1000 outputs;
    3. ``class_<i>``.
    """
    num_classes, names = model.num_classes, model.class_names
    if names and len(names) == num_classes:
        return [str(n) for n in names]
    if num_classes == 1000 and model.data_cfg.label_set == IMAGENET_1K:
        return imagenet_class_names()
    return [f"class_{i}" for i in range(num_classes)]
