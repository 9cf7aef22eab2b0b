"""Checkpoint formats of the Swin family: official release files, timm, transformers (4.x and 5.x layouts, and the
transformers twin built from the same tables), and how each source resizes its tables.

vitkit's Swin uses timm's module names with the classifier called ``head``. The official layout
(microsoft/Swin-Transformer ``models/swin_transformer.py``, and timm before 0.9) keeps the patch merging at the *end*
of stage i (``layers.{i}.downsample``) and saves the computed buffers (``relative_position_index`` in every block,
``attn_mask`` in shifted blocks, on the block itself); vitkit opens stage i + 1 with it, as current timm does.
"""
from __future__ import annotations

from typing import Any, Mapping

from torch import Tensor, nn

from vitkit.specs import CheckpointView, ResizeRule, SourceFormat
from vitkit.weights.keymap import Drop, Fuse, KeyMap, Rename
from vitkit.weights.load_report import CheckpointError
from vitkit.weights.transformers_layout import (HF_ACTIVATIONS, TWIN_ACTIVATIONS, TransformersLayout, head_hints,
                                               write_twin)

__all__ = ["FORMATS", "RESIZE", "to_transformers", "transformers_config"]

_BLOCK_KEY = "layers.0.blocks.0.attn.relative_position_bias_table"

# ------------------------------------------------------------------------------------------------------- timm
TIMM = KeyMap([Rename("head.fc.", "head."), Rename("", "")], name="timm Swin")

OFFICIAL = KeyMap([
    Rename("layers.{i}.downsample.", "layers.{i+1}.downsample."),  # end of stage i → start of stage i + 1
    Rename("layers.{i}.blocks.{j}.attn_mask", "layers.{i}.blocks.{j}.attn.attn_mask"),  # a block buffer there
    Rename("", ""),
], name="official Swin")


def _official_layout(view: CheckpointView) -> bool:
    """Merging at the end of stage 0, or an SW-MSA mask saved on the block itself (vitkit keeps it in ``attn``)."""
    return view.has(_BLOCK_KEY) and (view.any_startswith("layers.0.downsample.")
                                     or any(k.endswith(".attn_mask") and not k.endswith(".attn.attn_mask")
                                            for k in view.keys))


