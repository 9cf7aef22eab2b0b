"""Checkpoint formats of MobileViT v1: the official ml-cvnets release files, timm's port, and transformers'
``MobileViTForImageClassification`` (plus the transformers twin built from the inverse of the same table).

vitkit's MobileViT uses timm's module names (timm builds it on ``byobnet.py``: ``stem``, ``stages.{i}.{j}``
``conv1_1x1 / conv2_kxk / conv3_1x1`` for inverted residuals, ``conv_kxk / conv_1x1 / transformer / norm / conv_proj /
conv_fusion`` for MobileViT blocks, ``final_conv``), so timm files need only the head rename. The official release
files (``mobilevit_{xxs,xs,s}.pt``, ``torch.save(model.state_dict())``) use ml-cvnets' ``ConvLayer`` (``block.conv``,
``block.norm``) and ``TransformerEncoder`` (``pre_norm_mha`` / ``pre_norm_ffn`` Sequentials) names; transformers'
use ``convolution`` / ``normalization`` and separate query / key / value. transformers 5.x keeps MobileViT's 4.x names
(it has no entry in ``conversion_mapping.py``), so one table reads both.

Each format also says what its weights expect as input (``SourceFormat.data_cfg``): the official and transformers
weights were trained on BGR pixels in [0, 1] (CVNets v0.1 read images with OpenCV; transformers'
``MobileViTImageProcessor`` flips RGB to BGR for them); timm evaluates its port with timm's pipeline, RGB pixels in
[0, 1] (``default_cfgs``: mean 0, std 1, bicubic, crop_pct 0.9, 256 px), which is how timm measured its top-1
(68.94 / 74.62 / 78.30, results-imagenet.csv).
"""
from __future__ import annotations

import re
from typing import Any, Mapping

from torch import Tensor, nn

from vitkit.specs import CheckpointView, SourceFormat
from vitkit.weights.keymap import Fuse, KeyMap, Rename
from vitkit.weights.load_report import CheckpointError
from vitkit.weights.transformers_layout import TransformersLayout, head_hints, write_twin

__all__ = ["OFFICIAL", "TIMM", "HF", "LAYOUT", "FORMATS", "OFFICIAL_DATA_CFG", "TIMM_DATA_CFG", "to_official",
           "to_transformers", "transformers_config"]

# what the weights of each source expect (fields of vitkit.specs.PreprocessConfig)
OFFICIAL_DATA_CFG = dict(channel_order="BGR", mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), interpolation="bilinear",
                         crop_pct=256 / 288)
TIMM_DATA_CFG = dict(channel_order="RGB", mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), interpolation="bicubic",
                     crop_pct=0.9)

# the three convs of an inverted residual: official / transformers / vitkit (timm) names
_MV2 = (("exp_1x1", "expand_1x1", "conv1_1x1"), ("conv_3x3", "conv_3x3", "conv2_kxk"),
        ("red_1x1", "reduce_1x1", "conv3_1x1"))


# ----------------------------------------------------------------------------------------------------- official
def _official_conv(src: str, dst: str) -> list[Rename]:
    """An ml-cvnets ``ConvLayer`` (``block.conv`` + ``block.norm``) ↔ vitkit's ``ConvNormAct`` (``conv`` + ``bn``)."""
    return [Rename(f"{src}.block.conv.", f"{dst}.conv."), Rename(f"{src}.block.norm.", f"{dst}.bn.")]


