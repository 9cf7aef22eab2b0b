"""Position-embedding resampling for a new patch grid (ViT paper §3.2: "2D interpolation of the pre-trained position
embeddings"), prefix tokens (class, distillation) untouched, non-square grids supported, pure (no side effects).

The official codebases do this 2-D interpolation in different ways, and the logits differ by up to ~1e-2 between them,
so a checkpoint is resized the way its source's code does it. ``POS_EMBED_RESIZES`` names the schemes; each is a pure
function ``(posemb, new_size, old_size, num_prefix_tokens) → posemb`` whose docstring names the file it follows:

- ``bicubic``: ``F.interpolate(mode='bicubic', align_corners=False)``, no antialiasing (DeiT, BEiT, T2T-ViT,
  transformers);
- ``bicubic_antialias``: the same with ``antialias=True``, PIL's bicubic filter (timm's ``resample_abs_pos_embed``);
- ``zoom_linear``: ``scipy.ndimage.zoom(order=1)``, linear with the corner samples aligned (vit_jax, big_vision);
- ``bilinear``: ``F.interpolate(mode='bilinear', align_corners=False)``, no antialiasing (PVT v1, CCT);
- ``sinusoid``: no interpolation: the fixed table ``sinusoid_table`` computed for the new length.

A family maps each checkpoint format to one of them (``vitkit.specs.ResizeRule``); ``create_model(...,
pos_embed_resize=)`` picks another. ``resample_pos_embed`` is the general resampler under the interpolating schemes;
its default (bicubic, antialiased) is timm's, which a ``dynamic_img_size`` ViT follows at forward time.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["resample_pos_embed", "sinusoid_table", "PosEmbedResize", "POS_EMBED_RESIZES", "get_pos_embed_resize",
           "bicubic", "bicubic_antialias", "zoom_linear", "bilinear", "sinusoid"]


def resample_pos_embed(posemb: Tensor, new_size: tuple[int, int], old_size: tuple[int, int] | None = None,
                       num_prefix_tokens: int = 1, interpolation: str = "bicubic", antialias: bool = True, *,
                       align_corners: bool = False, dtype: torch.dtype = torch.float32) -> Tensor:
    """Resample a (1, prefix + h·w, D) position embedding from grid ``old_size`` (h, w) to ``new_size`` with
    ``F.interpolate`` computed in ``dtype``.

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
    grid = grid.to(dtype).reshape(1, old_size[0], old_size[1], D).permute(0, 3, 1, 2)  # (1, D, h, w)
    corners = align_corners if interpolation in ("bilinear", "bicubic") else None
    grid = F.interpolate(grid, size=new_size, mode=interpolation, antialias=antialias, align_corners=corners)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_size[0] * new_size[1], D)  # (1, H·W, D)
    return torch.cat([prefix, grid.to(posemb.dtype)], dim=1)


# ------------------------------------------------------------------------------------------------ the schemes
def bicubic(posemb: Tensor, new_size: tuple[int, int], old_size: tuple[int, int] | None = None,
            num_prefix_tokens: int = 1) -> Tensor:
    """Bicubic without antialiasing (Keys' kernel, a = −0.75), half-pixel centres, in float32:
    ``F.interpolate(mode='bicubic', align_corners=False)``, as facebookresearch/deit ``main.py``@7e160fe
    (``--finetune``) resizes; so do microsoft/unilm ``beit/run_class_finetuning.py``@768a3c8,
    yitu-opensource/T2T-ViT ``utils.py`` ``resize_pos_embed``@0f63dc9 and transformers' ``interpolate_pos_encoding``
    (ViT, DeiT, BEiT; 5.25.0)."""
    return resample_pos_embed(posemb, new_size, old_size, num_prefix_tokens, "bicubic", antialias=False)


def bicubic_antialias(posemb: Tensor, new_size: tuple[int, int], old_size: tuple[int, int] | None = None,
                      num_prefix_tokens: int = 1) -> Tensor:
    """Bicubic with antialiasing, in float32: PIL's bicubic filter (a = −0.5, widened when shrinking), the default of
    huggingface/pytorch-image-models ``timm/layers/pos_embed.py`` ``resample_abs_pos_embed`` (timm 1.0.31)."""
    return resample_pos_embed(posemb, new_size, old_size, num_prefix_tokens, "bicubic", antialias=True)


