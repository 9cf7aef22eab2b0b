"""Named pretrained weights (``create_model(name, pretrained=True)``): resolved from the variant's ``WeightSpec``."""
from __future__ import annotations

__all__ = ["resolve_pretrained"]


def resolve_pretrained(spec) -> str:
    if spec.weights is None:
        raise ValueError(f"{spec.name} has no default pretrained weights registered; pass a checkpoint path as "
                         f"pretrained=PATH (any supported format)")
    raise NotImplementedError("downloading named weights is not implemented yet (issue 5)")
