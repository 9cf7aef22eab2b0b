"""Slide attention (Pan et al., "Slide-Transformer: Hierarchical Vision Transformer with Local Self-Attention", CVPR
2023, arXiv 2304.04237, §3.3-3.4), as DAT++'s experimental 'E' blocks run it: LeapLabTHU/DAT@32173fc
``models/slide.py`` ``SlideAttention(dim, heads, 3)`` (defaults ``dim_reduction`` 4, ``rpb``, a shared deformable
kernel), on channels-last maps (B, H, W, C):

    q, k, v = x W_qkv                                   (C → 3·C/r, per head: q, k, v of c = C / (r·heads) channels)
    k̃ = Shift(k) + DWConv(k),   ṽ = Shift(v) + DWConv(v)     (the k×k neighbours: fixed shifts + a learned conv)
    z_ij = Σ_n softmax_n(d^-½ q_ij · (k̃_ij,n + B_n)) ṽ_ij,n,   out = z W_o          (z: C/r channels, W_o: C/r → C)

``Shift`` is a depth-wise conv whose k² output channels per input channel are fixed one-hot kernels (zero padding),
so output n of channel c is k shifted by (n // k − k // 2, n % k − k // 2); it keeps its bias, which the official code
trains. The learned ``DWConv`` has the same shape ("deformed shifting"). The bias B (``relative_position_bias_table``,
(1, heads, 1, k², 1, 1)) is added to the keys, not to the logits, and the scale d^-½ uses d = C / heads (the full
width), both as the official code. Parameter names follow it (``qkv``, ``dep_conv``, ``dep_conv1``, ``proj``).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from vitkit.layers.attention import RecordsAttention

__all__ = ["SlideAttention", "shift_kernels"]


def shift_kernels(kernel: int, channels: int) -> Tensor:
    """(channels · k², 1, k, k) one-hot kernels: output n of every channel reads the neighbour at (n // k, n % k) of
    the k×k window (official ``SlideAttention.reset_parameters``)."""
    eye = torch.eye(kernel * kernel).view(kernel * kernel, 1, kernel, kernel)
    return eye.repeat(channels, 1, 1, 1)


class SlideAttention(RecordsAttention):
    attn_layout = ("(B, heads, H·W, k²): every query (row-major) over its k×k neighbourhood (window row-major, keys "
                   "shifted and deformed by the learned depth-wise conv); info: grid (H, W), kernel k")

    def __init__(self, dim: int, num_heads: int, kernel: int = 3, *, dim_reduction: int = 4, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        inner = dim // dim_reduction
        if inner * dim_reduction != dim or inner % num_heads:
            raise ValueError(f"dim {dim} must be a multiple of dim_reduction {dim_reduction} x heads {num_heads}")
        self.num_heads, self.kernel, self.c = num_heads, kernel, inner // num_heads
        self.scale = (dim // num_heads) ** -0.5  # the official head_dim: dim // heads, before the reduction
        self.qkv = nn.Linear(dim, 3 * inner)
        kw = dict(kernel_size=kernel, padding=kernel // 2, groups=self.c)
        self.dep_conv = nn.Conv2d(self.c, kernel * kernel * self.c, **kw)  # the fixed shifts (a trained bias)
        self.dep_conv.weight = nn.Parameter(shift_kernels(kernel, self.c), requires_grad=False)
        self.dep_conv1 = nn.Conv2d(self.c, kernel * kernel * self.c, **kw)  # the learned deformation
        self.relative_position_bias_table = nn.Parameter(torch.zeros(1, num_heads, 1, kernel * kernel, 1, 1))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(inner, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor) -> Tensor:
        """(B, H, W, C) → (B, H, W, C)."""
        B, H, W, _ = x.shape
        h, c = self.num_heads, self.c
        qkv = self.qkv(x).permute(0, 3, 1, 2).reshape(B * h, 3 * c, H, W)  # per head: q, k, v channels
        q = (qkv[:, :c] * self.scale).reshape(B, h, c, 1, H, W)
        k = self.neighbours(qkv[:, c:2 * c]) + self.relative_position_bias_table  # (B, h, c, k², H, W)
        v = self.neighbours(qkv[:, 2 * c:])
        attn = (q * k).sum(2, keepdim=True).softmax(dim=3)  # (B, h, 1, k², H, W)
        if self.attn_recorder is not None:
            self.attn_recorder(attn.flatten(4).squeeze(2).transpose(2, 3), grid=(H, W), kernel=self.kernel)
        out = (self.attn_drop(attn) * v).sum(3)  # (B, h, c, H, W)
        out = out.reshape(B, h * c, H, W).permute(0, 2, 3, 1)  # (B, H, W, C/r)
        return self.proj_drop(self.proj(out))

    def neighbours(self, t: Tensor) -> Tensor:
        """(B·h, c, H, W) → (B, h, c, k², H, W): the fixed shifts plus the learned depth-wise conv."""
        Bh, c, H, W = t.shape
        out = self.dep_conv(t) + self.dep_conv1(t)  # (B·h, c·k², H, W)
        return out.reshape(Bh // self.num_heads, self.num_heads, c, self.kernel * self.kernel, H, W)

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, kernel={self.kernel}, reduced_head_dim={self.c}"
