"""Spatial-reduction attention (SRA), the attention of PVT v1 and v2 (Wang et al. 2021, PVT eq. 2-3; PVT v2 §3.1):

    SRA(Q, K, V) = Concat(head_1, …, head_h) W^O,   head_j = Attention(Q W_j^Q, SR(K) W_j^K, SR(V) W_j^V)
    SR(x) = Norm(Reshape(x, R) W^S)

Queries keep every token of the H×W grid; keys and values are read from a reduced map, so the cost is N·M instead of
N²: a conv with kernel = stride = R (``sr_ratio``) then LayerNorm (PVT v1, PVT v2), or, in PVT v2's linear variant
(``linear=True``, "Linear SRA"), adaptive average pooling to a fixed ``pool_size``×``pool_size`` grid, a 1×1 conv,
LayerNorm and GELU. ``sr_ratio = 1`` (no ``linear``) is plain multi-head self-attention.

Parameter names follow the official code and timm (``q``, ``kv`` with keys before values, ``proj``, ``sr``, ``norm``).
The SR LayerNorm is a plain ``nn.LayerNorm`` (eps 1e-5) in the official code; transformers uses its config's
``layer_norm_eps`` there, hence ``norm_eps``; ``qk_scale`` replaces the d^-½ scale (official ``qk_scale``). The product runs through the shared ``attend`` kernel (fused SDPA unless
attention is being recorded).
"""
from __future__ import annotations

from torch import Tensor, nn

from vitkit.layers.attention import RecordsAttention, attend

__all__ = ["SpatialReductionAttention"]


class SpatialReductionAttention(RecordsAttention):
    attn_layout = ("(B, heads, N, M): each of the N query tokens (the H×W grid, after a class token where the stage "
                   "has one) attends to M keys of the spatially reduced kv_grid (the class token first when the stage "
                   "has one and no reduction); info: grid (H, W), kv_grid, class_token")

    def __init__(self, dim: int, num_heads: int, sr_ratio: int = 1, *, linear: bool = False, pool_size: int = 7,
                 qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0, norm_eps: float = 1e-5,
                 qk_scale: float | None = None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = qk_scale or self.head_dim ** -0.5  # the official ``qk_scale or head_dim ** -0.5``
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.pool = nn.AdaptiveAvgPool2d(pool_size) if linear else None
        self.sr = self.norm = self.act = None
        if linear or sr_ratio > 1:
            kernel = 1 if linear else sr_ratio
            self.sr = nn.Conv2d(dim, dim, kernel_size=kernel, stride=kernel)
            self.norm = nn.LayerNorm(dim, eps=norm_eps)
            self.act = nn.GELU() if linear else None

    def reduce(self, x: Tensor, H: int, W: int) -> tuple[Tensor, tuple[int, int]]:
        """SR(x): the (B, M, C) tokens keys and values are computed from, and their grid."""
        if self.sr is None:
            return x, (H, W)
        B, N, C = x.shape
        x = x.transpose(1, 2).reshape(B, C, H, W)  # (B, C, H, W)
        if self.pool is not None:
            x = self.pool(x)  # (B, C, 7, 7)
        x = self.sr(x)  # (B, C, h, w)
        grid = (x.shape[-2], x.shape[-1])
        x = self.norm(x.flatten(2).transpose(1, 2))  # (B, h·w, C)
        return (self.act(x) if self.act is not None else x), grid

    def forward(self, x: Tensor, H: int, W: int) -> Tensor:
        """x: (B, N, C) tokens of an H×W grid (N = H·W, or 1 + H·W with a class token and no reduction)."""
        B, N, C = x.shape
        q = self.q(x).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # (B, h, N, d)
        kv_src, kv_grid = self.reduce(x, H, W)
        kv = self.kv(kv_src).reshape(B, -1, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (2, B, h, M, d)
        k, v = kv.unbind(0)
        class_token = k.shape[2] > kv_grid[0] * kv_grid[1]  # unreduced keys of a stage with a class token
        x = attend(q, k, v, scale=self.scale, dropout_p=self.attn_drop if self.training else 0.0,
                   record=self.attn_recorder, grid=(H, W), kv_grid=kv_grid, class_token=class_token)
        x = x.transpose(1, 2).reshape(B, N, C)  # (B, N, C)
        return self.proj_drop(self.proj(x))
