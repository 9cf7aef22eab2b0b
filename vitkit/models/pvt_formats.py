"""Checkpoint formats of PVT v1: the official release files (whai362/PVT ``classification/pvt.py``, a bare state dict)
and transformers (``PvtForImageClassification``; one key layout in 4.x and 5.x: transformers 5.24 has no conversion
mapping for PVT and ``save_pretrained`` writes the names its modules use), the transformers twin built from the
inverse of the same table, and the named public weights. Helpers shared with PVT v2's formats live here too.

vitkit's PVT layout (``vitkit.models.pvt``): ``patch_embed`` (stage 1's embedding), ``stages.{i}.downsample`` (stages
2-4), ``stages.{i}.pos_embed``, ``stages.3.cls_token``, ``stages.{i}.blocks.{j}.{norm1, attn.{q, kv, proj, sr, norm},
norm2, mlp.{fc1, fc2}}``, ``norm``, ``head``.
"""
from __future__ import annotations

from typing import Any, Mapping

from torch import Tensor, nn

from vitkit.specs import CheckpointView, SourceFormat, WeightSpec
from vitkit.weights.keymap import Fuse, KeyMap, Rename
from vitkit.weights.report import CheckpointError

__all__ = ["PVT_FORMATS", "WEIGHTS", "OFFICIAL", "OFFICIAL_EMBEDS", "OFFICIAL_HEAD", "HF", "to_transformers",
           "strip_base", "hf_act", "head_hints", "hf_stage_hints", "hf_common", "nearest_variant", "twin_from"]

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


def head_hints(state: Mapping[str, Tensor], key: str = "head.weight") -> dict[str, Any]:
    """What a state dict says about the head: its class count, and missing q/kv biases (``qkv_bias=False``)."""
    hints: dict[str, Any] = {}
    if key in state:
        hints["num_classes"] = int(state[key].shape[0])
    if any(k.endswith(("attn.q.weight", "attention.query.weight", "attention.self.query.weight")) for k in state) \
            and not any(k.endswith(("attn.q.bias", "attention.query.bias", "attention.self.query.bias"))
                        for k in state):
        hints["qkv_bias"] = False
    return hints


OFFICIAL_FORMAT = SourceFormat(
    "official", lambda v: v.has("patch_embed1.proj.weight", "pos_embed1"), OFFICIAL.forward,
    lambda state, config: head_hints(state),
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


def strip_base(state: Mapping[str, Tensor], base: str) -> dict[str, Tensor]:
    """``PvtForImageClassification`` keys carry the base model's prefix (``pvt.``); ``PvtModel`` files do not."""
    return {(k[len(base):] if k.startswith(base) else k): v for k, v in state.items()}


def _looks_like_hf(view: CheckpointView) -> bool:
    if view.model_type is not None:
        return view.model_type == "pvt"
    return any(k.startswith(("pvt.encoder.patch_embeddings.", "encoder.patch_embeddings.")) for k in view.keys)


_ACT = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh"}
_TWIN_ACT = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}


def hf_act(config: Mapping[str, Any], family: str) -> str:
    act = config.get("hidden_act", "gelu")
    if act not in _ACT:
        raise CheckpointError(f"transformers hidden_act {act!r} is not supported for {family}")
    return _ACT[act]


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
                 act_layer=hf_act(config, family))
    return hints


def _hf_hints(state: dict[str, Tensor], config: Mapping[str, Any] | None) -> dict[str, Any]:
    hints = hf_stage_hints(config, "PVT", [4, 2, 2, 2], "sequence_reduction_ratios")
    if config and "image_size" in config:
        hints["img_size"] = _img_size(config["image_size"])
    return {**hints, **head_hints(strip_base(state, "pvt."), "classifier.weight")}


def _img_size(value) -> int | tuple[int, int]:
    return value if isinstance(value, int) else (int(value[0]), int(value[1]))


def from_hf(state: dict[str, Tensor], report) -> dict[str, Tensor]:
    return HF.forward(strip_base(state, "pvt."), report)


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
    if config.get("model_type") != "pvt":
        return None
    return nearest_variant("pvt_[tsml]*", hf_stage_hints(config, "PVT", [4, 2, 2, 2], "sequence_reduction_ratios")), \
        {"img_size": _img_size(config.get("image_size", 224))}


# ------------------------------------------------------------------------------------------- transformers twin
def twin_from(model: nn.Module, hf: nn.Module, keymap: KeyMap, base: str, norms: Mapping[str, float]) -> nn.Module:
    """Write a vitkit model's weights into ``hf`` through the inverse of ``keymap`` (``base`` = the transformers base
    model prefix) and set the eps of the LayerNorms whose name contains a key of ``norms`` (transformers' config has
    one ``layer_norm_eps``; the official weights use 1e-5 in some norms), so both compute the same function."""
    state = keymap.inverse({k: v.detach() for k, v in model.state_dict().items()})
    hf.load_state_dict({(k if k.startswith("classifier.") else base + k): v for k, v in state.items()}, strict=True)
    for name, module in hf.named_modules():
        for part, eps in norms.items():
            if part in name and isinstance(module, nn.LayerNorm):
                module.eps = eps
    p = next(model.parameters())
    return hf.to(device=p.device, dtype=p.dtype).eval()


def hf_common(cfg) -> dict[str, Any]:
    """The config.json fields PVT and PVT v2 share, from a vitkit config."""
    if cfg.act_layer not in _TWIN_ACT:
        raise ValueError(f"transformers' PVT cannot express act_layer={cfg.act_layer!r}")
    if any(not float(r).is_integer() for r in cfg.mlp_ratios):
        raise ValueError(f"transformers' PVT takes integer MLP ratios, not {list(cfg.mlp_ratios)}")
    return dict(num_channels=cfg.in_chans, num_encoder_blocks=4, depths=list(cfg.depths),
                hidden_sizes=list(cfg.embed_dims), num_attention_heads=list(cfg.num_heads),
                mlp_ratios=[int(r) for r in cfg.mlp_ratios], hidden_act=_TWIN_ACT[cfg.act_layer],
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
    return twin_from(model, PvtForImageClassification(config), HF, "pvt.",
                     {"patch_embeddings": cfg.embed_norm_eps, "attention.self.layer_norm": cfg.sr_norm_eps})


HF_FORMAT = SourceFormat("hf", _looks_like_hf, from_hf, _hf_hints, infer=_hf_infer, twin=to_transformers,
                         description="transformers PvtForImageClassification / PvtModel folder or state dict")

# ----------------------------------------------------------------------------------------------- named weights
# The official release files (github.com/whai362/PVT/releases/download/v2/pvt_{tiny,…}.pth) carry no hash in their
# names and none is published, so they are not in the catalog. transformers' converted copies of them are Hub
# repositories (huggingface_hub verifies what it downloads): the ones whose model.safetensors is listed on the Hub.
# pvt_small's repository (Zetatech/pvt-small-224) is left out: its safetensors file could not be confirmed here.
_HUB = {"pvt_tiny": "Zetatech/pvt-tiny-224", "pvt_medium": "Zetatech/pvt-medium-224",
        "pvt_large": "Zetatech/pvt-large-224"}
WEIGHTS = {name: WeightSpec(url=f"hf-hub:{repo}", source_format="hf", filename="model.safetensors",
                            notes="official ImageNet-1k weights converted by transformers (convert_pvt_to_pytorch.py)")
           for name, repo in _HUB.items()}

# Detection order: the most specific signature first.
PVT_FORMATS = (HF_FORMAT, OFFICIAL_FORMAT)
