"""Convolution → BatchNorm → activation, the unit convolutional stems and MobileNet-style blocks are built from
(timm's ``ConvNormAct``: module names ``conv``, ``bn``, ``act``).

The convolution has no bias (the BatchNorm's shift replaces it) and "same" padding ``(k - 1) // 2`` unless told
otherwise; BatchNorm uses PyTorch's defaults (eps 1e-5, momentum 0.1), as ml-cvnets, timm and transformers do.

When the BatchNorm normalises with its running statistics (eval mode), it is an affine map per channel, and it is
folded into the convolution: ``bn(conv(x, W)) = conv(x, W·s) + (β − μ·s)`` with ``s = γ / √(σ² + ε)``. The
convolution then writes the normalised output directly, instead of a second pass over a tensor as large as the
output; the activation runs in place when nothing can observe its input (``vitkit.layers.mlp.activate``). The
parameters and the state dict are unchanged: the folded kernel is recomputed at every call (a cost proportional to
the weights, not the activations). The result differs from the unfolded one by float rounding only (~1e-7
relative). A hook on the conv or BatchNorm module keeps the unfolded path, so hooks see what they expect.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from vitkit.layers.mlp import _has_hooks, activate, make_act

__all__ = ["ConvNormAct"]


class ConvNormAct(nn.Module):
    """``act(bn(conv(x)))``; ``act=None`` leaves the output linear (e.g. a projection before a residual sum)."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, stride: int = 1, groups: int = 1, *,
                 act: str | None = "silu", padding: int | None = None):
        super().__init__()
        padding = (kernel_size - 1) // 2 if padding is None else padding
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding=padding, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_chs)
        self.act = make_act(act) if act is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:  # (B, in_chs, H, W) → (B, out_chs, H / stride, W / stride)
        if self.bn.training or self.bn.running_var is None or _has_hooks(self.conv, self.bn):
            return self.act(self.bn(self.conv(x)))
        weight, bias = self.folded()
        y = F.conv2d(x, weight, bias, self.conv.stride, self.conv.padding, self.conv.dilation, self.conv.groups)
        return activate(self.act, y, self.bn)

    def folded(self) -> tuple[Tensor, Tensor]:
        """The kernel and bias of conv followed by the eval-mode BatchNorm."""
        bn = self.bn
        scale = bn.weight * (bn.running_var + bn.eps).rsqrt()  # (out_chs,)
        return self.conv.weight * scale.reshape(-1, 1, 1, 1), bn.bias - bn.running_mean * scale
