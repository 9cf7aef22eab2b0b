"""timm state dicts (also the official DeiT release files: timm key names inside ``{'model': ...}``) → vitkit.

vitkit's ViT/DeiT use timm's module names, so the conversion is a small set of renames for older layouts.
"""
from __future__ import annotations

from torch import Tensor

from vitkit.weights.report import LoadReport

__all__ = ["CONVERTERS", "config_hints"]

_RENAMES = (
    (".gamma_1", ".ls1.gamma"),  # DeiT-III / older timm layer-scale names
    (".gamma_2", ".ls2.gamma"),
)


def vit_from_timm(state: dict[str, Tensor], report: LoadReport) -> dict[str, Tensor]:
    out = {}
    for k, v in state.items():
        new = k
        for old, rep in _RENAMES:
            new = new.replace(old, rep)
        if new != k:
            report.converted += 1
        out[new] = v
    return out


def vit_hints(state: dict[str, Tensor]) -> dict:
    hints: dict = {}
    if "head.weight" in state:
        hints["num_classes"] = int(state["head.weight"].shape[0])
    if "pre_logits.fc.weight" in state:
        hints["representation_size"] = int(state["pre_logits.fc.weight"].shape[0])
    if "fc_norm.weight" in state:
        hints["fc_norm"] = True
    if "blocks.0.ls1.gamma" in state or "blocks.0.gamma_1" in state:
        hints["init_values"] = 1e-5  # any value: the loaded gammas replace it
    if "blocks.0.attn.qkv.bias" not in state and "blocks.0.attn.qkv.weight" in state:
        hints["qkv_bias"] = False
    return hints


CONVERTERS = {"vit": vit_from_timm, "deit": vit_from_timm}
HINTS = {"vit": vit_hints, "deit": vit_hints}


def config_hints(family: str, state: dict[str, Tensor]) -> dict:
    return HINTS.get(family, lambda s: {})(state)
