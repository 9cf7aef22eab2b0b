"""Checkpoint formats of CvT: the official release files (microsoft/CvT) and transformers'
``CvtForImageClassification`` (folders and Hub files; the transformers twin is built from the inverse of the same
table).

The two sources run the same weights with different numerics, and each file is loaded with its own source's, so it
reproduces that source's logits; the load report names them, and explicit overrides win:

| | activation | LayerNorm eps | attention scale |
| --- | --- | --- | --- |
| official ``cls_cvt.py`` | QuickGELU ``x·σ(1.702x)`` | 1e-5 | ``dim_out ** -0.5`` |
| transformers ``modeling_cvt.py`` | exact GELU (``nn.GELU()``, hard-coded) | 1e-5 (its LayerNorms ignore ``config.layer_norm_eps``, 1e-12) | ``embed_dim ** -0.5`` |

transformers' CvT has one key layout: its 5.x models keep the 4.x module names (no CvT entry in
``conversion_mapping.py``), so Hub files and live models read alike.
"""
from __future__ import annotations

from typing import Any, Mapping

from torch import Tensor, nn

from vitkit.specs import CheckpointView, SourceFormat
from vitkit.weights.keymap import KeyMap, Rename
from vitkit.weights.load_report import CheckpointError
from vitkit.weights.transformers_layout import TransformersLayout, head_hints, strip_base, write_twin

__all__ = ["FORMATS", "OFFICIAL", "HF", "LAYOUT", "to_transformers"]

_NUMERICS = {
    "official": dict(act_layer="quick_gelu", norm_eps=1e-5, attn_scale="dim"),
    "hf": dict(act_layer="gelu", norm_eps=1e-5, attn_scale="dim"),
}

# ------------------------------------------------------------------------------------------------------ official
# lib/models/cls_cvt.py: stage{i}.patch_embed.{proj,norm}, stage{i}.blocks.{j}.{norm1,attn,norm2,mlp},
# stage{i}.cls_token (last stage), norm, head; BatchNorm running statistics and num_batches_tracked included.
OFFICIAL = KeyMap([
    Rename("stage{i}.", "stages.{i}."),
    Rename("norm.", "norm."),
    Rename("head.", "head."),
], name="official CvT")


def _looks_official(view: CheckpointView) -> bool:
    return view.has("stage0.patch_embed.proj.weight") and view.any_startswith("stage0.blocks.0.attn.conv_proj_q.")


def _convert_official(state: dict[str, Tensor], report) -> dict[str, Tensor]:
    report.notes.append("official microsoft/CvT numerics: QuickGELU, LayerNorm eps 1e-5, attention scale "
                        "dim_out ** -0.5 (the full stage width)")
    return OFFICIAL.forward(state, report)


def _class_tokens(flags: list[bool]) -> bool | tuple[bool, ...]:
    """Per-stage class-token flags in the config's form: one flag when only the last stage may have one."""
    return flags[-1] if not any(flags[:-1]) else tuple(flags)


def _tensor_hints(state: Mapping[str, Tensor], head: str, stage: str) -> dict[str, Any]:
    """What the tensors themselves say: the stages' class tokens (or mean pooling without one) and the head size."""
    stages = 1 + max((int(k[len(stage):].split(".")[0]) for k in state if k.startswith(stage)), default=0)
    return {"class_token": _class_tokens([any(k.startswith(f"{stage}{i}") and k.endswith("cls_token") for k in state)
                                          for i in range(stages)]), **head_hints(state, head)}


