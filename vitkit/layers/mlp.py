"""Transformer MLP (ViT paper eq. 3: two dense layers with a GELU non-linearity) and the activation table.

The original JAX ViT uses flax ``nn.gelu``, whose default is the tanh approximation; timm, DeiT and transformers use
the exact erf form. Weights keep the activation they were trained with (``act_layer='gelu_tanh'`` for JAX files).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["Mlp", "QuickGELU", "make_act", "ACTIVATIONS"]


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


class Mlp(nn.Module):
    """fc1 → act → dropout → fc2 → dropout (dropout after every dense layer, ViT paper App. B.1)."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None,
                 act_layer: str = "gelu", drop: float = 0.0, bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = make_act(act_layer)
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_features, out_features or in_features, bias=bias)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))
