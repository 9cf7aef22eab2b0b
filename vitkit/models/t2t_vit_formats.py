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

from typing import Any, Mapping

from torch import Tensor

from vitkit.specs import CheckpointView, SourceFormat
from vitkit.weights.keymap import KeyMap, Rename

__all__ = ["OFFICIAL", "T2T_FORMATS"]

_T2T = "tokens_to_token.attention{i}."
OFFICIAL = KeyMap([
    # Token_performer holds its attention tensors itself; vitkit's TokenBlock has them in .attn
    Rename(_T2T + "kqv.", _T2T + "attn.kqv."),
    Rename(_T2T + "proj.", _T2T + "attn.proj."),
    Rename(_T2T + "w", _T2T + "attn.w"),
    Rename(_T2T + "mlp.0.", _T2T + "mlp.fc1."),
    Rename(_T2T + "mlp.2.", _T2T + "mlp.fc2."),
    Rename("", ""),  # everything else (Token_transformer, backbone, head) has vitkit's names
], name="official T2T-ViT")


def _looks_like_official(view: CheckpointView) -> bool:
    return view.has("tokens_to_token.project.weight") and view.any_startswith("tokens_to_token.attention1.")


def official_hints(state: dict[str, Tensor], config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    return {"num_classes": int(state["head.weight"].shape[0])} if "head.weight" in state else {"num_classes": 0}


OFFICIAL_FORMAT = SourceFormat(
    "official", _looks_like_official, OFFICIAL.forward, official_hints,
    description="yitu-opensource/T2T-ViT release (.pth.tar CheckpointSaver dict, EMA weights by default; CIFAR "
                "{'net': ...}; or a bare state dict)")

T2T_FORMATS = (OFFICIAL_FORMAT,)
