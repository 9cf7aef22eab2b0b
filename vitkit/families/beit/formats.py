"""Checkpoint formats of BEiT: the official release files (microsoft/unilm ``beit/``, ``{'model': state_dict}`` with
``relative_position_index`` buffers; fine-tuned and pre-training files), timm's port (the same names without the
buffers), transformers' ``BeitForImageClassification`` / ``BeitForMaskedImageModeling`` (4.x and 5.x key layouts)
and the transformers twin built from the same tables; and how each source resizes the position tables.

vitkit's BEiT keeps timm's names except two: LayerScale is ``blocks.{i}.ls{1,2}.gamma`` (official ``gamma_{1,2}``) and a
block's bias table lives in its attention's ``rel_pos`` module. The pre-training parts (official and timm
``mask_token``, ``lm_head``; transformers ``embeddings.mask_token``, ``lm_head``, and the top-level ``layernorm`` as
``norm``) keep those names: a model with the masked-image-modelling head (``mim_vocab_size``) keeps them,
``Beit.load_pretrained_state`` drops them for any other with the rest of the pre-training → fine-tuning steps.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from vitkit.families.vit.formats import RESIZE_CHOICES
from vitkit.specs import CheckpointView, ResizeRule, SourceFormat
from vitkit.weights.keymap import Fuse, KeyMap, Rename
from vitkit.weights.load_report import CheckpointError
from vitkit.weights.transformers_layout import TransformersLayout, write_twin

__all__ = ["FORMATS", "RESIZE", "RESIZE_CHOICES", "OFFICIAL", "hf_keymap", "to_transformers",
           "to_transformers_mim"]

# ------------------------------------------------------------------------------------------- official and timm
OFFICIAL = KeyMap([
    Rename("blocks.{i}.gamma_1", "blocks.{i}.ls1.gamma"),
    Rename("blocks.{i}.gamma_2", "blocks.{i}.ls2.gamma"),
    Rename("blocks.{i}.attn.relative_position_bias_table", "blocks.{i}.attn.rel_pos.relative_position_bias_table"),
    Rename("blocks.{i}.attn.relative_position_index", "blocks.{i}.attn.rel_pos.relative_position_index"),
    Rename("", ""),  # everything else, incl. the shared rel_pos_bias.*, is named as in vitkit
], name="official/timm BEiT")


def _looks_like_beit(view: CheckpointView) -> bool:
    return view.has("patch_embed.proj.weight", "blocks.0.attn.qkv.weight")


def _looks_official(view: CheckpointView) -> bool:
    return _looks_like_beit(view) and (view.container == "model"
                                       or any(k.endswith("relative_position_index") for k in view.keys))


def _layout_names(convert, state: Mapping[str, Any]) -> set[str]:
    """The vitkit-layout names ``convert`` gives a checkpoint's keys (on empty placeholders: nothing is copied)."""
    placeholder = torch.empty(0)
    try:
        return set(convert({k: placeholder for k in state}, None))
    except CheckpointError:  # a key outside the table: the conversion itself reports it, naming the file
        return set(state)


def _structure_hints(names: set[str]) -> dict[str, Any]:
    """The architecture switches a checkpoint's tensors imply (vitkit-layout names), as config hints where they
    differ from BEiT's fine-tuning defaults. A shared table alone (pre-training) means per-block tables:
    ``Beit.load_pretrained_state`` copies it into each block."""
    per_block = "blocks.0.attn.rel_pos.relative_position_bias_table" in names
    shared = "rel_pos_bias.relative_position_bias_table" in names
    pretraining = "mask_token" in names or "lm_head.weight" in names
    hints: dict[str, Any] = {}
    if "pos_embed" in names:
        hints["use_abs_pos_emb"] = True
    if not (per_block or shared):  # e.g. beit_base_patch16_224_pt1k_800ep: --disable_rel_pos_bias --abs_pos_emb
        hints["use_rel_pos_bias"] = hints["use_shared_rel_pos_bias"] = False
    if per_block and shared:
        hints["use_shared_rel_pos_bias"] = True
    if "blocks.0.ls1.gamma" not in names:
        hints["init_values"] = None
    if "blocks.0.attn.q_bias" not in names:
        hints["qkv_bias"] = False
    if "norm.weight" in names and "fc_norm.weight" not in names and not pretraining:
        hints["global_pool"] = "token"  # official --use_cls
    return hints


