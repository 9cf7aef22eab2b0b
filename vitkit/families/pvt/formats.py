"""Checkpoint formats of PVT v1: the official release files (whai362/PVT ``classification/pvt.py``, a bare state
dict), transformers (``PvtForImageClassification``; one key layout in 4.x and 5.x: transformers 5.24 has no conversion
mapping for PVT and ``save_pretrained`` writes the names its modules use) and the transformers twin built from the
inverse of the same table. Helpers shared with PVT v2's formats live here too.

vitkit's PVT layout (``vitkit.families.pvt.model``): ``patch_embed`` (stage 1's embedding), ``stages.{i}.downsample``
(stages 2-4), ``stages.{i}.pos_embed``, ``stages.3.cls_token``, ``stages.{i}.blocks.{j}.{norm1, attn.{q, kv, proj, sr,
norm}, norm2, mlp.{fc1, fc2}}``, ``norm``, ``head``.
"""
from __future__ import annotations

from typing import Any, Mapping

from torch import Tensor, nn

from vitkit.specs import CheckpointView, SourceFormat
from vitkit.weights.keymap import Fuse, KeyMap, Rename
from vitkit.weights.load_report import CheckpointError
from vitkit.weights.transformers_layout import (TWIN_ACTIVATIONS, TransformersLayout, head_hints, hf_activation,
                                                strip_base, write_twin)

__all__ = ["FORMATS", "OFFICIAL", "OFFICIAL_EMBEDS", "OFFICIAL_HEAD", "HF", "LAYOUT", "to_transformers",
           "state_hints", "hf_stage_hints", "hf_common", "nearest_variant", "twin_from"]

# ------------------------------------------------------------------------------------------------------- official
# What the official PVT and PVT v2 files name alike: per-stage embeddings numbered from 1 (the first is vitkit's stem;
# first match wins) and the classifier.
OFFICIAL_EMBEDS = [Rename("patch_embed1.", "patch_embed."), Rename("patch_embed{i+1}.", "stages.{i}.downsample.")]
OFFICIAL_HEAD = Rename("head.", "head.")
OFFICIAL = KeyMap(OFFICIAL_EMBEDS + [
    Rename("pos_embed{i+1}", "stages.{i}.pos_embed"),
    Rename("cls_token", "stages.3.cls_token"),
    Rename("block{i+1}.{j}.", "stages.{i}.blocks.{j}."),
    Rename("norm.", "norm."),
    OFFICIAL_HEAD,
], name="official PVT")


def state_hints(state: Mapping[str, Tensor], key: str = "head.weight") -> dict[str, Any]:
    """What a state dict says about the head: its class count, and missing q/kv biases (``qkv_bias=False``)."""
    hints = head_hints(state, key)
    if any(k.endswith(("attn.q.weight", "attention.query.weight", "attention.self.query.weight")) for k in state) \
            and not any(k.endswith(("attn.q.bias", "attention.query.bias", "attention.self.query.bias"))
                        for k in state):
        hints["qkv_bias"] = False
    return hints


OFFICIAL_FORMAT = SourceFormat(
    "official", lambda v: v.has("patch_embed1.proj.weight", "pos_embed1"), OFFICIAL.forward,
    lambda state, config: state_hints(state),
    description="whai362/PVT release (classification/pvt.py): bare state dict, patch_embed/pos_embed/block{1-4}")

