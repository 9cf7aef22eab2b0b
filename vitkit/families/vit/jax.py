"""The ViT family's original format: JAX/Flax ``.npz`` checkpoints (google-research/vision_transformer, big_vision) → vitkit.

Layouts handled:
- release files with pre-linen module numbering (``LayerNorm_0``, ``MultiHeadDotProductAttention_1``, ``LayerNorm_2``,
  ``MlpBlock_3``) and files written by current vit_jax (linen: ``…_0``, ``…_0``, ``LayerNorm_1``, ``MlpBlock_0``),
  which ``vit_jax.checkpoint.convert_pre_linen`` maps onto each other;
- the AugReg ``opt/target/`` prefix and big_vision's ``params/`` prefix with a scanned (stacked) ``encoderblock``;
- an optional ``pre_logits`` representation layer (tanh), and ``gap`` / ``unpooled`` models without a class token;
- no position embedding (``transformer.add_position_embedding=False``);
- the hybrids' ResNet (``conv_root``, ``gn_root``, ``block{s}/unit{u}/…``; ``_RESNET_UNIT``), GroupNorm parameters
  shaped (C,) or, as files of flax < 0.3.6 store them, (1, 1, 1, C) (``vit_jax/checkpoint.py`` ``_fix_groupnorm``).
Kernels: conv HWIO → OIHW, Dense (in, out) → (out, in), attention DenseGeneral (D, heads, head_dim) → (heads·head_dim, D).
The JAX MLP used flax's tanh-approximate GELU, so these weights come with the hint ``act_layer='gelu_tanh'``.
"""
from __future__ import annotations

import math
import re

import numpy as np
import torch
from torch import Tensor

from vitkit.specs import CheckpointView, SourceFormat
from vitkit.weights.load_report import CheckpointError, LoadReport

__all__ = ["JAX_FORMAT", "vit_from_jax", "jax_hints", "looks_like_jax"]

_PRE_LINEN = {"LayerNorm_0": "norm1", "MultiHeadDotProductAttention_1": "attn", "LayerNorm_2": "norm2",
              "MlpBlock_3": "mlp"}
_LINEN = {"LayerNorm_0": "norm1", "MultiHeadDotProductAttention_0": "attn", "LayerNorm_1": "norm2",
          "MlpBlock_0": "mlp"}


def looks_like_jax(view: CheckpointView) -> bool:
    return view.kind == "npz" or any("embedding/kernel" in k or "Transformer/" in k for k in view.keys)


def _t(a: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))


