"""Convolution → BatchNorm → activation, the unit convolutional stems and MobileNet-style blocks are built from
(timm's ``ConvNormAct``: module names ``conv``, ``bn``, ``act``).

The convolution has no bias (the BatchNorm's shift replaces it) and "same" padding ``(k - 1) // 2``; BatchNorm uses
PyTorch's defaults (eps 1e-5, momentum 0.1), as ml-cvnets, timm and transformers do.
"""
from __future__ import annotations

from torch import Tensor, nn

from vitkit.layers.mlp import make_act

__all__ = ["ConvNormAct"]


class ConvNormAct(nn.Module):
    """``act(bn(conv(x)))``; ``act=None`` leaves the output linear (e.g. a projection before a residual sum)."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, stride: int = 1, groups: int = 1, *,
                 act: str | None = "silu"):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding=(kernel_size - 1) // 2, groups=groups,
                              bias=False)
        self.bn = nn.BatchNorm2d(out_chs)
        self.act = make_act(act) if act is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:  # (B, in_chs, H, W) → (B, out_chs, H / stride, W / stride)
        return self.act(self.bn(self.conv(x)))