# ------------------------------------------------------------------------------------------------- transformers
HF = KeyMap([
    Rename("encoder.patch_embeddings.0.projection.", "patch_embed.proj."),
    Rename("encoder.patch_embeddings.0.layer_norm.", "patch_embed.norm."),
    Rename("encoder.patch_embeddings.{i}.projection.", "stages.{i}.downsample.proj."),
    Rename("encoder.patch_embeddings.{i}.layer_norm.", "stages.{i}.downsample.norm."),
    Rename("encoder.patch_embeddings.{i}.position_embeddings", "stages.{i}.pos_embed"),
    Rename("encoder.patch_embeddings.{i}.cls_token", "stages.{i}.cls_token"),
    Rename("encoder.block.{i}.{j}.layer_norm_1.", "stages.{i}.blocks.{j}.norm1."),
    Rename("encoder.block.{i}.{j}.attention.self.query.", "stages.{i}.blocks.{j}.attn.q."),
    Fuse(("encoder.block.{i}.{j}.attention.self.key.", "encoder.block.{i}.{j}.attention.self.value."),
         "stages.{i}.blocks.{j}.attn.kv."),  # the official kv Linear: keys first, then values
    Rename("encoder.block.{i}.{j}.attention.self.sequence_reduction.", "stages.{i}.blocks.{j}.attn.sr."),
    Rename("encoder.block.{i}.{j}.attention.self.layer_norm.", "stages.{i}.blocks.{j}.attn.norm."),
    Rename("encoder.block.{i}.{j}.attention.output.dense.", "stages.{i}.blocks.{j}.attn.proj."),
    Rename("encoder.block.{i}.{j}.layer_norm_2.", "stages.{i}.blocks.{j}.norm2."),
    Rename("encoder.block.{i}.{j}.mlp.dense1.", "stages.{i}.blocks.{j}.mlp.fc1."),
    Rename("encoder.block.{i}.{j}.mlp.dense2.", "stages.{i}.blocks.{j}.mlp.fc2."),
    Rename("encoder.layer_norm.", "norm."),
    Rename("classifier.", "head."),
], name="transformers PVT")


# ``PvtForImageClassification`` keys carry the base model's prefix (``pvt.``); ``PvtModel`` files do not.
LAYOUT = TransformersLayout("PVT", bases=("pvt.",), model_types=("pvt",), keymap=lambda keys: HF,
                            signature=lambda keys: any(k.startswith("encoder.patch_embeddings.") for k in keys))


def hf_stage_hints(config: Mapping[str, Any] | None, family: str, patch_sizes: list[int], sr_key: str,
                   default_eps: float = 1e-6) -> dict[str, Any]:
    """The architecture a transformers PVT/PVT v2 config.json describes, in vitkit's names. transformers has one
    ``layer_norm_eps`` for every LayerNorm, so the checkpoint implies it for the patch-embedding and reduction norms too
    (the official code uses 1e-5 there): without a config.json, transformers' default."""
    config = config or {}
    eps = float(config.get("layer_norm_eps", default_eps))
    hints: dict[str, Any] = dict(norm_eps=eps, embed_norm_eps=eps, sr_norm_eps=eps)
    if not config:
        return hints
    if config.get("num_encoder_blocks", 4) != 4 or list(config.get("patch_sizes", patch_sizes)) != patch_sizes \
            or list(config.get("strides", [4, 2, 2, 2])) != [4, 2, 2, 2]:
        raise CheckpointError(f"transformers {family} with num_encoder_blocks={config.get('num_encoder_blocks')}, "
                              f"patch_sizes={config.get('patch_sizes')}, strides={config.get('strides')} is not a "
                              f"{family} vitkit can build (4 stages, patches {patch_sizes}, strides [4, 2, 2, 2])")
    for hint, key in (("embed_dims", "hidden_sizes"), ("num_heads", "num_attention_heads"), ("depths", "depths"),
                      ("mlp_ratios", "mlp_ratios"), ("sr_ratios", sr_key)):
        if key in config:
            hints[hint] = tuple(config[key])
    hints.update(in_chans=config.get("num_channels", 3), qkv_bias=config.get("qkv_bias", True),
                 act_layer=hf_activation(config, family))
    return hints


def _hf_hints(state: dict[str, Tensor], config: Mapping[str, Any] | None) -> dict[str, Any]:
    hints = hf_stage_hints(config, "PVT", [4, 2, 2, 2], "sequence_reduction_ratios")
    if config and "image_size" in config:
        hints["img_size"] = _img_size(config["image_size"])
    return {**hints, **state_hints(strip_base(state, LAYOUT.bases), "classifier.weight")}


def _img_size(value) -> int | tuple[int, int]:
    return value if isinstance(value, int) else (int(value[0]), int(value[1]))


