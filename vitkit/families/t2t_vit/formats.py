"""Checkpoint formats of T2T-ViT: the official release files (yitu-opensource/T2T-ViT).

ImageNet releases (``81.5_T2T_ViT_14.pth.tar``, …) are timm CheckpointSaver dicts ``{'epoch', 'arch', 'state_dict',
'state_dict_ema', …}``; the official evaluation (``main.py``, ``--model-ema`` on by default; README
``load_for_transfer_learning(..., use_ema=True)``) loads ``state_dict_ema``, and so does vitkit by default
(``vitkit.weights.unwrap``); ``create_model(..., checkpoint_key="state_dict")`` loads the other. The CIFAR releases
(``transfer_learning.py``) are ``{'net': state_dict, 'acc', 'epoch'}`` saved from DataParallel (``module.`` prefix).

vitkit keeps the official module names except where a shared layer names its parts: the Performer T2T layer's
attention tensors live in an ``attn`` sub-module, and its MLP (``nn.Sequential`` 0 / 2) is vitkit's ``Mlp`` (fc1 /
fc2). The frozen tensors of the official files (the Performer features ``w`` and the sinusoidal ``pos_embed``) are
loaded as they are. timm and transformers have no T2T-ViT, so there is no other format and no transformers twin.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

from torch import Tensor

from vitkit.specs import CheckpointView, ResizeRule, SourceFormat
from vitkit.weights.keymap import KeyMap, Rename

__all__ = ["OFFICIAL", "FORMATS", "RESIZE", "RESIZE_CHOICES"]

_T2T = "tokens_to_token.attention{i}."
# one table per T2T type (the Transformer T2T layer has vitkit's names already), so that the inverse writes exactly
# the official keys of either
OFFICIAL = {
    "performer": KeyMap([
        # Token_performer holds its attention tensors itself; vitkit's TokenBlock has them in .attn
        Rename(_T2T + "kqv.", _T2T + "attn.kqv."),
        Rename(_T2T + "proj.", _T2T + "attn.proj."),
        Rename(_T2T + "w", _T2T + "attn.w"),
        Rename(_T2T + "mlp.0.", _T2T + "mlp.fc1."),
        Rename(_T2T + "mlp.2.", _T2T + "mlp.fc2."),
        Rename("", ""),  # everything else (backbone, head) has vitkit's names
    ], name="official T2T-ViT (Performer T2T)"),
    "transformer": KeyMap([Rename("", "")], name="official T2T-ViT (Transformer T2T)"),
}


def from_official(state: dict[str, Tensor], report) -> dict[str, Tensor]:
    performer = "tokens_to_token.attention1.kqv.weight" in state
    return OFFICIAL["performer" if performer else "transformer"].forward(state, report)


def _looks_like_official(view: CheckpointView) -> bool:
    return view.has("tokens_to_token.project.weight") and view.any_startswith("tokens_to_token.attention1.")


def _square_img_size(pos_shape: tuple[int, ...]) -> int | None:
    """The image size a (1, 1 + g², D) position table was built for: 16·g (the official ``num_patches``)."""
    side = math.isqrt(pos_shape[1] - 1) if len(pos_shape) == 3 and pos_shape[1] > 1 else 0
    return 16 * side if side and side * side == pos_shape[1] - 1 else None


def official_hints(state: dict[str, Tensor], config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The classifier size, and the input size the file was trained at (its position table's grid: the 384-px
    release, 83.3_T2T_ViT_14, builds a 384-px model unless img_size is given)."""
    hints: dict[str, Any] = {"num_classes": int(state["head.weight"].shape[0]) if "head.weight" in state else 0}
    if "pos_embed" in state and (size := _square_img_size(tuple(state["pos_embed"].shape))):
        hints["img_size"] = size
    return hints


def official_infer(view: CheckpointView) -> tuple[str, dict[str, Any]] | None:
    """The registered variant with the file's T2T type, width, depth and MLP ratio (all official variants have
    64-wide heads, so the width fixes the head count), at the file's input size; None when no variant matches."""
    if not _looks_like_official(view):
        return None
    from vitkit.registry import get_spec, list_models
    shapes = view.shapes
    D = shapes["tokens_to_token.project.weight"][0]
    found = dict(tokens_type="performer" if view.has("tokens_to_token.attention1.kqv.weight") else "transformer",
                 embed_dim=D, depth=len({k.split(".")[1] for k in view.keys if k.startswith("blocks.")}),
                 mlp_ratio=shapes["blocks.0.mlp.fc1.weight"][0] / D if "blocks.0.mlp.fc1.weight" in shapes else None)
    for name in list_models("t2t_vit_*"):
        if all(get_spec(name).config.get(k) == v for k, v in found.items()):
            size = _square_img_size(shapes.get("pos_embed", ()))
            return name, ({"img_size": size} if size and size != 224 else {})
    return None


OFFICIAL_FORMAT = SourceFormat(
    "official", _looks_like_official, from_official, official_hints, infer=official_infer,
    description="yitu-opensource/T2T-ViT release (.pth.tar CheckpointSaver dict, EMA weights by default; CIFAR "
                "{'net': ...}; or a bare state dict)")

FORMATS = (OFFICIAL_FORMAT,)

# Another input size: the official transfer-learning loader (README §2, ``utils.load_for_transfer_learning`` →
# ``resize_pos_embed``) interpolates the stored sinusoid bicubically; vitkit's folders are resized the same way.
# ``pos_embed_resize="sinusoid"`` regenerates the formula for the new length instead (what the official constructor
# builds for a new size, used by no official loading path). tests/test_pos_embed_resize.py checks the official one.
_OFFICIAL_RULE = ResizeRule("bicubic", "yitu-opensource/T2T-ViT utils.py@0f63dc9 load_for_transfer_learning")
RESIZE = {"official": _OFFICIAL_RULE, "vitkit": _OFFICIAL_RULE}
RESIZE_CHOICES = ("bicubic", "sinusoid", "bicubic_antialias", "zoom_linear", "bilinear")
