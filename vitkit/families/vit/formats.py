"""Checkpoint formats of the ViT family: timm, transformers (4.x and 5.x layouts, and the transformers twin built from
the same tables), and how each source resizes the position embedding. The original JAX ``.npz`` files are read by
``jax.py``. DeiT (``vitkit.families.deit.formats``) reads the same timm and transformers layouts (transformers'
``ViT*`` and ``DeiT*`` classes share one set of names) and builds its formats from the pieces here.

vitkit's ViT/DeiT use timm's module names, so timm files and the official DeiT release files (timm's
``VisionTransformer`` inside ``{'model': state_dict}``, facebookresearch/deit ``models.py``) need only the renames of
older layer-scale names, and a timm hybrid built without stages its root block's (``TIMM_ROOT_ONLY``).
"""
from __future__ import annotations

import math
import re
from typing import Any, Mapping

from torch import Tensor, nn

from vitkit.families.vit.jax import JAX_FORMAT
from vitkit.specs import CheckpointView, ResizeRule, SourceFormat
from vitkit.weights.keymap import Drop, Fuse, KeyMap, Rename
from vitkit.weights.transformers_layout import (TWIN_ACTIVATIONS, TransformersLayout, head_hints, hf_activation,
                                               strip_base, write_twin)

__all__ = ["FORMATS", "RESIZE", "RESIZE_CHOICES", "TIMM_FORMAT", "HF_FORMAT", "HF_RESIZE_SOURCE", "from_timm",
           "timm_hints", "looks_like_timm_vit", "hf_keymap", "from_hf", "to_transformers", "transformers_config"]

# ------------------------------------------------------------------------------------------- timm and official
_LAYER_SCALE = [
    Rename("blocks.{i}.gamma_1", "blocks.{i}.ls1.gamma"),  # DeiT-III / older timm layer-scale names
    Rename("blocks.{i}.gamma_2", "blocks.{i}.ls2.gamma"),
]
TIMM = KeyMap(_LAYER_SCALE + [Rename("", "")], name="timm ViT")  # everything else: timm's names are vitkit's
# A hybrid without ResNet stages (timm's vit_tiny_r_s16_p8_*: vision_transformer_hybrid.py _resnetv2(layers=()) is
# create_resnetv2_stem alone) has its root block's conv and norm directly under the backbone.
TIMM_ROOT_ONLY = KeyMap(_LAYER_SCALE + [
    Rename("patch_embed.backbone.conv.", "patch_embed.backbone.stem.conv."),
    Rename("patch_embed.backbone.norm.", "patch_embed.backbone.stem.norm."),
    Rename("", ""),
], name="timm ViT hybrid (root block only)")


def from_timm(state: dict[str, Tensor], report) -> dict[str, Tensor]:
    """timm's ViT (or DeiT's release, the same names) → vitkit."""
    table = TIMM_ROOT_ONLY if "patch_embed.backbone.conv.weight" in state else TIMM
    return table.forward(state, report)


def looks_like_timm_vit(view: CheckpointView) -> bool:
    """timm's ViT names (also those of DeiT's release files and of timm's DeiT)."""
    return view.has("patch_embed.proj.weight") and view.any_startswith("blocks.0.attn.qkv.")