_LAYER, _STAGE = "layer_{i+1}", "stages.{i}"  # official layer_1 … layer_5 = vitkit stages 0 … 4
_GLOBAL, _BLOCKS = _LAYER + ".1.global_rep.{k}.", _STAGE + ".1.transformer.{k}."
OFFICIAL = KeyMap([
    *_official_conv("conv_1", "stem"),
    *[r for off, _, ours in _MV2 for r in _official_conv(f"{_LAYER}.{{j}}.block.{off}", f"{_STAGE}.{{j}}.{ours}")],
    *_official_conv(_LAYER + ".1.local_rep.conv_3x3", _STAGE + ".1.conv_kxk"),
    Rename(_LAYER + ".1.local_rep.conv_1x1.block.conv.", _STAGE + ".1.conv_1x1."),
    Rename(_GLOBAL + "pre_norm_mha.0.", _BLOCKS + "norm1."),
    Rename(_GLOBAL + "pre_norm_mha.1.qkv_proj.", _BLOCKS + "attn.qkv."),  # fused, (q, k, v) order, as timm's
    Rename(_GLOBAL + "pre_norm_mha.1.out_proj.", _BLOCKS + "attn.proj."),
    Rename(_GLOBAL + "pre_norm_ffn.0.", _BLOCKS + "norm2."),
    Rename(_GLOBAL + "pre_norm_ffn.1.", _BLOCKS + "mlp.fc1."),
    Rename(_GLOBAL + "pre_norm_ffn.4.", _BLOCKS + "mlp.fc2."),
    Rename(_GLOBAL + "weight", _STAGE + ".1.norm.weight"),  # the LayerNorm after the last layer: global_rep.{depth}
    Rename(_GLOBAL + "bias", _STAGE + ".1.norm.bias"),
    *_official_conv(_LAYER + ".1.conv_proj", _STAGE + ".1.conv_proj"),
    *_official_conv(_LAYER + ".1.fusion", _STAGE + ".1.conv_fusion"),
    *_official_conv("conv_1x1_exp", "final_conv"),
    Rename("classifier.fc.", "head."),
], name="official MobileViT")

_FINAL_NORM = re.compile(r"^stages\.(\d+)\.1\.norm\.(weight|bias)$")


