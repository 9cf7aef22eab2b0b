"""Position-embedding resampling for a new patch grid (ViT paper §3.2: "2D interpolation of the pre-trained position
embeddings"). Bicubic with antialiasing in float32, prefix tokens (class, distillation) untouched: the convention of
timm's ``resample_abs_pos_embed`` and of the DeiT/BEiT fine-tuning scripts. The one resampler in vitkit: pure, no side
effects, non-square grids supported.

``sinusoid_table`` is the fixed (not learned) alternative some families use (T2T-ViT, CCT's sine variants): a table
of any length is computed, so another input size regenerates it instead of resampling it.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["resample_pos_embed", "sinusoid_table"]


def resample_pos_embed(posemb: Tensor, new_size: tuple[int, int], old_size: tuple[int, int] | None = None,
                       num_prefix_tokens: int = 1, interpolation: str = "bicubic", antialias: bool = True) -> Tensor:
    """Resample a (1, prefix + h·w, D) position embedding from grid ``old_size`` (h, w) to ``new_size``.

    ``old_size`` defaults to a square grid. Returns a new tensor of shape (1, prefix + H·W, D) in the input dtype.
    """
    prefix, grid = posemb[:, :num_prefix_tokens], posemb[:, num_prefix_tokens:]
    n = grid.shape[1]
    if old_size is None:
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"cannot infer a square grid from {n} position embeddings; pass old_size")
        old_size = (side, side)
    if old_size[0] * old_size[1] != n:
        raise ValueError(f"old grid {old_size} does not hold {n} position embeddings")
    new_size = (int(new_size[0]), int(new_size[1]))
    if tuple(old_size) == new_size:
        return posemb.clone()
    D = grid.shape[-1]
    grid = grid.float().reshape(1, old_size[0], old_size[1], D).permute(0, 3, 1, 2)  # (1, D, h, w)
    grid = F.interpolate(grid, size=new_size, mode=interpolation, antialias=antialias, align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_size[0] * new_size[1], D)  # (1, H·W, D)
    return torch.cat([prefix, grid.to(posemb.dtype)], dim=1)


def sinusoid_table(num_positions: int, dim: int, *, angle_dtype: torch.dtype = torch.float64) -> Tensor:
    """(1, num_positions, dim) fixed sinusoidal position table (Vaswani et al. 2017, §3.5):
    PE(p, 2i) = sin(p / 10000^(2i/dim)), PE(p, 2i+1) = cos(p / 10000^(2i/dim)) for positions p = 0 … num_positions-1
    (the row-major flattened token grid).

    The angles are computed in float64 and rounded to ``angle_dtype`` before sin/cos, the result to float32: float64
    is numpy's order of rounding (T2T-ViT's ``get_sinusoid_encoding``); float32 reproduces CCT's
    ``sinusoidal_embedding`` (a FloatTensor of the angles) bit for bit. The two differ by up to ~1e-4 at long lengths,
    which matters when a checkpoint's table is checked against this one."""
    pos = torch.arange(num_positions, dtype=torch.float64).unsqueeze(1)  # (n, 1)
    j = torch.arange(dim)
    angle = (pos / torch.pow(10000.0, (2 * (j // 2)).double() / dim)).to(angle_dtype)  # (n, dim)
    return torch.where(j % 2 == 0, angle.sin(), angle.cos()).float().unsqueeze(0)  # (1, n, dim)