def nearest_variant(pattern: str, hints: Mapping[str, Any]) -> str:
    """The registered variant of ``pattern`` closest to what a transformers config describes (``hints`` in vitkit's
    names): the same linear flag, then the smallest difference of widths, depths and MLP ratios. The exact values
    reach the model as config hints."""
    import dataclasses
    from vitkit.registry import get_spec, list_models

    def distance(name: str):
        spec = get_spec(name)
        cfg = {**{f.name: f.default for f in dataclasses.fields(spec.model_cls.config_cls)}, **spec.config}
        return (int(bool(cfg.get("linear")) != bool(hints.get("linear"))),
                *(sum(abs(a - b) for a, b in zip(cfg[k], hints.get(k, cfg[k])))
                  for k in ("embed_dims", "depths", "mlp_ratios")), name)
    return min(list_models(pattern), key=distance)


def _hf_infer(view: CheckpointView) -> tuple[str, dict[str, Any]] | None:
    config = view.config or {}
    if config.get("model_type") not in LAYOUT.model_types:
        return None
    return nearest_variant("pvt_[tsml]*", hf_stage_hints(config, "PVT", [4, 2, 2, 2], "sequence_reduction_ratios")), \
        {"img_size": _img_size(config.get("image_size", 224))}


# ------------------------------------------------------------------------------------------- transformers twin
def twin_from(model: nn.Module, hf: nn.Module, keymap: KeyMap, base: str, norms: Mapping[str, float]) -> nn.Module:
    """Write a vitkit model's weights into ``hf`` through the inverse of ``keymap`` (``base`` = the transformers base
    model prefix) and set the eps of the LayerNorms whose name contains a key of ``norms`` (transformers' config has
    one ``layer_norm_eps``; the official weights use 1e-5 in some norms), so both compute the same function."""
    hf = write_twin(model, hf, keymap, base)
    for name, module in hf.named_modules():
        for part, eps in norms.items():
            if part in name and isinstance(module, nn.LayerNorm):
                module.eps = eps
    return hf


def hf_common(cfg) -> dict[str, Any]:
    """The config.json fields PVT and PVT v2 share, from a vitkit config."""
    if cfg.act_layer not in TWIN_ACTIVATIONS:
        raise ValueError(f"transformers' PVT cannot express act_layer={cfg.act_layer!r}")
    if any(not float(r).is_integer() for r in cfg.mlp_ratios):
        raise ValueError(f"transformers' PVT takes integer MLP ratios, not {list(cfg.mlp_ratios)}")
    return dict(num_channels=cfg.in_chans, num_encoder_blocks=4, depths=list(cfg.depths),
                hidden_sizes=list(cfg.embed_dims), num_attention_heads=list(cfg.num_heads),
                mlp_ratios=[int(r) for r in cfg.mlp_ratios], hidden_act=TWIN_ACTIVATIONS[cfg.act_layer],
                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, drop_path_rate=0.0,
                layer_norm_eps=cfg.norm_eps, qkv_bias=cfg.qkv_bias, num_labels=cfg.num_classes, strides=[4, 2, 2, 2])


def to_transformers(model: nn.Module) -> nn.Module:
    """``PvtForImageClassification`` holding a vitkit PVT's weights (eval mode, same device and dtype). transformers'
    PVT runs only at its configured square size (its position embeddings are reshaped with the input's grid)."""
    from transformers import PvtConfig, PvtForImageClassification
    cfg = model.cfg
    size = cfg.img_size if isinstance(cfg.img_size, int) else tuple(cfg.img_size)
    if not isinstance(size, int) and size[0] != size[1]:
        raise ValueError(f"transformers' PVT cannot express a non-square img_size {size}")
    config = PvtConfig(image_size=size if isinstance(size, int) else size[0], patch_sizes=[4, 2, 2, 2],
                       sequence_reduction_ratios=list(cfg.sr_ratios), **hf_common(cfg))
    return twin_from(model, PvtForImageClassification(config), HF, LAYOUT.bases[0],
                     {"patch_embeddings": cfg.embed_norm_eps, "attention.self.layer_norm": cfg.sr_norm_eps})


HF_FORMAT = SourceFormat("hf", LAYOUT.detect, LAYOUT.convert, _hf_hints, infer=_hf_infer, twin=to_transformers,
                         description="transformers PvtForImageClassification / PvtModel folder or state dict")

# Detection order: the most specific signature first.
FORMATS = (HF_FORMAT, OFFICIAL_FORMAT)