def _strip(params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for k, v in params.items():
        for prefix in ("opt/target/", "params/"):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def _unscan(params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """big_vision's scanned encoder stacks every block along axis 0 under ``Transformer/encoderblock/``."""
    scanned = {k: v for k, v in params.items() if k.startswith("Transformer/encoderblock/")}
    if not scanned:
        return params
    out = {k: v for k, v in params.items() if k not in scanned}
    for k, v in scanned.items():
        rest = k[len("Transformer/encoderblock/"):]
        for i in range(v.shape[0]):
            out[f"Transformer/encoderblock_{i}/{rest}"] = v[i]
    return out


def _dense(prefix: str, kernel: np.ndarray, bias: np.ndarray) -> dict[str, Tensor]:
    return {f"{prefix}.weight": _t(kernel.T), f"{prefix}.bias": _t(bias)}


def _attention(prefix: str, p: dict[str, np.ndarray], src: str) -> dict[str, Tensor]:
    """Flax DenseGeneral q/k/v (D, h, d) → fused (3·h·d, D); out (h, d, D) → (D, h·d)."""
    D = p[f"{src}/query/kernel"].shape[0]
    w = [p[f"{src}/{n}/kernel"].reshape(D, -1).T for n in ("query", "key", "value")]
    b = [p[f"{src}/{n}/bias"].reshape(-1) for n in ("query", "key", "value")]
    out_k = p[f"{src}/out/kernel"]
    out_k = out_k.reshape(-1, out_k.shape[-1]).T  # (D, h·d)
    return {f"{prefix}.qkv.weight": _t(np.concatenate(w, 0)), f"{prefix}.qkv.bias": _t(np.concatenate(b, 0)),
            f"{prefix}.proj.weight": _t(out_k), f"{prefix}.proj.bias": _t(p[f"{src}/out/bias"])}


def _block(i: int, p: dict[str, np.ndarray], names: dict[str, str]) -> dict[str, Tensor]:
    src = f"Transformer/encoderblock_{i}"
    inv = {v: k for k, v in names.items()}
    out = {}
    for norm in ("norm1", "norm2"):
        out[f"blocks.{i}.{norm}.weight"] = _t(p[f"{src}/{inv[norm]}/scale"])
        out[f"blocks.{i}.{norm}.bias"] = _t(p[f"{src}/{inv[norm]}/bias"])
    out.update(_attention(f"blocks.{i}.attn", p, f"{src}/{inv['attn']}"))
    mlp = f"{src}/{inv['mlp']}"
    out.update(_dense(f"blocks.{i}.mlp.fc1", p[f"{mlp}/Dense_0/kernel"], p[f"{mlp}/Dense_0/bias"]))
    out.update(_dense(f"blocks.{i}.mlp.fc2", p[f"{mlp}/Dense_1/kernel"], p[f"{mlp}/Dense_1/bias"]))
    return out


def _naming(p: dict[str, np.ndarray]) -> dict[str, str]:
    return _PRE_LINEN if any("MultiHeadDotProductAttention_1" in k for k in p) else _LINEN


def _pos_embedding(p: dict[str, np.ndarray], report: LoadReport) -> np.ndarray | None:
    """(1, prefix + N, D), covering the class token as vitkit's (and vit_jax's) position embedding does.

    vit_jax adds ``Transformer/posembed_input/pos_embedding`` after prepending the class token, so it has a class row.
    big_vision (``params/pos_embedding``) adds it to the patches and concatenates the class token afterwards
    (big_vision/models/vit.py: "Add posemb before adding extra token"): the class token gets a zero row. Its
    ``fix_old_checkpoints`` treats a length of side² + 1 as an old combined cls + patches embedding; so do we.
    """
    key = _pos_key(p)
    if key is None:
        report.notes.append("no position embedding in this JAX checkpoint (vit_jax transformer.add_position_embedding="
                            "False)")
        return None
    pos = p[key]
    if key == "Transformer/posembed_input/pos_embedding" or "cls" not in p:
        return pos
    n = pos.shape[1]
    side = math.isqrt(n - 1) if n > 1 else 0
    if side * side + 1 == n:
        return pos
    report.notes.append(f"{key} covers the patches only (big_vision adds it before concatenating the class token): "
                        f"a zero row was prepended for the class token")
    return np.concatenate([np.zeros_like(pos[:, :1]), pos], axis=1)


def _pos_key(p: dict[str, np.ndarray]) -> str | None:
    return next((k for k in ("Transformer/posembed_input/pos_embedding", "Transformer/pos_embedding", "pos_embedding")
                 if k in p), None)


# The hybrid's ResNet (vit_jax models_vit.py root block, models_resnet.py ResidualUnit@c6de1e5) → vitkit (timm's names):
# block{s}/unit{u}/<jax> → patch_embed.backbone.stages.{s-1}.blocks.{u-1}.<vitkit>.
_RESNET_ROOT = {"conv_root/kernel": "patch_embed.backbone.stem.conv.weight",
                "gn_root/scale": "patch_embed.backbone.stem.norm.weight",
                "gn_root/bias": "patch_embed.backbone.stem.norm.bias"}
_RESNET_UNIT = {"conv1/kernel": "conv1.weight", "conv2/kernel": "conv2.weight", "conv3/kernel": "conv3.weight",
                "conv_proj/kernel": "downsample.conv.weight", "gn1/scale": "norm1.weight", "gn1/bias": "norm1.bias",
                "gn2/scale": "norm2.weight", "gn2/bias": "norm2.bias", "gn3/scale": "norm3.weight",
                "gn3/bias": "norm3.bias", "gn_proj/scale": "downsample.norm.weight",
                "gn_proj/bias": "downsample.norm.bias"}
_UNIT_KEY = re.compile(r"block(\d+)/unit(\d+)/(.+)$")


def _resnet_tensor(name: str, array: np.ndarray) -> Tensor:
    """A conv kernel HWIO → OIHW; a GroupNorm scale or bias (C,) or (1, 1, 1, C) → (C,)."""
    return _t(array.transpose(3, 2, 0, 1)) if name.endswith("kernel") else _t(array.reshape(-1))


def _resnet(p: dict[str, np.ndarray]) -> dict[str, Tensor]:
    """The hybrid's root block and stages, by the tables above; empty for a plain ViT."""
    out = {dst: _resnet_tensor(src, p[src]) for src, dst in _RESNET_ROOT.items() if src in p}
    for key, array in p.items():
        if m := _UNIT_KEY.match(key):
            stage, unit, rest = int(m[1]) - 1, int(m[2]) - 1, m[3]
            if rest not in _RESNET_UNIT:
                raise CheckpointError(f"{key}: not a parameter of vit_jax's ResidualUnit")
            out[f"patch_embed.backbone.stages.{stage}.blocks.{unit}.{_RESNET_UNIT[rest]}"] = _resnet_tensor(rest, array)
    return out


def _resnet_hints(p: dict[str, np.ndarray]) -> dict:
    """vit_jax ``config.resnet`` read off a hybrid file: units per stage, width = root channels / 64."""
    if "conv_root/kernel" not in p:
        return {}
    units: dict[int, int] = {}
    for key in p:
        if m := _UNIT_KEY.match(key):
            units[int(m[1])] = max(units.get(int(m[1]), 0), int(m[2]))
    width = p["conv_root/kernel"].shape[-1] / 64
    return {"resnet": dict(num_layers=tuple(units[s] for s in sorted(units)), width_factor=width, gn_eps=1e-6,
                           ws_eps=1e-5, ws_eps_in_sqrt=False)}


def _origin(params: dict[str, np.ndarray]) -> str:
    """The code that wrote the file: big_vision (``params/`` prefix, or a scanned encoder) or vit_jax (release files,
    AugReg's ``opt/target/``, current vit_jax). Each resizes position embeddings with its own function."""
    scanned = any(k.startswith(("params/", "Transformer/encoderblock/")) for k in params)
    return "big_vision" if scanned else "vit_jax"


def vit_from_jax(params: dict[str, np.ndarray], report: LoadReport) -> dict[str, Tensor]:
    report.origin = _origin(params)
    p = _unscan(_strip(params))
    if any(k.startswith("MAPHead") for k in p):
        raise CheckpointError(f"{report.source}: attention-pool (MAPHead) checkpoints are not supported")
    depth = len({m.group(1) for k in p if (m := re.match(r"Transformer/encoderblock_(\d+)/", k))})
    names = _naming(p)
    report.notes.append(f"JAX module numbering: {'pre-linen' if names is _PRE_LINEN else 'linen'}")
    kernel = p["embedding/kernel"]  # (P, P, C, D) HWIO
    out = {"patch_embed.proj.weight": _t(kernel.transpose(3, 2, 0, 1)), "patch_embed.proj.bias": _t(p["embedding/bias"]),
           "norm.weight": _t(p["Transformer/encoder_norm/scale"]), "norm.bias": _t(p["Transformer/encoder_norm/bias"])}
    pos = _pos_embedding(p, report)
    if pos is not None:
        out["pos_embed"] = _t(pos)
    out.update(_resnet(p))
    if "cls" in p:
        out["cls_token"] = _t(p["cls"])
    for i in range(depth):
        out.update(_block(i, p, names))
    if "pre_logits/kernel" in p:
        out.update(_dense("pre_logits.fc", p["pre_logits/kernel"], p["pre_logits/bias"]))
    if "head/kernel" in p:
        out.update(_dense("head", p["head/kernel"], p["head/bias"]))
    report.converted += len(out)
    return out


def jax_hints(params: dict[str, np.ndarray], config=None) -> dict:
    p = _unscan(_strip(params))
    D = p["embedding/kernel"].shape[-1]
    inv = {v: k for k, v in _naming(p).items()}
    q = p[f"Transformer/encoderblock_0/{inv['attn']}/query/kernel"]  # (D, h, d)
    mlp = p[f"Transformer/encoderblock_0/{inv['mlp']}/Dense_0/kernel"]  # (D, mlp_dim)
    hints = dict(act_layer="gelu_tanh", norm_eps=1e-6, embed_dim=int(D), num_heads=int(q.shape[1]),
                 depth=len({m.group(1) for k in p if (m := re.match(r"Transformer/encoderblock_(\d+)/", k))}),
                 mlp_ratio=mlp.shape[1] / D, patch_size=int(p["embedding/kernel"].shape[0]))
    if "head/kernel" in p:
        hints["num_classes"] = int(p["head/kernel"].shape[1])
    if "pre_logits/kernel" in p:
        hints["representation_size"] = int(p["pre_logits/kernel"].shape[1])
    if "cls" not in p:
        hints.update(class_token=False, global_pool="avg", fc_norm=False)
    if _pos_key(p) is None:
        hints["add_position_embedding"] = False
    return {**hints, **_resnet_hints(p)}


def jax_infer(view: CheckpointView) -> tuple[str, dict] | None:
    """A JAX file describes its architecture: the registered ViT nearest to its width and patch, at its image size."""
    if not looks_like_jax(view):
        return None
    from vitkit.families.vit.formats import _registered_hybrid, _registered_name
    shapes = {k.removeprefix("opt/target/").removeprefix("params/"): s for k, s in view.shapes.items()}
    P, D = shapes["embedding/kernel"][0], shapes["embedding/kernel"][-1]
    stages = {m[1] for k in shapes if (m := _UNIT_KEY.match(k))}
    stride = 2 ** (2 + max(len(stages) - 1, 0)) if "conv_root/kernel" in shapes else 1  # the hybrid's ResNet
    pos = next((s for k, s in shapes.items() if k.endswith("pos_embedding")), None)
    n = pos[1] if pos else 0
    if "cls" in shapes and n > 1 and math.isqrt(n - 1) ** 2 == n - 1:
        n -= 1  # the position embedding has a class-token row
    side = math.isqrt(n)
    img = side * P * stride if side * side == n and n else None
    if stride > 1:
        return _registered_hybrid(D, img or 224), ({"img_size": img} if img else {})
    return _registered_name("vit", D, P, img or 224), ({"img_size": img} if img else {})


JAX_FORMAT = SourceFormat("jax", looks_like_jax, vit_from_jax, jax_hints, infer=jax_infer,
                          description="google-research/vision_transformer / big_vision .npz (pre-linen and linen "
                                      "numbering, opt/target and params prefixes, scanned encoders, ResNet hybrids)")