def timm_hints(state: dict[str, Tensor], config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    hints: dict[str, Any] = {}
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
    if "pos_embed" not in state:
        hints["add_position_embedding"] = False  # timm's pos_embed='none'
    return {**hints, **timm_hybrid_hints(state)}


def timm_hybrid_hints(state: Mapping[str, Any]) -> dict[str, Any]:
    """A timm hybrid (``patch_embed.backbone.*``): its ResNet's units per stage and width read off the tensors, its
    patch off the projection, and the epsilons of timm's port (vision_transformer_hybrid.py ``_resnetv2``:
    GroupNormAct 1e-5, ``StdConv2dSame(eps=1e-8)``)."""
    root = state.get("patch_embed.backbone.stem.conv.weight", state.get("patch_embed.backbone.conv.weight"))
    if root is None:
        return {}
    units: dict[int, int] = {}
    for key in state:
        if m := re.match(r"patch_embed\.backbone\.stages\.(\d+)\.blocks\.(\d+)\.", key):
            units[int(m[1])] = max(units.get(int(m[1]), 0), int(m[2]) + 1)
    resnet = dict(num_layers=tuple(units[i] for i in sorted(units)), width_factor=root.shape[0] / 64, gn_eps=1e-5,
                  ws_eps=1e-8, ws_eps_in_sqrt=True)
    return {"resnet": resnet, "patch_size": int(state["patch_embed.proj.weight"].shape[-1])}


TIMM_FORMAT = SourceFormat("timm", looks_like_timm_vit, from_timm, timm_hints,
                           description="timm VisionTransformer state dict (bare, or in any release container)")

# ------------------------------------------------------------------------------------------------ transformers
# Files on the Hub (and what save_pretrained writes, even in 5.x) use the 4.x names; a live 5.x model's state_dict
# uses the 5.x names (transformers/conversion_mapping.py "ViTModel"). Both read; the twin writes its own version's.
_EMBED = [
    Rename("embeddings.cls_token", "cls_token"),
    Rename("embeddings.distillation_token", "dist_token"),
    Rename("embeddings.position_embeddings", "pos_embed"),
    Rename("embeddings.patch_embeddings.projection.", "patch_embed.proj."),
    Rename("layernorm.", "norm."),
    Rename("pooler.dense.", "pre_logits.fc."),  # ViTModel's pooler (dense + tanh) = the paper's pre-logits layer
    Drop(r"^embeddings\.mask_token$", "masked-image-modelling token, not used for classification"),
]
_V4 = [
    Rename("encoder.layer.{i}.layernorm_before.", "blocks.{i}.norm1."),
    Rename("encoder.layer.{i}.layernorm_after.", "blocks.{i}.norm2."),
    Fuse(("encoder.layer.{i}.attention.attention.query.", "encoder.layer.{i}.attention.attention.key.",
          "encoder.layer.{i}.attention.attention.value."), "blocks.{i}.attn.qkv."),
    Rename("encoder.layer.{i}.attention.output.dense.", "blocks.{i}.attn.proj."),
    Rename("encoder.layer.{i}.intermediate.dense.", "blocks.{i}.mlp.fc1."),
    Rename("encoder.layer.{i}.output.dense.", "blocks.{i}.mlp.fc2."),
]
_V5 = [
    Rename("layers.{i}.layernorm_before.", "blocks.{i}.norm1."),
    Rename("layers.{i}.layernorm_after.", "blocks.{i}.norm2."),
    Fuse(("layers.{i}.attention.q_proj.", "layers.{i}.attention.k_proj.", "layers.{i}.attention.v_proj."),
         "blocks.{i}.attn.qkv."),
    Rename("layers.{i}.attention.o_proj.", "blocks.{i}.attn.proj."),
    Rename("layers.{i}.mlp.fc1.", "blocks.{i}.mlp.fc1."),
    Rename("layers.{i}.mlp.fc2.", "blocks.{i}.mlp.fc2."),
]
_HEADS = {False: [Rename("classifier.", "head.")],  # ViTForImageClassification, DeiTForImageClassification
          True: [Rename("cls_classifier.", "head."), Rename("distillation_classifier.", "head_dist.")]}


def hf_keymap(layout: str, distilled: bool) -> KeyMap:
    """The rename table of one transformers layout ("4" or "5") for ViT/DeiT (``distilled``: the WithTeacher model)."""
    return KeyMap(_EMBED + (_V4 if layout == "4" else _V5) + _HEADS[distilled], name=f"transformers {layout}.x ViT")


def _keymap_for(keys) -> KeyMap:
    """The table for a prefix-stripped set of keys: 4.x (``encoder.layer.``) or 5.x names, with the WithTeacher
    heads when ``cls_classifier`` is there."""
    return hf_keymap("4" if any(k.startswith("encoder.layer.") for k in keys) else "5", "cls_classifier.weight" in keys)


LAYOUT = TransformersLayout("ViT", ("vit.", "deit."), ("vit", "deit"), _keymap_for,
                           lambda keys: any(k.startswith("embeddings.patch_embeddings.") for k in keys))
from_hf = LAYOUT.convert  # transformers ViT/DeiT (either layout, with or without the base prefix) → vitkit


def hf_hints(state: dict[str, Tensor], config: Mapping[str, Any] | None) -> dict[str, Any]:
    """Architecture from config.json (when there is one); head, pooler and distillation head from the tensors."""
    hints: dict[str, Any] = {}
    if config:
        act = hf_activation(config, "ViT")
        D = config.get("hidden_size", 768)
        hints = dict(embed_dim=D, depth=config.get("num_hidden_layers", 12),
                     num_heads=config.get("num_attention_heads", 12),
                     mlp_ratio=config.get("intermediate_size", 4 * D) / D, patch_size=config.get("patch_size", 16),
                     in_chans=config.get("num_channels", 3), qkv_bias=config.get("qkv_bias", True),
                     norm_eps=float(config.get("layer_norm_eps", 1e-12)), act_layer=act)
    hints.update(head_hints(state, "classifier.weight" if "classifier.weight" in state else "cls_classifier.weight"))
    if any(k.endswith("embeddings.distillation_token") for k in state) and "cls_classifier.weight" not in state:
        hints["dist_head"] = False  # DeiTForImageClassification / DeiTModel: no head on the distillation token
    pooler = strip_base(state, LAYOUT.bases).get("pooler.dense.weight")
    if pooler is not None:
        hints["representation_size"] = int(pooler.shape[0])
    return hints


def _registered_name(family: str, width: int, patch: int, img: int) -> str:
    """The registered variant closest to (width, patch, image size): nearest width, then patch, then image size. The
    exact values reach the model as config hints and overrides."""
    from vitkit.registry import get_spec, list_models
    pattern = "vit_*" if family == "vit" else "deit_*_distilled_*"  # transformers' DeiTs all have a dist token
    specs = [(name, get_spec(name).config) for name in list_models(pattern)]
    specs = [(name, cfg) for name, cfg in specs if "resnet" not in cfg]  # the hybrids: _registered_hybrid
    nearest = min({cfg["embed_dim"] for _, cfg in specs}, key=lambda w: abs(w - width))
    return min((abs(cfg["patch_size"] - patch), abs(cfg["img_size"] - img), name)
               for name, cfg in specs if cfg["embed_dim"] == nearest)[-1]


def _registered_hybrid(width: int, img: int) -> str:
    """The registered ResNet hybrid closest to (width, image size); its ResNet comes from the checkpoint's hints."""
    from vitkit.registry import get_spec, list_models
    specs = [(name, get_spec(name).config) for name in list_models("vit_*")]
    return min((abs(cfg["embed_dim"] - width), abs(cfg["img_size"] - img), name)
               for name, cfg in specs if "resnet" in cfg)[-1]


def hf_infer(view: CheckpointView) -> tuple[str, dict[str, Any]] | None:
    """A transformers folder describes its architecture: a registered name of its family plus its image size."""
    config = view.config or {}
    if config.get("model_type") not in LAYOUT.model_types:
        return None
    img = config.get("image_size", 224)
    img = img if isinstance(img, int) else (int(img[0]), int(img[1]))  # transformers accepts (H, W) too
    name = _registered_name(config["model_type"], config.get("hidden_size", 768), config.get("patch_size", 16),
                            img if isinstance(img, int) else max(img))
    return name, {"img_size": img}


# ------------------------------------------------------------------------------------------- transformers twin
def _is_distilled(model: nn.Module) -> bool:
    return getattr(model, "num_dist_tokens", 0) > 0


def transformers_config(model: nn.Module):
    """A transformers ``ViTConfig`` / ``DeiTConfig`` with the dimensions of a vitkit ViT/DeiT. transformers' ViT has no
    GAP pooling, fc_norm, pre-logits layer or LayerScale: those are refused rather than silently different."""
    from transformers import DeiTConfig, ViTConfig
    cfg = model.cfg
    unsupported = {"global_pool": cfg.global_pool != "token", "class_token": not cfg.class_token,
                   "fc_norm": bool(cfg.fc_norm), "representation_size": bool(cfg.representation_size),
                   "init_values": bool(cfg.init_values), "act_layer": cfg.act_layer not in TWIN_ACTIVATIONS,
                   "dist_head": _is_distilled(model) and not cfg.dist_head, "resnet": hasattr(cfg, "resnet"),
                   "add_position_embedding": not cfg.add_position_embedding, "qk_scale": cfg.qk_scale is not None}
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise ValueError(f"transformers' ViT cannot express {', '.join(f'{k}={getattr(cfg, k)!r}' for k in bad)}")
    config_cls = DeiTConfig if _is_distilled(model) else ViTConfig
    return config_cls(
        hidden_size=cfg.embed_dim, num_hidden_layers=cfg.depth, num_attention_heads=cfg.num_heads,
        intermediate_size=model.blocks[0].mlp.fc1.out_features, hidden_act=TWIN_ACTIVATIONS[cfg.act_layer],
        image_size=tuple(model.patch_embed.img_size), patch_size=cfg.patch_size, num_channels=cfg.in_chans,
        qkv_bias=cfg.qkv_bias, layer_norm_eps=cfg.norm_eps, num_labels=cfg.num_classes,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def to_transformers(model: nn.Module) -> nn.Module:
    """``ViTForImageClassification`` (or ``DeiTForImageClassificationWithTeacher``) holding a vitkit ViT/DeiT's
    weights, written through the inverse of the rename table that reads transformers files; eval mode, same device and
    dtype."""
    from transformers import DeiTForImageClassificationWithTeacher, ViTForImageClassification
    distilled = _is_distilled(model)
    hf = (DeiTForImageClassificationWithTeacher if distilled else ViTForImageClassification)(transformers_config(model))
    layout = "4" if any(".encoder.layer." in k for k in hf.state_dict()) else "5"
    return write_twin(model, hf, hf_keymap(layout, distilled), hf.base_model_prefix + ".",
                      ("classifier.", "cls_classifier.", "distillation_classifier."))


HF_FORMAT = SourceFormat("hf", LAYOUT.detect, LAYOUT.convert, hf_hints, infer=hf_infer, twin=to_transformers,
                         description="transformers ViT/DeiT folder or state dict (4.x and 5.x key layouts)")

# Detection order: the most specific signature first.
FORMATS = (HF_FORMAT, JAX_FORMAT, TIMM_FORMAT)

# ---------------------------------------------------------------------------------- resizing for another input size
# Each source is resized the way its own code does it; a source with no resize code of its own (timm's files, vitkit's
# folders) the way the family's official code does: ViT's is google-research/vision_transformer (DeiT's,
# facebookresearch/deit: vitkit.families.deit.formats). tests/test_pos_embed_resize.py checks every entry against that
# code's output.
_VIT_JAX = ResizeRule("zoom_linear", "google-research/vision_transformer vit_jax/checkpoint.py@c6de1e5 "
                                     "interpolate_posembed")
#: transformers resizes at every forward (``interpolate_pos_encoding=True``), bicubically; ``.format(model_type)``
HF_RESIZE_SOURCE = "transformers 5.25.0 models/{0}/modeling_{0}.py interpolate_pos_encoding (at forward time)"
RESIZE = {
    "jax": _VIT_JAX,
    "jax/big_vision": ResizeRule("zoom_linear", "google-research/big_vision big_vision/models/vit.py@0127fb6 "
                                                "resample_posemb"),
    "timm": _VIT_JAX, "vitkit": _VIT_JAX,
    "hf": ResizeRule("bicubic", HF_RESIZE_SOURCE.format("vit")),
}
RESIZE_CHOICES = ("bicubic", "bicubic_antialias", "zoom_linear", "bilinear")  # pos_embed_resize= of a learned table


def square_grid(n: int) -> int | None:
    side = math.isqrt(n)
    return side if side * side == n else None
