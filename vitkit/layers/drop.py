"""Stochastic depth (Huang et al. 2016), per sample, on the residual branch; timm's DropPath convention
(the kept branches are scaled by 1/keep_prob)."""
from __future__ import annotations

from torch import Tensor, nn

__all__ = ["drop_path", "DropPath", "drop_path_rates"]


def drop_path(x: Tensor, p: float, training: bool) -> Tensor:
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)  # (B, 1, ...)
    return x * mask / keep


class DropPath(nn.Module):
    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return drop_path(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def drop_path_rates(rate: float, depth: int) -> list[float]:
    """Linearly increasing rates over the blocks, 0 for the first (DeiT / timm convention)."""
    if depth <= 1:
        return [0.0] * depth
    return [rate * i / (depth - 1) for i in range(depth)]
