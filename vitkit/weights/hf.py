"""Hugging Face ``transformers`` checkpoints → vitkit, for ViT and DeiT.

Two layouts exist. Files on the Hub (and what ``save_pretrained`` writes, even in 5.x) use the 4.x names
(``vit.encoder.layer.{i}.attention.attention.query.weight``); a 5.x model's in-memory ``state_dict()`` uses
``vit.layers.{i}.attention.q_proj.weight`` (transformers/conversion_mapping.py). Both are mapped here; separate
q/k/v projections are concatenated into vitkit's fused qkv in (q, k, v) order, as timm's converter splits them.
The folder's ``config.json`` defines the architecture, so it supplies config hints (width, depth, heads, MLP size,
LayerNorm epsilon — transformers defaults to 1e-12 — and the activation).
"""
from __future__ import annotations

import re

import torch
from torch import Tensor

from vitkit.weights.report import CheckpointError, LoadReport

__all__ = ["CONVERTERS", "config_hints", "looks_like_hf", "class_names"]

# 4.x and 5.x per-block names → vitkit names; (q, k, v) pieces are gathered separately
_BLOCK = [
    (r"(?:encoder\.layer|layers)\.(\d+)\.layernorm_before\.", r"blocks.\1.norm1."),
    (r"(?:encoder\.layer|layers)\.(\d+)\.layernorm_after\.", r"blocks.\1.norm2."),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),
    (r"layers\.(\d+)\.attention\.o_proj\.", r"blocks.\1.attn.proj."),
    (r"encoder\.layer\.(\d+)\.intermediate\.dense\.", r"blocks.\1.mlp.fc1."),
    (r"encoder\.layer\.(\d+)\.output\.dense\.", r"blocks.\1.mlp.fc2."),
    (r"layers\.(\d+)\.mlp\.fc([12])\.", r"blocks.\1.mlp.fc\2."),
]
_QKV = re.compile(r"(?:encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)|"
                  r"layers\.(\d+)\.attention\.([qkv])_proj)\.(weight|bias)$")
_FIXED = {
    "embeddings.cls_token": "cls_token",
    "embeddings.distillation_token": "dist_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
    "pooler.dense.weight": "pre_logits.fc.weight",
    "pooler.dense.bias": "pre_logits.fc.bias",
}
_HEADS = {"classifier": "head", "cls_classifier": "head", "distillation_classifier": "head_dist"}
_BASES = ("vit.", "deit.")


def looks_like_hf(keys) -> bool:
    return any(k.split(".", 1)[-1].startswith("embeddings.patch_embeddings") or k.startswith("embeddings.patch")
               for k in keys)


def _strip_base(key: str) -> str:
    for base in _BASES:
        if key.startswith(base):
            return key[len(base):]
    return key


def vit_from_hf(state: dict[str, Tensor], report: LoadReport) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, Tensor]] = {}
    for key, v in state.items():
        k = _strip_base(key)
        head = k.rsplit(".", 1)[0]
        if k in _FIXED:
            out[_FIXED[k]] = v
        elif head in _HEADS:
            out[f"{_HEADS[head]}.{k.rsplit('.', 1)[1]}"] = v
        elif m := _QKV.match(k):
            i = int(m.group(1) or m.group(3))
            part = (m.group(2) or m.group(4))[0]  # q | k | v
            qkv.setdefault((i, m.group(5)), {})[part] = v
        elif k == "embeddings.mask_token":
            report.ignored.append(f"{key}: masked-image-modelling token, not used for classification")
            continue
        else:
            for pattern, rep in _BLOCK:
                new, n = re.subn(pattern, rep, k)
                if n:
                    out[new] = v
                    break
            else:
                raise CheckpointError(f"{report.source}: unknown transformers key {key!r} {list(v.shape)}")
        report.converted += 1
    for (i, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointError(f"{report.source}: block {i} has {sorted(parts)} of q/k/v {kind}")
        out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


_ACT = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
        "quick_gelu": "quick_gelu"}


def vit_hints(config: dict | None, state: dict[str, Tensor]) -> dict:
    """Architecture from config.json (when there is one); head, pooler and distillation head from the tensors."""
    hints: dict = {}
    if config:
        act = config.get("hidden_act", "gelu")
        if act not in _ACT or _ACT[act] not in ("gelu", "gelu_tanh"):
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
    if pooler is not None:  # ViTModel's pooler (dense + tanh on the class token) = the paper's pre-logits layer
        hints["representation_size"] = int(pooler.shape[0])
    return hints


def class_names(config: dict | None) -> list[str] | None:
    """id2label as a list, unless it holds only transformers' placeholder names (LABEL_0, …)."""
    labels = (config or {}).get("id2label")
    if not labels:
        return None
    names = [labels[str(i)] if str(i) in labels else labels.get(i) for i in range(len(labels))]
    if any(n is None for n in names) or all(re.fullmatch(r"LABEL_\d+", n) for n in names):
        return None
    return names


CONVERTERS = {"vit": vit_from_hf, "deit": vit_from_hf}
HINTS = {"vit": vit_hints, "deit": vit_hints}
MODEL_TYPES = {"vit": "vit", "deit": "deit"}  # transformers model_type → vitkit family


def config_hints(family: str, config: dict | None, state: dict[str, Tensor]) -> dict:
    hint = HINTS.get(family)
    return hint(config, {k: v for k, v in state.items()}) if hint else {}