def official_hints(state: Mapping[str, Any], config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    hints = _structure_hints(_layout_names(OFFICIAL.forward, state))
    if "head.weight" in state:
        hints["num_classes"] = int(state["head.weight"].shape[0])
    return hints


OFFICIAL_FORMAT = SourceFormat(
    "official", _looks_official, OFFICIAL.forward, official_hints,
    description="microsoft/unilm BEiT release: {'model': state_dict} with relative_position_index buffers "
                "(fine-tuned, or pre-training with a shared table, mask_token and lm_head)")
TIMM_FORMAT = SourceFormat("timm", _looks_like_beit, OFFICIAL.forward, official_hints,
                           description="timm Beit state dict (official names without the index buffers)")

# ------------------------------------------------------------------------------------------------ transformers
# save_pretrained and the Hub files use the 4.x names; a live 5.x model's state_dict the 5.x names
# (transformers/conversion_mapping.py "BeitModel"). q and v projections have biases, k has none.
_HF_COMMON = [
    Rename("embeddings.cls_token", "cls_token"),
    Rename("embeddings.mask_token", "mask_token"),
    Rename("embeddings.position_embeddings", "pos_embed"),
    Rename("embeddings.patch_embeddings.projection.", "patch_embed.proj."),
    Rename("pooler.layernorm.", "fc_norm."),
    Rename("layernorm.", "norm."),
    Rename("lm_head.", "lm_head."),
    Rename("classifier.", "head."),
]
_HF_V4 = [
    Rename("encoder.relative_position_bias.", "rel_pos_bias."),
    Rename("encoder.layer.{i}.lambda_1", "blocks.{i}.ls1.gamma"),
    Rename("encoder.layer.{i}.lambda_2", "blocks.{i}.ls2.gamma"),
    Rename("encoder.layer.{i}.layernorm_before.", "blocks.{i}.norm1."),
    Rename("encoder.layer.{i}.layernorm_after.", "blocks.{i}.norm2."),
    Rename("encoder.layer.{i}.attention.attention.query.bias", "blocks.{i}.attn.q_bias"),
    Rename("encoder.layer.{i}.attention.attention.value.bias", "blocks.{i}.attn.v_bias"),
    Fuse(("encoder.layer.{i}.attention.attention.query.", "encoder.layer.{i}.attention.attention.key.",
          "encoder.layer.{i}.attention.attention.value."), "blocks.{i}.attn.qkv."),
    Rename("encoder.layer.{i}.attention.attention.relative_position_bias.", "blocks.{i}.attn.rel_pos."),
    Rename("encoder.layer.{i}.attention.output.dense.", "blocks.{i}.attn.proj."),
    Rename("encoder.layer.{i}.intermediate.dense.", "blocks.{i}.mlp.fc1."),
    Rename("encoder.layer.{i}.output.dense.", "blocks.{i}.mlp.fc2."),
]
_HF_V5 = [
    Rename("shared_position_bias.", "rel_pos_bias."),
    Rename("layers.{i}.lambda_1", "blocks.{i}.ls1.gamma"),
    Rename("layers.{i}.lambda_2", "blocks.{i}.ls2.gamma"),
    Rename("layers.{i}.layernorm_before.", "blocks.{i}.norm1."),
    Rename("layers.{i}.layernorm_after.", "blocks.{i}.norm2."),
    Rename("layers.{i}.attention.q_proj.bias", "blocks.{i}.attn.q_bias"),
    Rename("layers.{i}.attention.v_proj.bias", "blocks.{i}.attn.v_bias"),
    Fuse(("layers.{i}.attention.q_proj.", "layers.{i}.attention.k_proj.", "layers.{i}.attention.v_proj."),
         "blocks.{i}.attn.qkv."),
    Rename("layers.{i}.relative_position_bias.", "blocks.{i}.attn.rel_pos."),
    Rename("layers.{i}.attention.o_proj.", "blocks.{i}.attn.proj."),
    Rename("layers.{i}.mlp.fc1.", "blocks.{i}.mlp.fc1."),
    Rename("layers.{i}.mlp.fc2.", "blocks.{i}.mlp.fc2."),
]


def hf_keymap(layout: str) -> KeyMap:
    """The rename table of one transformers layout ("4" or "5") for BEiT."""
    return KeyMap(_HF_COMMON + (_HF_V4 if layout == "4" else _HF_V5), name=f"transformers {layout}.x BEiT")


def _signature(keys: set[str]) -> bool:
    """A BEiT state dict without config.json: ViT's patch embedding names plus layer scale, bias tables or q/v
    biases (a transformers ViT has none of them)."""
    return "embeddings.patch_embeddings.projection.weight" in keys and any(
        "lambda_1" in k or "relative_position_bias" in k or k.endswith("attention.q_proj.bias") for k in keys)


LAYOUT = TransformersLayout("BEiT", ("beit.",), ("beit",), lambda keys: hf_keymap(
    "4" if any(k.startswith("encoder.") for k in keys) else "5"), _signature)
from_hf = LAYOUT.convert  # transformers BEiT (either layout, with or without the base prefix) → vitkit


def hf_hints(state: Mapping[str, Any], config: Mapping[str, Any] | None) -> dict[str, Any]:
    """Dimensions from config.json (transformers ``BeitConfig``; its defaults where a key is absent), the switches
    (position embeddings, shared/per-block tables, layer scale, pooling) and the head size from the tensors."""
    if "lm_head.weight" in state and any(k.endswith("layernorm.weight") and k != "layernorm.weight" for k in state):
        raise CheckpointError("a transformers BeitForMaskedImageModeling with use_mean_pooling=False norms the tokens "
                              "twice (the trunk's beit.layernorm, then the task model's layernorm); BEiT's "
                              "pre-training model (modeling_pretrain.py) and vitkit's norm them once")
    hints = _structure_hints(_layout_names(from_hf, state))
    head = next((v for k, v in state.items() if k == "classifier.weight"), None)
    if head is not None:
        hints["num_classes"] = int(head.shape[0])
    if not config:
        return hints
    if config.get("hidden_act", "gelu") != "gelu":
        raise CheckpointError(f"transformers hidden_act {config['hidden_act']!r} is not supported for BEiT")
    D = config.get("hidden_size", 768)
    return dict(hints, embed_dim=D, depth=config.get("num_hidden_layers", 12),
                num_heads=config.get("num_attention_heads", 12), mlp_ratio=config.get("intermediate_size", 4 * D) / D,
                patch_size=config.get("patch_size", 16), in_chans=config.get("num_channels", 3),
                norm_eps=float(config.get("layer_norm_eps", 1e-12)))


def hf_infer(view: CheckpointView) -> tuple[str, dict[str, Any]] | None:
    """A transformers folder describes its architecture: the BEiT variant of its width nearest its image size; a
    ``BeitForMaskedImageModeling`` folder (``lm_head``) the pre-training variant of its width, with its vocabulary."""
    config = view.config or {}
    if config.get("model_type") != "beit":
        return None
    img = config.get("image_size", 224)
    img = img if isinstance(img, int) else (int(img[0]), int(img[1]))
    size = "large" if config.get("hidden_size", 768) > 768 else "base"
    lm_head = view.shapes.get("lm_head.weight")
    if lm_head is not None:
        return f"beit_{size}_patch16_224_8k_vocab", {"img_size": img, "mim_vocab_size": int(lm_head[0])}
    resolutions = (224, 384) if size == "base" else (224, 384, 512)
    res = min(resolutions, key=lambda r: abs(r - (img if isinstance(img, int) else max(img))))
    return f"beit_{size}_patch16_{res}", {"img_size": img}


# ------------------------------------------------------------------------------------------- transformers twin
def transformers_config(model: nn.Module):
    """A transformers ``BeitConfig`` with a vitkit BEiT's dimensions and switches; what it cannot express is
    refused rather than silently different."""
    from transformers import BeitConfig
    cfg = model.cfg
    mean_pool = cfg.global_pool == "avg"
    unsupported = {"act_layer": cfg.act_layer != "gelu", "qkv_bias": not cfg.qkv_bias,
                   "fc_norm": cfg.fc_norm is not None and cfg.fc_norm != mean_pool}
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise ValueError(f"transformers' BEiT cannot express {', '.join(f'{k}={getattr(cfg, k)!r}' for k in bad)}")
    return BeitConfig(
        hidden_size=cfg.embed_dim, num_hidden_layers=cfg.depth, num_attention_heads=cfg.num_heads,
        intermediate_size=model.blocks[0].mlp.fc1.out_features, hidden_act="gelu",
        image_size=tuple(model.patch_embed.img_size), patch_size=cfg.patch_size, num_channels=cfg.in_chans,
        layer_norm_eps=cfg.norm_eps, layer_scale_init_value=cfg.init_values or 0.0,
        use_absolute_position_embeddings=cfg.use_abs_pos_emb, use_relative_position_bias=cfg.use_rel_pos_bias,
        use_shared_relative_position_bias=cfg.use_shared_rel_pos_bias, use_mean_pooling=mean_pool,
        use_mask_token=bool(cfg.mim_vocab_size), vocab_size=cfg.mim_vocab_size or 8192, num_labels=cfg.num_classes,
        drop_path_rate=0.0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def to_transformers(model: nn.Module) -> nn.Module:
    """``BeitForImageClassification`` holding a vitkit BEiT's weights, written through the inverse of the rename
    table that reads transformers files (index buffers left out: transformers computes them); eval mode, same device
    and dtype. It computes ``forward``: a masked-image-modelling model's twin has its mask token but not its
    ``lm_head``, which ``forward`` does not use (``to_transformers_mim`` builds that one)."""
    from transformers import BeitForImageClassification
    hf = BeitForImageClassification(transformers_config(model))
    layout = "4" if any(".encoder.layer." in k for k in hf.state_dict()) else "5"
    return write_twin(model, hf, hf_keymap(layout), LAYOUT.bases[0], skip=(r"relative_position_index$", r"^lm_head\."))


def to_transformers_mim(model: nn.Module) -> nn.Module:
    """``BeitForMaskedImageModeling`` holding a vitkit BEiT's weights (a model with ``mim_vocab_size`` > 0): its
    ``logits[bool_masked_pos]`` are vitkit's ``masked_token_logits``. transformers' MIM model norms every token with
    its own top-level ``layernorm`` (the trunk's is the identity under ``use_mean_pooling``) and has no classifier."""
    from transformers import BeitForMaskedImageModeling
    cfg = model.cfg
    if not cfg.mim_vocab_size or cfg.num_classes:
        raise ValueError(f"transformers' BeitForMaskedImageModeling has a masked-image-modelling head and no "
                         f"classifier; this model has mim_vocab_size={cfg.mim_vocab_size}, "
                         f"num_classes={cfg.num_classes}")
    config = transformers_config(model)
    config.use_mean_pooling = True  # the trunk's final norm is the identity; the task model's layernorm is vitkit's
    hf = BeitForMaskedImageModeling(config)
    layout = "4" if any(".encoder.layer." in k for k in hf.state_dict()) else "5"
    return write_twin(model, hf, hf_keymap(layout), LAYOUT.bases[0], top_level=("lm_head.", "layernorm."),
                      skip=(r"relative_position_index$",))


HF_FORMAT = SourceFormat("hf", LAYOUT.detect, LAYOUT.convert, hf_hints, infer=hf_infer, twin=to_transformers,
                         description="transformers BEiT folder or state dict (4.x and 5.x key layouts; "
                                     "BeitForImageClassification, BeitModel, BeitForMaskedImageModeling)")

# Detection order: the most specific signature first.
FORMATS = (HF_FORMAT, OFFICIAL_FORMAT, TIMM_FORMAT)

# Resizing for another input size, per source: the official fine-tuning script (also for timm's files and vitkit's
# folders, which have no resize code of their own) puts the relative-position tables on a geometric progression and
# interpolates them with a cubic spline, and resizes an absolute embedding bicubically without antialiasing;
# transformers resizes both at every forward (interpolate_pos_encoding=True), the tables bilinearly.
# tests/test_pos_embed_resize.py checks every entry against that code's output.
_OFFICIAL = "microsoft/unilm beit/run_class_finetuning.py@768a3c8"
_OFFICIAL_RULE = ResizeRule("bicubic", _OFFICIAL, rel_pos="geometric", rel_pos_source=_OFFICIAL)
_HF = "transformers 5.25.0 models/beit/modeling_beit.py"
RESIZE = {
    "official": _OFFICIAL_RULE, "timm": _OFFICIAL_RULE, "vitkit": _OFFICIAL_RULE,
    "hf": ResizeRule("bicubic", f"{_HF} BeitEmbeddings.interpolate_pos_encoding (at forward time)", rel_pos="bilinear",
                     rel_pos_source=f"{_HF} BeitRelativePositionBias.forward (at forward time)"),
}
