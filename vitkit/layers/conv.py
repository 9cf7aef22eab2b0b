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

``StdConv2d`` is the weight-standardised convolution of the ViT hybrids' ResNet (Qiao et al. 2019, arXiv
1903.10520): every output filter's kernel is shifted to mean 0 and scaled to unit standard deviation before it is
applied, with TensorFlow's input-size-dependent "SAME" padding (``pad_same``), which puts the odd extra row and
column at the bottom and right where PyTorch's symmetric padding cannot.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitkit.layers.mlp import _has_hooks, activate, make_act

__all__ = ["ConvNormAct", "StdConv2d", "pad_same", "same_padding"]


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


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow's "SAME" padding of one side of length ``size`` (flax ``nn.Conv`` / ``nn.max_pool``
    ``padding='SAME'``): ⌈size / stride⌉ outputs, total padding max((⌈size/stride⌉ − 1)·stride + kernel − size, 0),
    the smaller half before."""
    total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def pad_same(x: Tensor, kernel: tuple[int, int], stride: tuple[int, int], value: float = 0.0) -> Tensor:
    """(B, C, H, W) → padded so that a ``kernel`` window moved by ``stride`` gives ⌈H/s⌉ × ⌈W/s⌉ outputs ("SAME");
    ``value=-inf`` for max-pooling (the padding never wins)."""
    top, bottom = same_padding(x.shape[-2], kernel[0], stride[0])
    left, right = same_padding(x.shape[-1], kernel[1], stride[1])
    if not (top or bottom or left or right):
        return x
    return F.pad(x, (left, right, top, bottom), value=value)  # (B, C, H + top + bottom, W + left + right)


class StdConv2d(nn.Conv2d):
    """Convolution with a weight-standardised kernel and "SAME" padding, no bias.

    Each output filter ``w`` (its in·kh·kw values) is replaced by (w − mean) / (std + eps), as
    google-research/vision_transformer ``vit_jax/models_resnet.py`` ``weight_standardize``@c6de1e5 computes it
    (eps 1e-5), or with ``eps_in_sqrt=True`` by (w − mean) / √(var + eps), timm's ``StdConv2dSame`` (timm 1.0.31
    ``layers/std_conv.py``; its ViT hybrids use eps 1e-8); std and var are the biased (population) ones in both.
    """

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, stride: int = 1, *, eps: float = 1e-5,
                 eps_in_sqrt: bool = False):
        super().__init__(in_chs, out_chs, kernel_size, stride, padding=0, bias=False)
        self.eps = eps
        self.eps_in_sqrt = eps_in_sqrt

    def standardized_weight(self) -> Tensor:
        w = self.weight.reshape(self.out_channels, -1)  # (out, in·kh·kw)
        var, mean = torch.var_mean(w, dim=1, unbiased=False, keepdim=True)  # (out, 1) each
        scale = (var + self.eps).rsqrt() if self.eps_in_sqrt else 1.0 / (var.sqrt() + self.eps)
        return ((w - mean) * scale).reshape_as(self.weight)  # (out, in, kh, kw)

    def forward(self, x: Tensor) -> Tensor:  # (B, in_chs, H, W) → (B, out_chs, ⌈H/s⌉, ⌈W/s⌉)
        x = pad_same(x, self.kernel_size, self.stride)
        return F.conv2d(x, self.standardized_weight(), None, self.stride)