def to_official(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """vitkit state dict → the official key layout (``OFFICIAL`` inverted). The block's final LayerNorm is
    ``global_rep.{depth}``, an index the rename table cannot know, so it is placed here."""
    out = OFFICIAL.inverse({k: v for k, v in state.items() if not _FINAL_NORM.match(k)})
    for key, value in state.items():
        if m := _FINAL_NORM.match(key):
            stage = int(m.group(1))
            depth = len({k.split(".")[4] for k in state if k.startswith(f"stages.{stage}.1.transformer.")})
            out[f"layer_{stage + 1}.1.global_rep.{depth}.{m.group(2)}"] = value
    return out


def _looks_like_official(view: CheckpointView) -> bool:
    return view.has("conv_1.block.conv.weight") and view.any_startswith("layer_3.1.global_rep.")


def _head_hint(state: dict[str, Tensor], key: str) -> dict[str, Any]:
    """The head size; a file without a classifier (``MobileViTModel``) builds a headless model."""
    return {"num_classes": 0, **head_hints(state, key)}


def _infer_by_widths(widths: list[int]) -> tuple[str, dict[str, Any]] | None:
    """The registered variant whose layer1 … layer5 widths these are."""
    from vitkit.registry import get_spec, list_models
    return next(((name, {}) for name in list_models("mobilevit_*")
                 if list(get_spec(name).config.get("widths", ())) == widths), None)


def official_infer(view: CheckpointView) -> tuple[str, dict[str, Any]] | None:
    key = "layer_{}.0.block.red_1x1.block.conv.weight"
    if not _looks_like_official(view) or not all(key.format(i) in view.shapes for i in range(1, 6)):
        return None
    return _infer_by_widths([view.shapes[key.format(i)][0] for i in range(1, 6)])


OFFICIAL_FORMAT = SourceFormat(
    "official", _looks_like_official, OFFICIAL.forward, lambda state, config: _head_hint(state, "classifier.fc.weight"),
    infer=official_infer, data_cfg=OFFICIAL_DATA_CFG,
    description="apple/ml-cvnets release (mobilevit_{xxs,xs,s}.pt: bare state dict); BGR input in [0, 1]")

# --------------------------------------------------------------------------------------------------------- timm
TIMM = KeyMap([Rename("head.fc.", "head."), Rename("", "")], name="timm MobileViT")


def _looks_like_timm(view: CheckpointView) -> bool:
    return view.has("stem.conv.weight") and view.any_startswith("stages.2.1.transformer.0.attn.qkv.")


def timm_infer(view: CheckpointView) -> tuple[str, dict[str, Any]] | None:
    key = "stages.{}.0.conv3_1x1.conv.weight"
    if not _looks_like_timm(view) or not all(key.format(i) in view.shapes for i in range(5)):
        return None
    return _infer_by_widths([view.shapes[key.format(i)][0] for i in range(5)])


TIMM_FORMAT = SourceFormat(
    "timm", _looks_like_timm, TIMM.forward, lambda state, config: _head_hint(state, "head.fc.weight"),
    infer=timm_infer, data_cfg=TIMM_DATA_CFG,
    description="timm MobileViT (ByobNet) state dict; RGB input in [0, 1] as timm evaluates it")


# ------------------------------------------------------------------------------------------------ transformers
def _hf_conv(src: str, dst: str) -> list[Rename]:
    """transformers' ``MobileViTConvLayer`` (``convolution`` + ``normalization``) ↔ ``ConvNormAct``."""
    return [Rename(f"{src}.convolution.", f"{dst}.conv."), Rename(f"{src}.normalization.", f"{dst}.bn.")]


_HF_LAYER, _HF_BLOCKS = "encoder.layer.{i}", "encoder.layer.{i}.transformer.layer.{k}."
HF = KeyMap([
    *_hf_conv("conv_stem", "stem"),
    # layer1 and layer2 (MobileViTMobileNetLayer: .layer.{j}); written out per stage so that the inverse can tell
    # them from the stride-2 inverted residual that opens layer3-5 (downsampling_layer = vitkit block 0)
    *[r for s in (0, 1) for _, hf, ours in _MV2
      for r in _hf_conv(f"encoder.layer.{s}.layer.{{j}}.{hf}", f"stages.{s}.{{j}}.{ours}")],
    *[r for _, hf, ours in _MV2 for r in _hf_conv(f"{_HF_LAYER}.downsampling_layer.{hf}", f"{_STAGE}.0.{ours}")],
    *_hf_conv(_HF_LAYER + ".conv_kxk", _STAGE + ".1.conv_kxk"),
    Rename(_HF_LAYER + ".conv_1x1.convolution.", _STAGE + ".1.conv_1x1."),
    Rename(_HF_BLOCKS + "layernorm_before.", _BLOCKS + "norm1."),
    Fuse((_HF_BLOCKS + "attention.attention.query.", _HF_BLOCKS + "attention.attention.key.",
          _HF_BLOCKS + "attention.attention.value."), _BLOCKS + "attn.qkv."),
    Rename(_HF_BLOCKS + "attention.output.dense.", _BLOCKS + "attn.proj."),
    Rename(_HF_BLOCKS + "layernorm_after.", _BLOCKS + "norm2."),
    Rename(_HF_BLOCKS + "intermediate.dense.", _BLOCKS + "mlp.fc1."),
    Rename(_HF_BLOCKS + "output.dense.", _BLOCKS + "mlp.fc2."),
    Rename(_HF_LAYER + ".layernorm.", _STAGE + ".1.norm."),
    *_hf_conv(_HF_LAYER + ".conv_projection", _STAGE + ".1.conv_proj"),
    *_hf_conv(_HF_LAYER + ".fusion", _STAGE + ".1.conv_fusion"),
    *_hf_conv("conv_1x1_exp", "final_conv"),
    Rename("classifier.", "head."),
], name="transformers MobileViT")

# ``MobileViTForImageClassification`` keys carry the base prefix ``mobilevit.``; ``MobileViTModel`` files do not.
LAYOUT = TransformersLayout(
    "MobileViT", bases=("mobilevit.",), model_types=("mobilevit",), keymap=lambda keys: HF,
    signature=lambda keys: "conv_stem.convolution.weight" in keys and any(".attention.attention.query." in k
                                                                          for k in keys))


def hf_hints(state: dict[str, Tensor], config: Mapping[str, Any] | None) -> dict[str, Any]:
    """Architecture from config.json (when there is one), the head size from the tensors. Settings vitkit's model
    does not have (another activation, LayerNorm eps, output stride or final width) are refused, not ignored."""
    hints = _head_hint(state, "classifier.weight")
    if not config:
        return hints
    wrong = {k: config[k] for k, ok in (("hidden_act", "silu"), ("layer_norm_eps", 1e-5), ("output_stride", 32),
                                        ("qkv_bias", True)) if k in config and config[k] != ok}
    neck = list(config.get("neck_hidden_sizes", [16, 32, 64, 96, 128, 160, 640]))
    factor = neck[6] // neck[5]
    if factor * neck[5] != neck[6] or min(factor * neck[5], 960) != neck[6]:
        wrong["neck_hidden_sizes[6]"] = neck[6]
    if wrong:
        raise CheckpointError(f"transformers MobileViT config {wrong} cannot be built by vitkit's MobileViT "
                              f"(SiLU, LayerNorm eps 1e-5, output stride 32, qkv bias, final width k·C5 ≤ 960)")
    img = config.get("image_size", 256)
    return {**hints, "img_size": img if isinstance(img, int) else tuple(img), "in_chans": config.get("num_channels", 3),
            "stem_chs": neck[0], "widths": tuple(neck[1:6]), "last_layer_exp_factor": factor,
            "transformer_dims": tuple(config.get("hidden_sizes", [144, 192, 240])),
            "num_heads": config.get("num_attention_heads", 4), "mlp_ratio": float(config.get("mlp_ratio", 2.0)),
            "expand_ratio": float(config.get("expand_ratio", 4.0)), "patch_size": config.get("patch_size", 2),
            "kernel_size": config.get("conv_kernel_size", 3)}


def hf_infer(view: CheckpointView) -> tuple[str, dict[str, Any]] | None:
    """A transformers folder describes its architecture: the variant with its widths, at its image size."""
    config = view.config or {}
    if config.get("model_type") not in LAYOUT.model_types:
        return None
    found = _infer_by_widths(list(config.get("neck_hidden_sizes", []))[1:6])
    img = config.get("image_size", 256)
    return (found[0], {} if img == 256 else {"img_size": img}) if found else None


# ------------------------------------------------------------------------------------------- transformers twin
def transformers_config(model: nn.Module):
    """A transformers ``MobileViTConfig`` with the dimensions of a vitkit MobileViT. transformers builds layer1 with
    1 and layer2 with 3 inverted residuals and layer3-5 with 2 / 4 / 3 transformer layers; other depths are refused
    rather than silently different."""
    from transformers import MobileViTConfig
    cfg = model.cfg
    if tuple(cfg.mv2_depths) != (1, 3) or tuple(cfg.transformer_depths) != (2, 4, 3):
        raise ValueError(f"transformers' MobileViT has fixed depths (mv2_depths (1, 3), transformer_depths (2, 4, 3)); "
                         f"this model has {tuple(cfg.mv2_depths)} and {tuple(cfg.transformer_depths)}")
    h, w = cfg.img_size if isinstance(cfg.img_size, tuple) else (cfg.img_size, cfg.img_size)
    return MobileViTConfig(
        num_channels=cfg.in_chans, image_size=max(h, w), patch_size=cfg.patch_size,
        hidden_sizes=list(cfg.transformer_dims), neck_hidden_sizes=[cfg.stem_chs, *cfg.widths, cfg.num_features],
        num_attention_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, expand_ratio=cfg.expand_ratio, hidden_act="silu",
        conv_kernel_size=cfg.kernel_size, output_stride=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        classifier_dropout_prob=0.0, qkv_bias=True, layer_norm_eps=1e-5, num_labels=cfg.num_classes)


def to_transformers(model: nn.Module) -> nn.Module:
    """``MobileViTForImageClassification`` holding a vitkit MobileViT's weights, written through the inverse of the
    table that reads transformers files; eval mode, same device and dtype."""
    from transformers import MobileViTForImageClassification
    return write_twin(model, MobileViTForImageClassification(transformers_config(model)), HF, LAYOUT.bases[0])


HF_FORMAT = SourceFormat("hf", LAYOUT.detect, LAYOUT.convert, hf_hints, infer=hf_infer, twin=to_transformers,
                         data_cfg=OFFICIAL_DATA_CFG,
                         description="transformers MobileViT folder or state dict (4.x and 5.x: same names); BGR "
                                     "input in [0, 1]")

# Detection order: the most specific signature first.
FORMATS = (HF_FORMAT, OFFICIAL_FORMAT, TIMM_FORMAT)