def zoom_linear(posemb: Tensor, new_size: tuple[int, int], old_size: tuple[int, int] | None = None,
                num_prefix_tokens: int = 1) -> Tensor:
    """Linear interpolation with the corner samples aligned, in float64: ``scipy.ndimage.zoom(grid, (H/h, W/w, 1),
    order=1)`` (``grid_mode=False`` maps corner to corner), as google-research/vision_transformer
    ``vit_jax/checkpoint.py`` ``interpolate_posembed``@c6de1e5 and google-research/big_vision
    ``big_vision/models/vit.py`` ``resample_posemb``@0127fb6 resize."""
    return resample_pos_embed(posemb, new_size, old_size, num_prefix_tokens, "bilinear", antialias=False,
                              align_corners=True, dtype=torch.float64)


def bilinear(posemb: Tensor, new_size: tuple[int, int], old_size: tuple[int, int] | None = None,
             num_prefix_tokens: int = 1) -> Tensor:
    """Bilinear without antialiasing, half-pixel centres, in float32: ``F.interpolate(mode='bilinear')``, as
    whai362/PVT ``classification/pvt.py`` ``_get_pos_embed``@57e2dfa and SHI-Labs/Compact-Transformers
    ``pe_check``@cd11f09 resize."""
    return resample_pos_embed(posemb, new_size, old_size, num_prefix_tokens, "bilinear", antialias=False)


def sinusoid(posemb: Tensor, new_size: tuple[int, int], old_size: tuple[int, int] | None = None,
             num_prefix_tokens: int = 1) -> Tensor:
    """No interpolation: the fixed sinusoidal table (``sinusoid_table``) for prefix + H·W positions, replacing the
    checkpoint's whatever it holds (a 1-D table over the flattened grid; T2T-ViT's constructor builds it this way
    for any size with ``models/transformer_block.py`` ``get_sinusoid_encoding``, yitu-opensource/T2T-ViT@0f63dc9)."""
    return sinusoid_table(num_prefix_tokens + new_size[0] * new_size[1], posemb.shape[-1]).to(posemb.dtype)


@dataclass(frozen=True)
class PosEmbedResize:
    """A named resize scheme: ``fn`` (one of the functions above), what the load report calls it, and the official
    code that resizes this way (named when a user picks the scheme with ``pos_embed_resize=``)."""

    name: str
    describe: str
    origin: str
    fn: Callable[..., Tensor]


POS_EMBED_RESIZES: dict[str, PosEmbedResize] = {s.name: s for s in (
    PosEmbedResize("bicubic", "bicubic without antialias", "facebookresearch/deit main.py@7e160fe (--finetune)",
                   bicubic),
    PosEmbedResize("bicubic_antialias", "bicubic with antialias (timm's filter)",
                   "timm 1.0.31 layers/pos_embed.py resample_abs_pos_embed", bicubic_antialias),
    PosEmbedResize("zoom_linear", "linear, corners aligned (scipy.ndimage.zoom order=1)",
                   "google-research/vision_transformer vit_jax/checkpoint.py@c6de1e5 interpolate_posembed",
                   zoom_linear),
    PosEmbedResize("bilinear", "bilinear without antialias", "whai362/PVT classification/pvt.py@57e2dfa _get_pos_embed",
                   bilinear),
    PosEmbedResize("sinusoid", "sinusoidal table regenerated, not interpolated",
                   "yitu-opensource/T2T-ViT models/transformer_block.py@0f63dc9 get_sinusoid_encoding", sinusoid),
)}


def get_pos_embed_resize(name: str) -> PosEmbedResize:
    """The scheme called ``name``, or a ValueError naming the choices."""
    if name not in POS_EMBED_RESIZES:
        raise ValueError(f"unknown position-embedding resize {name!r}; choose from {', '.join(POS_EMBED_RESIZES)}")
    return POS_EMBED_RESIZES[name]


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
