"""Where did the model look? Attention maps, attention rollout, gradient-weighted relevance and Grad-CAM.

Every method returns an ``Explanation``: a (B, h, w) heat map on the model's token or feature grid (non-negative,
each map scaled to max 1), which ``upsample`` places on the image.

- ``attention``: the raw attention of every layer and head, read at the model's read-out (the class token's row;
  the mean over queries for models without one), recorded through ``vitkit.record_attention`` so the fused kernel is
  bypassed only here.
- ``rollout`` (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers", eq. for attention rollout): per
  layer Â = 0.5·mean_heads(A) + 0.5·I with rows renormalised, R = Â_L ··· Â_1, read at the read-out tokens.
- ``relevance`` (Chefer, Gur & Wolf, CVPR 2021, "Transformer Interpretability Beyond Attention Visualization", the
  gradient-weighted rule of their follow-up ICCV 2021 eq. 5-6): R = I; for each layer Ā = E_h[(∇A ⊙ A)⁺],
  R ← R + Ā·R; read at the read-out tokens, for the explained class.
- ``gradcam`` (Selvaraju et al. 2017): ReLU(Σ_c mean(∂y/∂F_c)·F_c) on the last feature map, for every family.

The read-out of a token model is ``model.readout_weights(features)``: (B, N) weights over the tokens the head reads
(the class token; DeiT's class and distillation tokens; the patch tokens for mean pooling; CCT's sequence-pooling
weights), so rollout and relevance follow what the classifier actually uses.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitkit.layers.attention import RecordsAttention, record_attention
from vitkit.families.contract import token_grid

__all__ = ["Explanation", "METHODS", "explain", "attention_maps", "rollout", "relevance", "gradcam", "upsample",
           "received_attention"]

METHODS = ("attention", "rollout", "relevance", "gradcam")


@dataclass
class Explanation:
    method: str
    heatmap: Tensor  # (B, h, w), >= 0, each map's maximum is 1
    targets: Tensor  # (B,) the explained class of each image
    layers: dict[str, Tensor] = field(default_factory=dict)  # attention: layer → (B, heads, h, w) maps
    notes: list[str] = field(default_factory=list)


def _normalise(maps: Tensor) -> Tensor:
    """Scale each (h, w) map of a (..., h, w) tensor to [0, max = 1] (all-zero maps stay zero)."""
    maps = maps.clamp(min=0)
    peak = maps.flatten(-2).amax(-1)[..., None, None]
    return torch.where(peak > 0, maps / peak.clamp(min=1e-12), maps)


def _readout(model: nn.Module, feats: Tensor) -> Tensor:
    weights = model.readout_weights(feats)
    if weights is None:
        raise ValueError(f"{type(model).__name__} has no token read-out (a hierarchical model): use --method "
                         f"attention or gradcam")
    return weights  # (B, N)


def _patch_part(model: nn.Module, rows: Tensor, image_hw: tuple[int, int]) -> Tensor:
    """(B, N) weights over all tokens → (B, h, w) over the patch tokens (prefix tokens dropped)."""
    patches = rows[:, model.num_prefix_tokens:]
    h, w = token_grid(patches.shape[1], image_hw)
    return patches.reshape(-1, h, w)  # (B, h, w)


def _targets(logits: Tensor, target: int | Tensor | None) -> Tensor:
    if target is None:
        return logits.argmax(-1)
    return torch.as_tensor(target, device=logits.device).expand(logits.shape[0]).clone()


def _token_layers(maps, tokens: int, batch: int) -> list[str]:
    """Attention layers over the model's own token sequence ((B, heads, N, N) with N = ``tokens``), in forward order
    (T2T-ViT's token-to-token layers, over the soft-split tokens, are left out)."""
    return [n for n, a in maps.items() if a.shape[-1] == a.shape[-2] == tokens and a.shape[0] == batch]


def received_attention(attn: Tensor, info: dict, batch: int) -> Tensor | None:
    """(B, heads, h, w): the attention each key position receives, averaged over the queries, on the layer's key
    grid, from what the layer recorded (its ``attn_layout`` and ``info``): window layers (``window``, Swin and DAT's
    local windows), reduced or strided keys (``kv_grid``, PVT, CvT; ``class_token`` keys first), or plain grids
    (``grid``; a layer that attends in ``groups_per_image`` separate groups of an image's positions, e.g. one per
    pixel offset of a patch, records B · groups maps: they are averaged per image). None when the layout says nothing
    about where its keys are."""
    if "window" in info and "padded_grid" in info:
        from vitkit.layers.window_attention import window_attention_to_grid
        return window_attention_to_grid(attn, info).mean(2)  # (B, h, H, W)
    grid = info.get("kv_grid") or info.get("grid")
    if grid is not None and attn.shape[0] == batch * info.get("groups_per_image", 0):
        attn = attn.reshape(batch, info["groups_per_image"], *attn.shape[1:]).mean(1)  # (B, heads, N, M)
    if grid is None or attn.shape[0] != batch:
        return None
    keys = attn.mean(-2)[..., int(bool(info.get("class_token", False))):]  # (B, h, M)
    if keys.shape[-1] != grid[0] * grid[1]:
        return None
    return keys.reshape(batch, attn.shape[1], *grid)


# ---------------------------------------------------------------------------------------------------- methods
def attention_maps(model: nn.Module, x: Tensor, target: int | None = None) -> Explanation:
    """Per layer and head: the attention the read-out paid to each patch (token models); for other layouts, the
    attention every position receives, averaged over queries, on the layer's own grid."""
    H, W = x.shape[-2:]
    with torch.no_grad(), record_attention(model) as maps:
        feats = model.forward_features(x)
        logits = model.forward_head(feats)
    readout = model.readout_weights(feats)
    layers: dict[str, Tensor] = {}
    own = set(_token_layers(maps, feats.shape[1], x.shape[0])) if readout is not None else set()
    for name, attn in maps.items():  # attn: (B', heads, N, M)
        if name in own:  # a token model's layer: what its read-out tokens attend to
            rows = torch.einsum("bn,bhnm->bhm", readout, attn)  # (B, heads, N)
            layers[name] = _normalise(torch.stack([_patch_part(model, rows[:, h], (H, W))
                                                   for h in range(rows.shape[1])], 1))
        elif (received := received_attention(attn, maps.info.get(name, {}), x.shape[0])) is not None:
            layers[name] = _normalise(received)
    if not layers:
        raise ValueError(f"no attention layer of {type(model).__name__} can be placed on the image")
    last = layers[list(layers)[-1]]
    return Explanation("attention", _normalise(last.mean(1)), _targets(logits, target), layers)


def rollout(model: nn.Module, x: Tensor, target: int | None = None, head_fusion: Literal["mean", "max", "min"] = "mean",
            discard_ratio: float = 0.0) -> Explanation:
    """Attention rollout (Abnar & Zuidema 2020): identity-mixed, row-normalised attention multiplied through the
    layers, read at the model's read-out tokens. ``discard_ratio`` drops that fraction of the smallest entries of each
    fused map first (jacobgil/vit-explain's option, applied to every image of the batch)."""
    H, W = x.shape[-2:]
    with torch.no_grad(), record_attention(model) as maps:
        feats = model.forward_features(x)
        logits = model.forward_head(feats)
    readout = _readout(model, feats)
    B, N = readout.shape
    R = torch.eye(N).expand(B, N, N).clone()
    for name in _token_layers(maps, N, B):
        A = {"mean": lambda a: a.mean(1), "max": lambda a: a.amax(1), "min": lambda a: a.amin(1)}[head_fusion](
            maps[name].float())  # (B, N, N)
        if discard_ratio > 0:
            k = int(A[0].numel() * discard_ratio)
            low = A.flatten(1).topk(k, dim=1, largest=False).indices
            A = A.flatten(1).scatter(1, low, 0.0).view_as(A)
        A = 0.5 * A + 0.5 * torch.eye(N)
        A = A / A.sum(-1, keepdim=True)
        R = A @ R
    rows = torch.einsum("bn,bnm->bm", readout, R)  # (B, N)
    return Explanation("rollout", _normalise(_patch_part(model, rows, (H, W))), _targets(logits, target))


def relevance(model: nn.Module, x: Tensor, target: int | Tensor | None = None) -> Explanation:
    """Gradient-weighted attention relevance (Chefer et al. 2021): R = I, R ← R + E_h[(∇A ⊙ A)⁺]·R per layer."""
    H, W = x.shape[-2:]
    with torch.enable_grad(), record_attention(model, detach=False) as maps:
        feats = model.forward_features(x)
        logits = model.forward_head(feats)
        targets = _targets(logits, target)
        attns = [maps[n] for n in _token_layers(maps, feats.shape[1], x.shape[0])]
        score = logits.gather(1, targets[:, None]).sum()
        grads = torch.autograd.grad(score, attns)
    readout = _readout(model, feats.detach())
    B, N = readout.shape
    R = torch.eye(N).expand(B, N, N).clone()
    for attn, grad in zip(attns, grads):
        A = (grad * attn).clamp(min=0).mean(1).detach()  # (B, N, N)
        R = R + A @ R
    rows = torch.einsum("bn,bnm->bm", readout, R)
    rows = rows - readout  # the identity's own contribution: the read-out tokens themselves
    return Explanation("relevance", _normalise(_patch_part(model, rows, (H, W))), targets)


def gradcam(model: nn.Module, x: Tensor, target: int | Tensor | None = None) -> Explanation:
    """Grad-CAM (Selvaraju et al. 2017) on the last feature map, through the family's ``feature_map``.

    When the head reads prefix tokens only (a class token: ViT, DeiT, T2T-ViT, CvT), the final spatial tokens get no
    gradient at all; the map is then taken at the tokens entering the last attention layer, pytorch-grad-cam's
    ``blocks[-1].norm1`` convention for ViT. ``notes`` says which was used."""
    H, W = x.shape[-2:]
    with torch.enable_grad():
        feats = model.forward_features(x)
        logits = model.forward_head(feats)
        targets = _targets(logits, target)
        score = logits.gather(1, targets[:, None]).sum()
        (grad,) = torch.autograd.grad(score, feats, retain_graph=True)
        source, note = feats, "the last feature map"
        if not model.feature_map(grad, (H, W)).any():
            logits, source = _with_last_attention_input(model, x)
            score = logits.gather(1, targets[:, None]).sum()
            (grad,) = torch.autograd.grad(score, source)
            note = "the tokens entering the last attention layer (the head reads prefix tokens only)"
    fmap, grad_map = model.feature_map(source.detach(), (H, W)), model.feature_map(grad, (H, W))  # (B, C, h, w)
    weights = grad_map.mean(dim=(2, 3), keepdim=True)  # (B, C, 1, 1): each channel's importance
    cam = (weights * fmap).sum(1)  # (B, h, w)
    return Explanation("gradcam", _normalise(cam), targets, notes=[f"Grad-CAM on {note}"])


def _with_last_attention_input(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """Logits, and the (B, N, D) tokens entering the model's last attention layer (captured by a forward hook)."""
    last = [m for m in model.modules() if isinstance(m, RecordsAttention)][-1]
    captured: list[Tensor] = []
    handle = last.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    try:
        logits = model(x)
    finally:
        handle.remove()
    return logits, captured[-1]


def upsample(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """(B, h, w) maps → (B, H, W), bilinear, kept in [0, 1]."""
    return F.interpolate(maps[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0].clamp(0, 1)


def explain(model: nn.Module, x: Tensor, method: str, target: int | None = None) -> Explanation:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    model.eval()
    return {"attention": attention_maps, "rollout": rollout, "relevance": relevance, "gradcam": gradcam}[method](
        model, x, target)
