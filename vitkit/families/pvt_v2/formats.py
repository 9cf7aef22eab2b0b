"""Checkpoint formats of PVT v2: timm (vitkit's own layout), the official release files (whai362/PVT
``classification/pvt_v2.py``, a bare state dict), transformers (``PvtV2ForImageClassification``; one key layout in
4.x and 5.x, as for PVT) and the transformers twin from the inverse of the same table.

The official → timm renames are the ones of timm's ``pvt_v2.checkpoint_filter_fn`` (patch_embed1 → patch_embed,
patch_embed{2,3,4} → stages.{1,2,3}.downsample, block{n}.{m} → stages.{n-1}.blocks.{m}, dwconv.dwconv → dwconv,
norm{n} → stages.{n-1}.norm), written as a table.
"""
from __future__ import annotations

from typing import Any, Mapping

from torch import Tensor, nn

from vitkit.families.pvt.formats import (OFFICIAL_EMBEDS, OFFICIAL_HEAD, hf_common, hf_stage_hints, nearest_variant,
                                         state_hints, twin_from)
from vitkit.specs import CheckpointView, SourceFormat
from vitkit.weights.keymap import Fuse, KeyMap, Rename
from vitkit.weights.transformers_layout import TransformersLayout, strip_base

__all__ = ["FORMATS", "OFFICIAL", "HF", "LAYOUT", "to_transformers"]

TIMM = KeyMap([Rename("", "")], name="timm PVT v2")  # timm's names are vitkit's

OFFICIAL = KeyMap(OFFICIAL_EMBEDS + [
    Rename("block{i+1}.{j}.mlp.dwconv.dwconv.", "stages.{i}.blocks.{j}.mlp.dwconv."),
    Rename("block{i+1}.{j}.", "stages.{i}.blocks.{j}."),
    Rename("norm{i+1}.", "stages.{i}.norm."),
    OFFICIAL_HEAD,
], name="official PVT v2")

_STAGE = "encoder.layers.{i}."
_BLOCK = _STAGE + "blocks.{j}."
HF = KeyMap([
    Rename("encoder.layers.0.patch_embedding.proj.", "patch_embed.proj."),
    Rename("encoder.layers.0.patch_embedding.layer_norm.", "patch_embed.norm."),
    Rename(_STAGE + "patch_embedding.proj.", "stages.{i}.downsample.proj."),
    Rename(_STAGE + "patch_embedding.layer_norm.", "stages.{i}.downsample.norm."),
    Rename(_BLOCK + "layer_norm_1.", "stages.{i}.blocks.{j}.norm1."),
    Rename(_BLOCK + "attention.query.", "stages.{i}.blocks.{j}.attn.q."),
    Fuse((_BLOCK + "attention.key.", _BLOCK + "attention.value."), "stages.{i}.blocks.{j}.attn.kv."),
    Rename(_BLOCK + "attention.spatial_reduction.", "stages.{i}.blocks.{j}.attn.sr."),
    Rename(_BLOCK + "attention.layer_norm.", "stages.{i}.blocks.{j}.attn.norm."),
    Rename(_BLOCK + "attention.proj.", "stages.{i}.blocks.{j}.attn.proj."),
    Rename(_BLOCK + "layer_norm_2.", "stages.{i}.blocks.{j}.norm2."),
    Rename(_BLOCK + "mlp.dense1.", "stages.{i}.blocks.{j}.mlp.fc1."),
    Rename(_BLOCK + "mlp.dwconv.dwconv.", "stages.{i}.blocks.{j}.mlp.dwconv."),
    Rename(_BLOCK + "mlp.dense2.", "stages.{i}.blocks.{j}.mlp.fc2."),
    Rename(_STAGE + "layer_norm.", "stages.{i}.norm."),
    Rename("classifier.", "head."),
], name="transformers PVT v2")
LAYOUT = TransformersLayout("PVT v2", bases=("pvt_v2.",), model_types=("pvt_v2",), keymap=lambda keys: HF,
                            signature=lambda keys: any(k.startswith("encoder.layers.0.patch_embedding.") for k in keys))


def _state_hints(state: Mapping[str, Tensor], config=None) -> dict[str, Any]:
    """Head size and q/kv biases (timm and official keys alike); the linear variant is recognised by its 1×1
    reduction convs."""
    hints = state_hints(state)
    sr = next((v for k, v in state.items() if k.endswith("attn.sr.weight")), None)
    if sr is not None:
        hints["linear"] = tuple(sr.shape[-2:]) == (1, 1)
    return hints


def _looks_like_timm(view: CheckpointView) -> bool:
    return view.has("patch_embed.proj.weight") and view.any_startswith("stages.0.blocks.0.mlp.dwconv.")


def _looks_like_official(view: CheckpointView) -> bool:
    return view.has("patch_embed1.proj.weight") and view.any_startswith("block1.0.mlp.dwconv.dwconv.")


def from_official(state: dict[str, Tensor], report) -> dict[str, Tensor]:
    return OFFICIAL.forward(state, report)


def _hf_hints(state: dict[str, Tensor], config: Mapping[str, Any] | None) -> dict[str, Any]:
    hints = hf_stage_hints(config, "PVT v2", [7, 3, 3, 3], "sr_ratios")
    if config:
        hints["linear"] = bool(config.get("linear_attention", False))
    return {**hints, **state_hints(strip_base(state, LAYOUT.bases), "classifier.weight")}


def _hf_infer(view: CheckpointView) -> tuple[str, dict[str, Any]] | None:
    config = view.config or {}
    if config.get("model_type") not in LAYOUT.model_types:
        return None
    hints = {**hf_stage_hints(config, "PVT v2", [7, 3, 3, 3], "sr_ratios"),
             "linear": bool(config.get("linear_attention", False))}
    return nearest_variant("pvt_v2_*", hints), {}


def to_transformers(model: nn.Module) -> nn.Module:
    """``PvtV2ForImageClassification`` holding a vitkit PVT v2's weights (eval mode, same device and dtype)."""
    from transformers import PvtV2Config, PvtV2ForImageClassification
    cfg = model.cfg
    config = PvtV2Config(patch_sizes=[7, 3, 3, 3], sr_ratios=list(cfg.sr_ratios), linear_attention=cfg.linear,
                         **hf_common(cfg))
    return twin_from(model, PvtV2ForImageClassification(config), HF, LAYOUT.bases[0],
                     {"patch_embedding.": cfg.embed_norm_eps, "attention.layer_norm": cfg.sr_norm_eps})


TIMM_FORMAT = SourceFormat("timm", _looks_like_timm, TIMM.forward, _state_hints,
                           description="timm PyramidVisionTransformerV2 state dict")
OFFICIAL_FORMAT = SourceFormat("official", _looks_like_official, from_official, _state_hints,
                               description="whai362/PVT release (classification/pvt_v2.py): bare state dict")
HF_FORMAT = SourceFormat("hf", LAYOUT.detect, LAYOUT.convert, _hf_hints, infer=_hf_infer, twin=to_transformers,
                         description="transformers PvtV2ForImageClassification / PvtV2Model folder or state dict")

# Detection order: the most specific signature first.
FORMATS = (HF_FORMAT, OFFICIAL_FORMAT, TIMM_FORMAT)