def official_hints(state: dict[str, Tensor], config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    return {**_NUMERICS["official"], **_tensor_hints(state, "head.weight", "stage")}


OFFICIAL_FORMAT = SourceFormat("official", _looks_official, _convert_official, official_hints,
                               description="microsoft/CvT release file: bare state_dict with BatchNorm statistics")

# ------------------------------------------------------------------------------------------------ transformers
_QKV = (("query", "q"), ("key", "k"), ("value", "v"))
_LAYER = "encoder.stages.{i}.layers.{j}."
_BLOCK = "stages.{i}.blocks.{j}."
HF = KeyMap([
    Rename("encoder.stages.{i}.cls_token", "stages.{i}.cls_token"),
    Rename("encoder.stages.{i}.embedding.convolution_embeddings.projection.", "stages.{i}.patch_embed.proj."),
    Rename("encoder.stages.{i}.embedding.convolution_embeddings.normalization.", "stages.{i}.patch_embed.norm."),
    *[rule for hf, ours in _QKV for rule in (
        Rename(f"{_LAYER}attention.attention.convolution_projection_{hf}.convolution_projection.convolution.",
               f"{_BLOCK}attn.conv_proj_{ours}.conv."),
        Rename(f"{_LAYER}attention.attention.convolution_projection_{hf}.convolution_projection.normalization.",
               f"{_BLOCK}attn.conv_proj_{ours}.bn."),
        Rename(f"{_LAYER}attention.attention.projection_{hf}.", f"{_BLOCK}attn.proj_{ours}."))],
    Rename(f"{_LAYER}attention.output.dense.", f"{_BLOCK}attn.proj."),
    Rename(f"{_LAYER}layernorm_before.", f"{_BLOCK}norm1."),
    Rename(f"{_LAYER}intermediate.dense.", f"{_BLOCK}mlp.fc1."),
    Rename(f"{_LAYER}layernorm_after.", f"{_BLOCK}norm2."),
    Rename(f"{_LAYER}output.dense.", f"{_BLOCK}mlp.fc2."),
    Rename("layernorm.", "norm."),
    Rename("classifier.", "head."),
], name="transformers CvT")
_TOP = ("layernorm.", "classifier.")  # CvtForImageClassification's own modules; the rest sit under ``cvt.``
LAYOUT = TransformersLayout(
    "CvT", bases=("cvt.",), model_types=("cvt",), keymap=lambda keys: HF,
    signature=lambda keys: any(k.startswith("encoder.stages.0.embedding.convolution_embeddings.") for k in keys))


def _convert_hf(state: dict[str, Tensor], report) -> dict[str, Tensor]:
    report.notes.append("transformers CvT numerics: exact GELU (hard-coded nn.GELU), LayerNorm eps 1e-5 (its "
                        "LayerNorms ignore config.layer_norm_eps), attention scale embed_dim ** -0.5; the official "
                        "weights were trained with QuickGELU (act_layer='quick_gelu' runs them so)")
    return LAYOUT.convert(state, report)


def _per_stage(config: Mapping[str, Any], key: str, default: Any, kind: type) -> Any:
    """A CvtConfig per-stage list in vitkit's form: one value when the stages agree, else the tuple."""
    values = [kind(v) for v in config.get(key, [default])]
    return values[0] if len(set(values)) == 1 else tuple(values)


def _config_hints(config: Mapping[str, Any]) -> dict[str, Any]:
    """Architecture from a transformers ``CvtConfig`` (config.json), in vitkit's names."""
    methods = set(config.get("qkv_projection_method", ["dw_bn"]))
    if methods != {"dw_bn"}:
        raise CheckpointError(f"transformers CvT qkv_projection_method {sorted(methods)}: transformers runs only "
                              f"'dw_bn' (for 'avg' it builds no projection and its forward fails)")
    cls = list(config.get("cls_token", [False, False, True]))
    if any(cls[:-1]):
        raise CheckpointError(f"transformers CvT cls_token={cls}: transformers sizes every class token by the last "
                              f"stage's width, so an earlier stage's cannot join its tokens (its forward fails)")
    hints = {name: tuple(config[key]) for name, key in (
        ("embed_dim", "embed_dim"), ("depth", "depth"), ("num_heads", "num_heads"), ("patch_size", "patch_sizes"),
        ("patch_stride", "patch_stride"), ("patch_padding", "patch_padding")) if key in config}
    hints.update(in_chans=config.get("num_channels", 3), class_token=bool(cls[-1]),
                 mlp_ratio=_per_stage(config, "mlp_ratio", 4.0, float), qkv_bias=_per_stage(config, "qkv_bias", True, bool))
    for name, default in (("kernel_qkv", 3), ("stride_q", 1), ("stride_kv", 2), ("padding_q", 1), ("padding_kv", 1)):
        hints[name] = _per_stage(config, name, default, int)
    return hints


def hf_hints(state: dict[str, Tensor], config: Mapping[str, Any] | None) -> dict[str, Any]:
    return {**_NUMERICS["hf"],
            **_tensor_hints(strip_base(state, LAYOUT.bases), "classifier.weight", "encoder.stages."),
            **(_config_hints(config) if config else {})}


def hf_infer(view: CheckpointView) -> tuple[str, dict[str, Any]] | None:
    """A transformers folder describes its architecture: the registered variant of the same widths and depths (or the
    nearest; config.json's values reach the model as hints)."""
    from vitkit.registry import get_spec, list_models
    config = view.config or {}
    if config.get("model_type") not in LAYOUT.model_types:
        return None
    dims, depth = tuple(config.get("embed_dim", (64, 192, 384))), tuple(config.get("depth", (1, 2, 10)))
    specs = {name: get_spec(name).config for name in list_models("cvt_*")}
    name = min(specs, key=lambda n: (tuple(specs[n]["embed_dim"]) != dims, tuple(specs[n]["depth"]) != depth,
                                     abs(specs[n]["embed_dim"][-1] - dims[-1]), n))
    return name, {}


# ------------------------------------------------------------------------------------------- transformers twin
def transformers_config(model: nn.Module):
    """A transformers ``CvtConfig`` with a vitkit CvT's dimensions (numerics are set on the built model)."""
    from transformers import CvtConfig
    cfg = model.cfg
    stages = len(cfg.depth)
    short = [i for i, d in enumerate(cfg.depth) if d <= i]
    if short:  # CvtStage indexes its per-block drop-path list by the stage number
        raise ValueError(f"transformers' CvT cannot build depth={list(cfg.depth)}: its CvtStage needs more than i "
                         f"blocks in stage i (stage(s) {short})")
    if not cfg.stage_class_token(stages - 1):  # its forward reads outputs[1], the class token, which is then absent
        raise ValueError("transformers' CvtForImageClassification cannot run without a class token (class_token=False)")
    each = {name: [cfg.per_stage(name, i) for i in range(stages)] for name in cfg._PER_STAGE if name != "class_token"}
    if set(each["qkv_proj_method"]) != {"dw_bn"}:
        raise ValueError(f"transformers' CvT runs only qkv_proj_method 'dw_bn', got {each['qkv_proj_method']}")
    if any(cfg.stage_class_token(i) for i in range(stages - 1)):
        raise ValueError("transformers' CvT sizes every class token by the last stage's width: a class token in an "
                         "earlier stage cannot run there")
    return CvtConfig(
        num_channels=cfg.in_chans, patch_sizes=list(cfg.patch_size), patch_stride=list(cfg.patch_stride),
        patch_padding=list(cfg.patch_padding), embed_dim=list(cfg.embed_dim), num_heads=list(cfg.num_heads),
        depth=list(cfg.depth), mlp_ratio=each["mlp_ratio"], attention_drop_rate=[0.0] * stages,
        drop_rate=[0.0] * stages, drop_path_rate=[0.0] * stages, qkv_bias=each["qkv_bias"],
        cls_token=[False] * (stages - 1) + [True], qkv_projection_method=each["qkv_proj_method"],
        kernel_qkv=each["kernel_qkv"], padding_kv=each["padding_kv"], stride_kv=each["stride_kv"],
        padding_q=each["padding_q"], stride_q=each["stride_q"], num_labels=cfg.num_classes)


def _match_numerics(hf: nn.Module, cfg) -> None:
    """transformers hard-codes nn.GELU, eps 1e-5 and the full-width scale; a vitkit model with other numerics (the
    official QuickGELU) gets its twin's activation modules, LayerNorm eps and scales set to the same function."""
    from transformers.models.cvt.modeling_cvt import CvtIntermediate, CvtSelfAttention
    from vitkit.layers import make_act
    for m in hf.modules():
        if isinstance(m, CvtIntermediate) and cfg.act_layer != "gelu":
            m.activation = make_act(cfg.act_layer)
        elif isinstance(m, nn.LayerNorm):
            m.eps = cfg.norm_eps
        elif isinstance(m, CvtSelfAttention) and cfg.attn_scale == "head_dim":
            m.scale = (m.embed_dim // m.num_heads) ** -0.5


def to_transformers(model: nn.Module) -> nn.Module:
    """``CvtForImageClassification`` holding a vitkit CvT's weights, written through the inverse of the table that reads
    transformers files, computing the vitkit model's function; eval mode, same device and dtype."""
    from transformers import CvtForImageClassification
    hf = write_twin(model, CvtForImageClassification(transformers_config(model)), HF, LAYOUT.bases[0], _TOP)
    _match_numerics(hf, model.cfg)
    return hf


HF_FORMAT = SourceFormat("hf", LAYOUT.detect, _convert_hf, hf_hints, infer=hf_infer, twin=to_transformers,
                         description="transformers CvtForImageClassification folder, Hub file or state dict")

FORMATS = (HF_FORMAT, OFFICIAL_FORMAT)  # most specific signature first
