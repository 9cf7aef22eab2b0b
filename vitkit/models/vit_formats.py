"""Checkpoint formats of the ViT and DeiT families: timm, the official DeiT release files, transformers (4.x and 5.x
layouts, and the transformers twin built from the same tables), and the catalog of named public weights. The original
JAX ``.npz`` files are read by ``vitkit.models.vit_jax``.

vitkit's ViT/DeiT use timm's module names, so timm files and the official DeiT release files (timm's
``VisionTransformer`` inside ``{'model': state_dict}``, facebookresearch/deit ``models.py``) need only the renames of
older layer-scale names.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

from torch import Tensor, nn

from vitkit.specs import CheckpointView, ResizeRule, SourceFormat, WeightSpec
from vitkit.weights.keymap import Drop, Fuse, KeyMap, Rename
from vitkit.weights.report import CheckpointError

__all__ = ["VIT_FORMATS", "DEIT_FORMATS", "VIT_RESIZE", "DEIT_RESIZE", "RESIZE_CHOICES", "WEIGHTS", "to_transformers",
           "transformers_config"]

# ------------------------------------------------------------------------------------------- timm and official
TIMM = KeyMap([
    Rename("blocks.{i}.gamma_1", "blocks.{i}.ls1.gamma"),  # DeiT-III / older timm layer-scale names
    Rename("blocks.{i}.gamma_2", "blocks.{i}.ls2.gamma"),
    Rename("", ""),  # everything else: timm's names are vitkit's
], name="timm ViT")


def _looks_like_timm_vit(view: CheckpointView) -> bool:
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
    return hints


TIMM_FORMAT = SourceFormat("timm", _looks_like_timm_vit, TIMM.forward, timm_hints,
                           description="timm VisionTransformer state dict (bare, or in any release container)")
DEIT_OFFICIAL_FORMAT = SourceFormat(
    "official", lambda v: v.container == "model" and _looks_like_timm_vit(v), TIMM.forward, timm_hints,
    description="facebookresearch/deit release: timm's names inside {'model': state_dict}")

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


_BASES = ("vit.", "deit.")


def _strip_base(key: str) -> str:
    return key[len(key.split(".", 1)[0]) + 1:] if key.startswith(_BASES) else key


def from_hf(state: dict[str, Tensor], report) -> dict[str, Tensor]:
    """transformers ViT/DeiT (either layout, with or without the ``vit.``/``deit.`` base prefix) → vitkit."""
    state = {_strip_base(k): v for k, v in state.items()}
    layout = "4" if any(k.startswith("encoder.layer.") for k in state) else "5"
    return hf_keymap(layout, "cls_classifier.weight" in state).forward(state, report)


def _looks_like_hf(view: CheckpointView) -> bool:
    if view.model_type is not None:
        return view.model_type in ("vit", "deit")
    return any(_strip_base(k).startswith("embeddings.patch_embeddings.") for k in view.keys)


_ACT = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh"}


def hf_hints(state: dict[str, Tensor], config: Mapping[str, Any] | None) -> dict[str, Any]:
    """Architecture from config.json (when there is one); head, pooler and distillation head from the tensors."""
    hints: dict[str, Any] = {}
    if config:
        act = config.get("hidden_act", "gelu")
        if act not in _ACT:
            raise CheckpointError(f"transformers hidden_act {act!r} is not supported for ViT")
        D = config.get("hidden_size", 768)
        hints = dict(embed_dim=D, depth=config.get("num_hidden_layers", 12),
                     num_heads=config.get("num_attention_heads", 12),
                     mlp_ratio=config.get("intermediate_size", 4 * D) / D, patch_size=config.get("patch_size", 16),
                     in_chans=config.get("num_channels", 3), qkv_bias=config.get("qkv_bias", True),
                     norm_eps=float(config.get("layer_norm_eps", 1e-12)), act_layer=_ACT[act])
    head = state.get("classifier.weight", state.get("cls_classifier.weight"))
    if head is not None:
        hints["num_classes"] = int(head.shape[0])
    if any(k.endswith("embeddings.distillation_token") for k in state) and "cls_classifier.weight" not in state:
        hints["dist_head"] = False  # DeiTForImageClassification / DeiTModel: no head on the distillation token
    pooler = next((v for k, v in state.items() if _strip_base(k) == "pooler.dense.weight"), None)
    if pooler is not None:
        hints["representation_size"] = int(pooler.shape[0])
    return hints


def _registered_name(family: str, width: int, patch: int, img: int) -> str:
    """The registered variant closest to (width, patch, image size): nearest width, then patch, then image size. The
    exact values reach the model as config hints and overrides."""
    from vitkit.registry import get_spec, list_models
    pattern = "vit_*" if family == "vit" else "deit_*_distilled_*"  # transformers' DeiTs all have a dist token
    specs = [(name, get_spec(name).config) for name in list_models(pattern)]
    nearest = min({cfg["embed_dim"] for _, cfg in specs}, key=lambda w: abs(w - width))
    return min((abs(cfg["patch_size"] - patch), abs(cfg["img_size"] - img), name)
               for name, cfg in specs if cfg["embed_dim"] == nearest)[-1]


def hf_infer(view: CheckpointView) -> tuple[str, dict[str, Any]] | None:
    """A transformers folder describes its architecture: a registered name of its family plus its image size."""
    config = view.config or {}
    if config.get("model_type") not in ("vit", "deit"):
        return None
    img = config.get("image_size", 224)
    img = img if isinstance(img, int) else (int(img[0]), int(img[1]))  # transformers accepts (H, W) too
    name = _registered_name(config["model_type"], config.get("hidden_size", 768), config.get("patch_size", 16),
                            img if isinstance(img, int) else max(img))
    return name, {"img_size": img}


# ------------------------------------------------------------------------------------------- transformers twin
_TWIN_ACT = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}


def _is_distilled(model: nn.Module) -> bool:
    return getattr(model, "num_dist_tokens", 0) > 0


def transformers_config(model: nn.Module):
    """A transformers ``ViTConfig`` / ``DeiTConfig`` with the dimensions of a vitkit ViT/DeiT. transformers' ViT has no
    GAP pooling, fc_norm, pre-logits layer or LayerScale: those are refused rather than silently different."""
    from transformers import DeiTConfig, ViTConfig
    cfg = model.cfg
    unsupported = {"global_pool": cfg.global_pool != "token", "class_token": not cfg.class_token,
                   "fc_norm": bool(cfg.fc_norm), "representation_size": bool(cfg.representation_size),
                   "init_values": bool(cfg.init_values), "act_layer": cfg.act_layer not in _TWIN_ACT,
                   "dist_head": _is_distilled(model) and not cfg.dist_head}
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise ValueError(f"transformers' ViT cannot express {', '.join(f'{k}={getattr(cfg, k)!r}' for k in bad)}")
    config_cls = DeiTConfig if _is_distilled(model) else ViTConfig
    return config_cls(
        hidden_size=cfg.embed_dim, num_hidden_layers=cfg.depth, num_attention_heads=cfg.num_heads,
        intermediate_size=model.blocks[0].mlp.fc1.out_features, hidden_act=_TWIN_ACT[cfg.act_layer],
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
    base = hf.base_model_prefix + "."
    layout = "4" if any(".encoder.layer." in k for k in hf.state_dict()) else "5"
    state = hf_keymap(layout, distilled).inverse({k: v.detach() for k, v in model.state_dict().items()})
    state = {(k if k.startswith(("classifier.", "cls_classifier.", "distillation_classifier.")) else base + k): v
             for k, v in state.items()}
    hf.load_state_dict(state, strict=True)
    p = next(model.parameters())
    return hf.to(device=p.device, dtype=p.dtype).eval()


HF_FORMAT = SourceFormat("hf", _looks_like_hf, from_hf, hf_hints, infer=hf_infer, twin=to_transformers,
                         description="transformers ViT/DeiT folder or state dict (4.x and 5.x key layouts)")

# ----------------------------------------------------------------------------------------------- named weights
# DeiT: facebookresearch/deit README_deit.md model zoo (official {'model': state_dict} files); their file names carry
# the sha256 prefix that torch.hub checks (-a1311bcf.pth), and vitkit checks the same prefix.
_DEIT_URL = "https://dl.fbaipublicfiles.com/deit/{}.pth"
_DEIT_FILES = {
    "deit_tiny_patch16_224": "deit_tiny_patch16_224-a1311bcf",  # 72.2 top-1 (README)
    "deit_small_patch16_224": "deit_small_patch16_224-cd65a155",  # 79.9
    "deit_base_patch16_224": "deit_base_patch16_224-b5f2ef4d",  # 81.8
    "deit_tiny_distilled_patch16_224": "deit_tiny_distilled_patch16_224-b40b3cf7",  # 74.5
    "deit_small_distilled_patch16_224": "deit_small_distilled_patch16_224-649709d9",  # 81.2
    "deit_base_distilled_patch16_224": "deit_base_distilled_patch16_224-df68dfff",  # 83.4
    "deit_base_patch16_384": "deit_base_patch16_384-8de9b5d1",  # 82.9
    "deit_base_distilled_patch16_384": "deit_base_distilled_patch16_384-d0272ac0",  # 85.2 (1000 epochs)
}
# ViT: timm's Hub repositories (timm/<variant>.<tag>, model.safetensors), verified by huggingface_hub. augreg = Steiner
# et al. 2021, fine-tuned on ImageNet-1k from ImageNet-21k; orig = the ViT paper's own ImageNet-21k weights. Tag →
# ImageNet-1k top-1 that timm measured (results-imagenet.csv).
_TIMM_VIT = {
    "vit_tiny_patch16_224": "augreg_in21k_ft_in1k",  # 75.45
    "vit_tiny_patch16_384": "augreg_in21k_ft_in1k",  # 78.44
    "vit_small_patch16_224": "augreg_in21k_ft_in1k",  # 81.40
    "vit_small_patch16_384": "augreg_in21k_ft_in1k",  # 83.81
    "vit_base_patch16_224": "augreg_in21k_ft_in1k",  # 84.53
    "vit_base_patch16_384": "augreg_in21k_ft_in1k",  # 86.01
    "vit_base_patch32_224": "augreg_in21k_ft_in1k",  # 80.73
    "vit_large_patch16_224": "augreg_in21k_ft_in1k",  # 85.86
    "vit_large_patch16_384": "augreg_in21k_ft_in1k",  # 87.10
    "vit_large_patch32_384": "orig_in21k_ft_in1k",  # 81.51
}
WEIGHTS: dict[str, WeightSpec] = {
    **{name: WeightSpec(url=_DEIT_URL.format(f), source_format="official", filename=f"{f}.pth",
                        notes="facebookresearch/deit release") for name, f in _DEIT_FILES.items()},
    **{name: WeightSpec(url=f"hf-hub:timm/{name}.{tag}", source_format="timm", filename="model.safetensors",
                        notes=f"timm port, tag {tag}") for name, tag in _TIMM_VIT.items()},
}


def _jax_format() -> SourceFormat:
    from vitkit.models.vit_jax import JAX_FORMAT
    return JAX_FORMAT


# Detection order: the most specific signature first.
VIT_FORMATS = (HF_FORMAT, _jax_format(), TIMM_FORMAT)
DEIT_FORMATS = (HF_FORMAT, DEIT_OFFICIAL_FORMAT, TIMM_FORMAT)

# ---------------------------------------------------------------------------------- resizing for another input size
# Each source is resized the way its own code does it; a source with no resize code of its own (timm's files, vitkit's
# folders) the way the family's official code does: ViT's is google-research/vision_transformer, DeiT's
# facebookresearch/deit. tests/test_pos_embed_resize.py checks every entry against that code's output.
_VIT_JAX = ResizeRule("zoom_linear", "google-research/vision_transformer vit_jax/checkpoint.py@c6de1e5 "
                                     "interpolate_posembed")
_DEIT = ResizeRule("bicubic", "facebookresearch/deit main.py@7e160fe (--finetune)")
_HF = "transformers 5.25.0 models/{}/modeling_{}.py interpolate_pos_encoding (at forward time)"
VIT_RESIZE = {
    "jax": _VIT_JAX,
    "jax/big_vision": ResizeRule("zoom_linear", "google-research/big_vision big_vision/models/vit.py@0127fb6 "
                                                "resample_posemb"),
    "timm": _VIT_JAX, "vitkit": _VIT_JAX,
    "hf": ResizeRule("bicubic", _HF.format("vit", "vit")),
}
DEIT_RESIZE = {"official": _DEIT, "timm": _DEIT, "vitkit": _DEIT,
               "hf": ResizeRule("bicubic", _HF.format("deit", "deit"))}
RESIZE_CHOICES = ("bicubic", "bicubic_antialias", "zoom_linear", "bilinear")  # pos_embed_resize= of a learned table


def square_grid(n: int) -> int | None:
    side = math.isqrt(n)
    return side if side * side == n else None
