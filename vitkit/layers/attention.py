"""Multi-head self-attention (Vaswani et al. 2017, eq. 1; ViT paper App. A, eq. 5-8).

One scaled-dot-product kernel, ``attend``, serves every attention layer in vitkit: the fused path
(``torch.nn.functional.scaled_dot_product_attention``) by default, and an explicit softmax path that hands the
attention probabilities to a recorder. Recording is opt-in through ``record_attention(model)`` and costs nothing when
off (the recorder attribute is ``None`` and the fused kernel runs).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["attend", "RecordsAttention", "Attention", "record_attention", "AttentionMaps"]


def attend(q: Tensor, k: Tensor, v: Tensor, *, scale: float, bias: Tensor | None = None, dropout_p: float = 0.0,
           record: Callable[..., None] | None = None, **info) -> Tensor:
    """softmax(q kᵀ · scale + bias) v for q, k, v of shape (B, h, N, d); bias broadcasts to (B, h, N, M).

    ``record`` (a layer's ``attn_recorder``) receives the probabilities and ``info``: what a reader needs to place
    them on the image (e.g. a window layer's grid, window and shift)."""
    if bias is not None and bias.ndim < 4:  # SDPA's CPU kernel was 1.8x slower with a 3-d (h, N, M) mask than with
        bias = bias.reshape((1,) * (4 - bias.ndim) + bias.shape)  # the same (1, h, N, M) view (BEiT-B block, B = 8)
    if record is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=scale)
    attn = (q * scale) @ k.transpose(-2, -1)  # (B, h, N, M)
    if bias is not None:
        attn = attn + bias
    attn = attn.softmax(dim=-1)
    record(attn, **info)
    attn = F.dropout(attn, dropout_p, training=dropout_p > 0)
    return attn @ v  # (B, h, N, d)


class RecordsAttention(nn.Module):
    """Base of every attention layer: ``attn_recorder`` (not a parameter, not saved) receives the probabilities.

    ``attn_layout`` documents the shape of what the layer records (its rows sum to 1)."""

    attn_recorder: Callable[..., None] | None = None
    attn_layout: str = "(B, heads, N, N): every token attends to every token"


class AttentionMaps(dict):
    """What ``record_attention`` yields: layer name → probabilities of its most recent call (layout in the layer's
    ``attn_layout``), and in ``info[name]`` what the layer reported about them (e.g. Swin's window grid)."""

    def __init__(self):
        super().__init__()
        self.info: dict[str, dict] = {}
        self.layouts: dict[str, str] = {}


class Attention(RecordsAttention):
    """ViT multi-head self-attention with a fused qkv projection in (q, k, v) order (timm's layout).

    ``qkv_bias``: True = one bias on the fused projection (ViT); False = none; ``"qv"`` = separate ``q_bias`` and
    ``v_bias`` parameters and no key bias (BEiT ``modeling_finetune.py: Attention``, timm's names; a key bias would
    add a constant per query row to the logits, which the softmax cancels). ``rel_pos``: a module whose call returns
    an additive (heads, N, N) bias, e.g. ``RelativePositionBias`` (BEiT's per-block table), added to any ``bias``
    passed to ``forward``. ``scale`` overrides the query scaling head_dim^-1/2 (the ``qk_scale`` argument of
    timm-era official code, e.g. T2T-ViT).
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool | Literal["qv"] = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, *, rel_pos: nn.Module | None = None, scale: float | None = None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        if qkv_bias not in (True, False, "qv"):
            raise ValueError(f"qkv_bias must be True, False or 'qv', got {qkv_bias!r}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5 if scale is None else scale
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias is True)
        if qkv_bias == "qv":
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.register_buffer("k_bias", torch.zeros(dim), persistent=False)
            self.v_bias = nn.Parameter(torch.zeros(dim))
        self.rel_pos = rel_pos
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.record_info: dict = {}  # what a recorder is told about the tokens (set by the owner, e.g. their grid)

    def project_qkv(self, x: Tensor) -> Tensor:
        """(B, N, C) → (B, N, 3C), the fused q, k, v projections."""
        if hasattr(self, "q_bias"):
            return F.linear(x, self.qkv.weight, torch.cat((self.q_bias, self.k_bias, self.v_bias)))
        return self.qkv(x)

    def forward(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        B, N, C = x.shape
        qkv = self.project_qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)  # (B, N, 3, h, d)
        qkv = qkv.permute(2, 0, 3, 1, 4)  # (3, B, h, N, d)
        q, k, v = qkv.unbind(0)
        if self.rel_pos is not None:
            bias = self.rel_pos() if bias is None else self.rel_pos() + bias  # (h, N, N)
        x = attend(q, k, v, scale=self.scale, bias=bias, dropout_p=self.attn_drop if self.training else 0.0,
                   record=self.attn_recorder, **self.record_info)
        x = x.transpose(1, 2).reshape(B, N, C)  # (B, N, C)
        return self.proj_drop(self.proj(x))


@contextlib.contextmanager
def record_attention(model: nn.Module, detach: bool = True) -> Iterator[AttentionMaps]:
    """Record the attention probabilities of every attention layer of ``model`` while the context is open.

    Yields an ``AttentionMaps`` dict filled during forward passes: module name (e.g. ``"blocks.3.attn"``) → the
    probabilities of its most recent call, (B, h, N, M) for global attention; each layer's layout is in
    ``maps.layouts[name]`` and what it reported in ``maps.info[name]``. The layers switch to the explicit softmax path
    only inside the context.
    """
    maps = AttentionMaps()
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, RecordsAttention)]
    maps.layouts.update({n: m.attn_layout for n, m in layers})

    def recorder(name: str) -> Callable[..., None]:
        def store(attn: Tensor, **info) -> None:
            maps[name] = attn.detach() if detach else attn
            maps.info[name] = info
        return store

    previous = [(module, module.attn_recorder) for _, module in layers]
    for name, module in layers:
        module.attn_recorder = recorder(name)
    try:
        yield maps
    finally:
        for module, before in previous:  # an enclosing context keeps recording after a nested one closes
            module.attn_recorder = before