def _timm_hints(state: dict[str, Tensor], config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    head = state.get("head.fc.weight", state.get("head.weight"))
    hints: dict[str, Any] = {"num_classes": int(head.shape[0])} if head is not None else {}
    if "layers.0.blocks.0.attn.qkv.weight" in state and "layers.0.blocks.0.attn.qkv.bias" not in state:
        hints["qkv_bias"] = False
    return hints


OFFICIAL_FORMAT = SourceFormat(
    "official", _official_layout, OFFICIAL.forward, _timm_hints,
    description="microsoft/Swin-Transformer release ({'model': state_dict}, merging at the end of each stage, "
                "relative_position_index and attn_mask buffers); also timm < 0.9 files")
TIMM_FORMAT = SourceFormat("timm", lambda v: v.has(_BLOCK_KEY), TIMM.forward, _timm_hints,
                           description="timm SwinTransformer state dict (merging at the start of each stage, head.fc)")

# ------------------------------------------------------------------------------------------------ transformers
# Hub files and save_pretrained (even in 5.x) use the 4.x names; a live 5.x model's state_dict uses the 5.x names
# (transformers/conversion_mapping.py "swin"). Older Hub files also hold relative_position_index buffers: they are
# mapped to vitkit's and checked like the official ones.
_COMMON = [
    Rename("embeddings.patch_embeddings.projection.", "patch_embed.proj."),
    Rename("embeddings.norm.", "patch_embed.norm."),
    Rename("embeddings.position_embeddings", "absolute_pos_embed"),  # use_absolute_embeddings
    Rename("encoder.layers.{i}.blocks.{j}.layernorm_before.", "layers.{i}.blocks.{j}.norm1."),
    Rename("encoder.layers.{i}.blocks.{j}.layernorm_after.", "layers.{i}.blocks.{j}.norm2."),
    Rename("encoder.layers.{i}.downsample.", "layers.{i+1}.downsample."),
    Rename("layernorm.", "norm."),
    Rename("classifier.", "head."),
    Drop(r"^embeddings\.mask_token$", "SimMIM mask token, not used for classification"),
]
_V4 = [
    Fuse(("encoder.layers.{i}.blocks.{j}.attention.self.query.", "encoder.layers.{i}.blocks.{j}.attention.self.key.",
          "encoder.layers.{i}.blocks.{j}.attention.self.value."), "layers.{i}.blocks.{j}.attn.qkv."),
    Rename("encoder.layers.{i}.blocks.{j}.attention.self.relative_position_bias_table",
           "layers.{i}.blocks.{j}.attn.relative_position_bias_table"),
    Rename("encoder.layers.{i}.blocks.{j}.attention.self.relative_position_index",
           "layers.{i}.blocks.{j}.attn.relative_position_index"),
    Rename("encoder.layers.{i}.blocks.{j}.attention.output.dense.", "layers.{i}.blocks.{j}.attn.proj."),
    Rename("encoder.layers.{i}.blocks.{j}.intermediate.dense.", "layers.{i}.blocks.{j}.mlp.fc1."),
    Rename("encoder.layers.{i}.blocks.{j}.output.dense.", "layers.{i}.blocks.{j}.mlp.fc2."),
]
_V5 = [
    Fuse(("encoder.layers.{i}.blocks.{j}.attention.q_proj.", "encoder.layers.{i}.blocks.{j}.attention.k_proj.",
          "encoder.layers.{i}.blocks.{j}.attention.v_proj."), "layers.{i}.blocks.{j}.attn.qkv."),
    Rename("encoder.layers.{i}.blocks.{j}.attention.relative_position_bias.relative_position_bias_table",
           "layers.{i}.blocks.{j}.attn.relative_position_bias_table"),
    Rename("encoder.layers.{i}.blocks.{j}.attention.relative_position_bias.relative_position_index",
           "layers.{i}.blocks.{j}.attn.relative_position_index"),
    Rename("encoder.layers.{i}.blocks.{j}.attention.o_proj.", "layers.{i}.blocks.{j}.attn.proj."),
    Rename("encoder.layers.{i}.blocks.{j}.mlp.fc1.", "layers.{i}.blocks.{j}.mlp.fc1."),
    Rename("encoder.layers.{i}.blocks.{j}.mlp.fc2.", "layers.{i}.blocks.{j}.mlp.fc2."),
]


def hf_keymap(keys) -> KeyMap:
    """The rename table of the transformers layout these keys are written in: 4.x names have ``attention.self`` and
    ``intermediate``, 5.x names do not."""
    layout = "4" if any(".attention.self." in k or ".intermediate.dense." in k for k in keys) else "5"
    return KeyMap(_COMMON + (_V4 if layout == "4" else _V5), name=f"transformers {layout}.x Swin")


LAYOUT = TransformersLayout(
    "Swin", bases=("swin.",), model_types=("swin",), keymap=hf_keymap,
    signature=lambda keys: any(k.startswith("encoder.layers.0.blocks.0.") for k in keys))


def hf_hints(state: dict[str, Tensor], config: Mapping[str, Any] | None) -> dict[str, Any]:
    """Architecture from config.json (the variant keeps its own input size and window: another one resizes the bias
    tables); head size from the tensors. Settings vitkit's Swin cannot express are refused."""
    hints: dict[str, Any] = {}
    if config:
        act, eps = config.get("hidden_act", "gelu"), float(config.get("layer_norm_eps", 1e-5))
        # patch/merging norms: 1e-5
        unsupported = {"hidden_act": act not in HF_ACTIVATIONS, "layer_norm_eps": eps != 1e-5}
        bad = [f"{k}={config.get(k)!r}" for k, v in unsupported.items() if v]
        if bad:
            raise CheckpointError(f"transformers Swin config {', '.join(bad)} is not supported by vitkit's Swin")
        hints = dict(embed_dim=config.get("embed_dim", 96), depths=tuple(config.get("depths", (2, 2, 6, 2))),
                     num_heads=tuple(config.get("num_heads", (3, 6, 12, 24))),
                     mlp_ratio=float(config.get("mlp_ratio", 4.0)),
                     patch_size=config.get("patch_size", 4), in_chans=config.get("num_channels", 3),
                     qkv_bias=config.get("qkv_bias", True), act_layer=HF_ACTIVATIONS[act],
                     ape=bool(config.get("use_absolute_embeddings", False)))
    return {**hints, **head_hints(state)}


def hf_infer(view: CheckpointView) -> tuple[str, dict[str, Any]] | None:
    """A transformers folder names its architecture: the registered Swin nearest in width, then depths, image size
    and window; the folder's image size and window become overrides (its depths and heads come as hints)."""
    from vitkit.registry import get_spec, list_models
    config = view.config or {}
    if config.get("model_type") not in LAYOUT.model_types:
        return None
    img = config.get("image_size", 224)
    img = img if isinstance(img, int) else (int(img[0]), int(img[1]))
    window = int(config.get("window_size", 7))
    side = img if isinstance(img, int) else max(img)
    width, depths = config.get("embed_dim", 96), list(config.get("depths", (2, 2, 6, 2)))
    specs = [(n, get_spec(n).config) for n in list_models("swin_*")]
    name = min(specs, key=lambda nc: (abs(nc[1]["embed_dim"] - width), list(nc[1]["depths"]) != depths,
                                      abs(nc[1]["img_size"] - side), abs(nc[1]["window_size"] - window), nc[0]))[0]
    return name, {"img_size": img, "window_size": window}


# ------------------------------------------------------------------------------------------- transformers twin
_BUFFERS = (r"relative_position_index$", r"attn_mask$")  # transformers computes both itself


def transformers_config(model: nn.Module):
    """A transformers ``SwinConfig`` with the dimensions of a vitkit Swin. Settings transformers cannot express are
    refused, and so are stages smaller than the window: transformers 5.x builds every bias table for the configured
    window but clamps the window to such a stage at run time, and fails there (vitkit builds the clamped table, as
    the official code does)."""
    from transformers import SwinConfig
    cfg = model.cfg
    small = [i for i, stage in enumerate(model.layers) if min(stage.blocks[0].attn.grid) < cfg.window_size]
    unsupported = {"norm_eps": cfg.norm_eps != 1e-5, "act_layer": cfg.act_layer not in TWIN_ACTIVATIONS,
                   "window_size": bool(small), "qk_scale": cfg.qk_scale is not None, "patch_norm": not cfg.patch_norm}
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise ValueError(f"transformers' Swin cannot express {', '.join(f'{k}={getattr(cfg, k)!r}' for k in bad)}"
                         + (f" (stages {small} are smaller than the window)" if small else ""))
    return SwinConfig(
        image_size=tuple(model.patch_embed.img_size), patch_size=cfg.patch_size, num_channels=cfg.in_chans,
        embed_dim=cfg.embed_dim, depths=list(cfg.depths), num_heads=list(cfg.num_heads), window_size=cfg.window_size,
        mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias, hidden_act=TWIN_ACTIVATIONS[cfg.act_layer], layer_norm_eps=1e-5,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, drop_path_rate=0.0,
        use_absolute_embeddings=cfg.ape, num_labels=cfg.num_classes)


def to_transformers(model: nn.Module) -> nn.Module:
    """``SwinForImageClassification`` holding a vitkit Swin's weights, written through the inverse of the rename
    table that reads transformers files; eval mode, same device and dtype."""
    from transformers import SwinForImageClassification
    hf = SwinForImageClassification(transformers_config(model))
    return write_twin(model, hf, hf_keymap(hf.state_dict()), LAYOUT.bases[0], skip=_BUFFERS)


HF_FORMAT = SourceFormat("hf", LAYOUT.detect, LAYOUT.convert, hf_hints, infer=hf_infer, twin=to_transformers,
                         description="transformers Swin folder or state dict (4.x and 5.x key layouts)")

# Detection order: the most specific signature first (a timm file has neither official marker).
FORMATS = (HF_FORMAT, OFFICIAL_FORMAT, TIMM_FORMAT)


# ------------------------------------------------------------------------------------------- resize per source
# How each source's own code fits a checkpoint to another size or window (tests/families/swin/data: official_shrunk,
# official_options, timm_second_size; test_swin.py: transformers at a second size).
_OFFICIAL_LOAD = "microsoft/Swin-Transformer utils.py@f82860b load_pretrained"
RESIZE = {
    "official": ResizeRule("bicubic", _OFFICIAL_LOAD, rel_pos="bicubic", rel_pos_source=_OFFICIAL_LOAD),
    # timm's Swin has no absolute table; its checkpoint_filter_fn resizes the bias tables with BEiT's geometric
    # progression, interpolated linearly unless TIMM_USE_SCIPY_INTERP is set
    "timm": ResizeRule("bicubic", _OFFICIAL_LOAD, rel_pos="geometric_linear",
                       rel_pos_source="timm==1.0.31 swin_transformer.py checkpoint_filter_fn"),
    # transformers resizes the absolute table at forward time (interpolate_pos_encoding=True); it cannot change the
    # window of its bias tables, so another window takes the official bicubic
    "hf": ResizeRule("bicubic", "transformers SwinEmbeddings.interpolate_pos_encoding (at forward time)",
                     rel_pos="bicubic", rel_pos_source=f"{_OFFICIAL_LOAD} (transformers has no window resize)"),
}
