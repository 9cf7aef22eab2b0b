"""Pre-norm Transformer encoder block (ViT paper eq. 2-3):
    z' = z + MSA(LN(z)),  z = z' + MLP(LN(z')),
with optional LayerScale (CaiT/DeiT-III) and stochastic depth on each residual branch.

``residual_norm=True`` gives CCT's order (SHI-Labs/Compact-Transformers ``TransformerEncoderLayer``), where the second
norm normalises the residual stream itself and the MLP branch and its skip both start from it:
    z' = LN(z + MSA(LN(z))),  z = z' + MLP(z').

The attention, MLP and norm layers are arguments, so every family with this residual structure builds its blocks
here: ViT's global attention by default, Swin's window attention, PVT's spatial-reduction attention, a convolutional
MLP (PVT v2), another LayerNorm epsilon. Extra positional arguments of ``forward`` (e.g. the token grid ``(H, W)``)
go to the attention layer, and to the MLP when it declares ``takes_grid = True``.
"""
from __future__ import annotations

from functools import partial
from typing import Callable

from torch import Tensor, nn

from vitkit.layers.attention import Attention
from vitkit.layers.drop import DropPath
from vitkit.layers.layer_scale import LayerScale
from vitkit.layers.mlp import Mlp

__all__ = ["Block"]


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int | None = None, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 proj_drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 init_values: float | None = None, act_layer: str = "gelu", norm_eps: float = 1e-6, *,
                 attn: nn.Module | None = None, mlp: nn.Module | None = None,
                 norm_layer: Callable[[int], nn.Module] | None = None, residual_norm: bool = False):
        super().__init__()
        norm_layer = norm_layer or partial(nn.LayerNorm, eps=norm_eps)
        if attn is None and num_heads is None:
            raise ValueError("Block needs num_heads for its default attention, or an attn module")
        self.norm1 = norm_layer(dim)
        self.attn = attn if attn is not None else Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop,
                                                            proj_drop=proj_drop)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = mlp if mlp is not None else Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self._mlp_takes_grid = getattr(self.mlp, "takes_grid", False)
        self.residual_norm = residual_norm

    def forward(self, x: Tensor, *args) -> Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), *args)))  # eq. 2
        if self.residual_norm:  # CCT: the stream itself is normalised; the MLP and its skip start from it
            x = self.norm2(x)
        y = x if self.residual_norm else self.norm2(x)
        h = self.mlp(y, *args) if self._mlp_takes_grid else self.mlp(y)
        return x + self.drop_path2(self.ls2(h))  # eq. 3
