"""Multi-head self-attention (Vaswani et al. 2017, eq. 1; ViT paper App. A, eq. 5-8).

One scaled-dot-product kernel, ``attend``, serves every attention layer in vitkit: the fused path
(``torch.nn.functional.scaled_dot_product_attention``) by default, and an explicit softmax path that hands the
attention probabilities to a recorder. Recording is opt-in through ``record_attention(model)`` and costs nothing when
off (the recorder attribute is ``None`` and the fused kernel runs).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["attend", "RecordsAttention", "Attention", "record_attention"]


def attend(q: Tensor, k: Tensor, v: Tensor, *, scale: float, bias: Tensor | None = None, dropout_p: float = 0.0,
           record: Callable[[Tensor], None] | None = None) -> Tensor:
    """softmax(q kᵀ · scale + bias) v for q, k, v of shape (B, h, N, d); bias broadcasts to (B, h, N, M)."""
    if record is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=scale)
    attn = (q * scale) @ k.transpose(-2, -1)  # (B, h, N, M)
    if bias is not None:
        attn = attn + bias
    attn = attn.softmax(dim=-1)
    record(attn)
    attn = F.dropout(attn, dropout_p, training=dropout_p > 0)
    return attn @ v  # (B, h, N, d)


class RecordsAttention(nn.Module):
    """Base of every attention layer: ``attn_recorder`` (not a parameter, not saved) receives the probabilities."""

    attn_recorder: Callable[[Tensor], None] | None = None


class Attention(RecordsAttention):
    """ViT multi-head self-attention with a fused qkv projection in (q, k, v) order (timm's layout)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, h, N, d)
        q, k, v = qkv.unbind(0)
        x = attend(q, k, v, scale=self.scale, bias=bias, dropout_p=self.attn_drop if self.training else 0.0,
                   record=self.attn_recorder)
        x = x.transpose(1, 2).reshape(B, N, C)  # (B, N, C)
        return self.proj_drop(self.proj(x))


@contextlib.contextmanager
def record_attention(model: nn.Module, detach: bool = True) -> Iterator[dict[str, Tensor]]:
    """Record the attention probabilities of every attention layer of ``model`` while the context is open.

    Yields a dict filled during forward passes: module name (e.g. ``"blocks.3.attn"``) → (B, h, N, M) tensor of the
    most recent call. The layers switch to the explicit softmax path only inside the context.
    """
    maps: dict[str, Tensor] = {}
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, RecordsAttention)]

    def recorder(name: str) -> Callable[[Tensor], None]:
        def store(attn: Tensor) -> None:
            maps[name] = attn.detach() if detach else attn
        return store

    previous = [(module, module.attn_recorder) for _, module in layers]
    for name, module in layers:
        module.attn_recorder = recorder(name)
    try:
        yield maps
    finally:
        for module, before in previous:  # an enclosing context keeps recording after a nested one closes
            module.attn_recorder = before
