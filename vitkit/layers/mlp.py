"""Transformer MLP (ViT paper eq. 3: two dense layers with a GELU non-linearity) and the activation table.

The original JAX ViT uses flax ``nn.gelu``, whose default is the tanh approximation; timm, DeiT and transformers use
the exact erf form. Weights keep the activation they were trained with (``act_layer='gelu_tanh'`` for JAX files).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _module

__all__ = ["Mlp", "DWConvMlp", "QuickGELU", "make_act", "activate", "ACTIVATIONS"]


class QuickGELU(nn.Module):
    """x · sigmoid(1.702 x), the GELU approximation used by CLIP and CvT."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {
    "gelu": lambda: nn.GELU(),
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "quick_gelu": QuickGELU,
    "relu": lambda: nn.ReLU(inplace=False),
    "silu": lambda: nn.SiLU(),
    "hardswish": lambda: nn.Hardswish(),
}


def make_act(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose from {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


# In-place forms of the activations that have one; same kernel, same numbers, no new (B, N, hidden) buffer.
_INPLACE: dict[type, Callable[[nn.Module, Tensor], Tensor]] = {
    nn.GELU: lambda act, x: torch.ops.aten.gelu_(x, approximate=act.approximate),
    nn.ReLU: lambda act, x: torch.relu_(x),
    nn.SiLU: lambda act, x: F.silu(x, inplace=True),
    QuickGELU: lambda act, x: x.mul_(torch.sigmoid(x * 1.702)),  # bitwise x * sigmoid(1.702 x)
}


_compiling = getattr(torch.compiler, "is_compiling", lambda: False)  # torch >= 2.3


def _has_hooks(*modules: nn.Module) -> bool:
    return bool(_module._global_forward_hooks or _module._global_forward_pre_hooks
                or any(m._forward_hooks or m._forward_pre_hooks for m in modules))


def activate(act: nn.Module, h: Tensor, producer: nn.Module) -> Tensor:
    """``act(h)`` for ``h`` freshly computed by the layer ``producer``; in place when nothing can observe it (see
    ``Mlp``): the activation has an in-place form, ``h`` needs no gradient, no hook on ``producer`` or ``act`` could
    hold it, and no tracer or compiler is recording."""
    inplace = _INPLACE.get(type(act))
    if inplace is None or h.requires_grad or torch.jit.is_tracing() or _compiling() or _has_hooks(producer, act):
        return act(h)
    return inplace(act, h)


class Mlp(nn.Module):
    """fc1 → act → dropout → fc2 → dropout (dropout after every dense layer, ViT paper App. B.1). ``hidden_drop``
    sets the first dropout apart from ``drop`` (ml-cvnets' ``ffn_dropout`` vs ``dropout``); None = ``drop``.

    Without autograd (inference), the activation overwrites fc1's output instead of allocating a second
    (B, N, hidden) tensor, as ``nn.ReLU(inplace=True)`` does in CNNs. That buffer is the largest of a ViT block
    (19 MB for ViT-B at batch 8); on CPUs each fresh one is page-faulted in again, which cost ViT-B/16 about 5% of its
    inference time (vitkit/bench/README.md). Nothing can observe the difference: the in-place path is taken only when
    fc1 is a ``Linear`` (a fresh output), that output needs no gradient, no hook could hold it, and no tracer or
    compiler is recording.
    """

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None,
                 act_layer: str = "gelu", drop: float = 0.0, bias: bool = True, *,
                 hidden_drop: float | None = None):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = make_act(act_layer)
        self.drop1 = nn.Dropout(drop if hidden_drop is None else hidden_drop)
        self.fc2 = nn.Linear(hidden_features, out_features or in_features, bias=bias)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        x = self.fc1(x)  # (..., hidden)
        return self.drop2(self.fc2(self.drop1(activate(self.act, x, self.fc1))))


class DWConvMlp(Mlp):
    """PVT v2's convolutional feed-forward (PVT v2 paper §3.3, "Convolutional Feed-Forward"): fc1 → [ReLU] → 3×3
    depth-wise conv over the H×W token grid → activation → fc2, dropout after the activation and after fc2
    (whai362/PVT classification/pvt_v2.py ``Mlp`` + ``DWConv``; timm ``MlpWithDepthwiseConv``; DAT v1's
    ``TransformerMLPWithConv``). ``extra_relu``: the ReLU after fc1 of the linear variant (PVT-v2-Li).
    ``dw_residual``: the conv is a residual branch, h + dwconv(h) (DAT++ ``TransformerMLPWithConv``, whose dropout
    after fc1 instead of after the activation matters only when training with drop > 0; its configs use 0).
    Takes the grid, so the shared ``Block`` passes it (H, W); channels-last maps (B, H, W, C) need none.
    Without autograd the activation overwrites the conv's output, as ``Mlp`` does with fc1's."""

    takes_grid = True

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None,
                 act_layer: str = "gelu", drop: float = 0.0, *, extra_relu: bool = False, dw_residual: bool = False):
        super().__init__(in_features, hidden_features, out_features, act_layer=act_layer, drop=drop)
        self.relu = nn.ReLU() if extra_relu else nn.Identity()
        self.dwconv = nn.Conv2d(hidden_features, hidden_features, 3, padding=1, groups=hidden_features)
        self.dw_residual = dw_residual

    def forward(self, x: Tensor, H: int | None = None, W: int | None = None) -> Tensor:
        shape = x.shape
        if x.ndim == 4:  # a channels-last map (B, H, W, C)
            H, W = shape[1:3]
            x = x.flatten(1, 2)  # (B, N, C)
        x = self.relu(self.fc1(x))  # (B, N, hidden)
        B, N, C = x.shape
        h = x.transpose(1, 2).reshape(B, C, H, W)  # (B, hidden, H, W), a channels-last view: no copy
        h = self.dwconv(h).flatten(2).transpose(1, 2)  # (B, N, hidden), the conv's fresh output
        if self.dw_residual:
            h = h + x
        x = self.drop2(self.fc2(self.drop1(activate(self.act, h, self.dwconv))))
        return x.view(*shape[:-1], x.shape[-1])
