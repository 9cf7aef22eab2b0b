"""Blockwise masking for masked image modelling (BEiT, Bao et al. 2021, arXiv:2106.08254, Sec. 2.5 and Algorithm 1),
as microsoft/unilm ``beit/masking_generator.py``@768a3c8 (unchanged since the release commit 2312c6f) implements it,
with every draw taken from an explicit ``torch.Generator`` (see ``vitkit.data.rng``), never from ``random`` or NumPy.

Algorithm 1 gives the outline: draw a block size ``s >= 16`` and an aspect ratio ``r`` in ``[0.3, 1/0.3]``, mask the
``round(sqrt(s r)) x round(sqrt(s / r))`` block at a uniform position, repeat until 40% of the patches are masked.
The official file fixes the details, and this module follows it:

- the block size is ``Uniform(min_num_patches, budget)`` where ``budget = min(remaining, max_num_patches)``, and
  ``remaining`` is how many patches are still to mask (so near the end ``Uniform(16, 3)`` draws from ``[3, 16]``);
- the aspect ratio is log-uniform in ``[min_aspect, max_aspect]``;
- a block must be strictly smaller than the grid in both sides; its top-left corner is uniform over the positions
  where it fits (``randint(0, H - h)``, both ends included);
- a block is accepted only if it masks ``0 < new <= budget`` patches not masked yet, so the count never overshoots;
- each block gets up to 10 attempts (each attempt draws afresh); when all 10 fail the mask is returned as it is, so
  the count can end below ``num_masking_patches`` (about one mask in three at 14x14 / 75: see
  ``tests/data_masking/README.md``);
- draws per attempt, in order: block size, log aspect, and (only if the block fits) top, then left.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .rng import log_uniform, randrange, uniform

__all__ = ["Block", "BlockwiseMasking"]

ATTEMPTS = 10  # per block, official ``_mask``: ``for attempt in range(10)``


@dataclass(frozen=True)
class Block:
    """One accepted block: its top-left corner, its sides, and how many of its patches it newly masked."""

    top: int
    left: int
    height: int
    width: int
    new: int


class BlockwiseMasking:
    """A ``(h, w)`` boolean mask of patches to hide (True = masked), drawn block by block from a generator.

    Defaults are the official pre-training ones (``run_beit_pretraining.py``: ``--num_mask_patches 75``,
    ``--min_mask_patches_per_block 16``, ``--max_mask_patches_per_block None``; aspect ``0.3``): for a 224 px image and
    16 px patches, ``BlockwiseMasking((14, 14), 75)``."""

    def __init__(self, grid: int | tuple[int, int], num_masking_patches: int, min_num_patches: int = 16,
                 max_num_patches: int | None = None, min_aspect: float = 0.3, max_aspect: float | None = None):
        self.grid = (grid, grid) if isinstance(grid, int) else (int(grid[0]), int(grid[1]))
        self.num_masking_patches = num_masking_patches
        self.min_num_patches = min_num_patches
        self.max_num_patches = num_masking_patches if max_num_patches is None else max_num_patches
        if min_aspect <= 0:
            raise ValueError(f"min_aspect must be > 0, got {min_aspect}")
        self.aspect = (min_aspect, 1 / min_aspect if max_aspect is None else max_aspect)
        self._validate()

    def _validate(self) -> None:
        (h, w), (lo, hi) = self.grid, self.aspect
        if h < 1 or w < 1:
            raise ValueError(f"grid must be at least 1x1, got {self.grid}")
        if not 0 <= self.num_masking_patches <= h * w:
            raise ValueError(f"num_masking_patches must be in [0, {h * w}], got {self.num_masking_patches}")
        if self.min_num_patches < 1 or (self.max_num_patches < 1 and self.num_masking_patches > 0):
            raise ValueError(f"block sizes must be >= 1, got min {self.min_num_patches}, max {self.max_num_patches}")
        if not lo <= hi:
            raise ValueError(f"need min_aspect <= max_aspect, got {self.aspect}")

    def _place(self, mask: torch.Tensor, budget: int, g: torch.Generator) -> Block | None:
        """One block (official ``MaskingGenerator._mask``): up to 10 attempts; None when all fail."""
        H, W = self.grid
        for _ in range(ATTEMPTS):
            area = uniform(g, self.min_num_patches, budget)
            aspect = log_uniform(g, *self.aspect)
            h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if h >= H or w >= W:
                continue
            top, left = randrange(g, 0, H - h + 1), randrange(g, 0, W - w + 1)
            window = mask[top:top + h, left:left + w]
            new = h * w - int(window.sum())
            if 0 < new <= budget:
                window.fill_(True)
                return Block(top, left, h, w, new)
        return None

    def sample(self, g: torch.Generator) -> tuple[torch.Tensor, list[Block]]:
        """The mask and its accepted blocks in order (official ``MaskingGenerator.__call__``): place blocks while
        fewer than ``num_masking_patches`` are masked; stop early when a block cannot be placed."""
        mask = torch.zeros(self.grid, dtype=torch.bool)
        blocks: list[Block] = []
        count = 0
        while count < self.num_masking_patches:
            block = self._place(mask, min(self.num_masking_patches - count, self.max_num_patches), g)
            if block is None:
                break
            blocks.append(block)
            count += block.new
        return mask, blocks

    def __call__(self, g: torch.Generator) -> torch.Tensor:
        """A bool ``(h, w)`` mask; the draws come from ``g`` alone, so the mask is a function of its state."""
        return self.sample(g)[0]

    def describe(self) -> str:
        (h, w), (lo, hi) = self.grid, self.aspect
        return (f"blockwise masking: up to {self.num_masking_patches} of {h}x{w} patches "
                f"({self.num_masking_patches / (h * w):.1%}), blocks of {self.min_num_patches}-{self.max_num_patches} "
                f"patches, aspect {lo:g}-{hi:.3g}, {ATTEMPTS} attempts per block")

    def __repr__(self) -> str:
        return (f"BlockwiseMasking(grid={self.grid}, num_masking_patches={self.num_masking_patches}, "
                f"min_num_patches={self.min_num_patches}, max_num_patches={self.max_num_patches}, "
                f"min_aspect={self.aspect[0]:g}, max_aspect={self.aspect[1]:.4g})")
