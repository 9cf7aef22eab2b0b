"""Window multi-head self-attention with a relative-position bias, on regular or cyclically shifted windows (Swin,
Liu et al. 2021, §3.2 and Fig. 4), for channels-last feature maps (B, H, W, C).

    Attention(Q, K, V) = SoftMax(Q Kᵀ / √d + B) V                      (Swin eq. 4)

computed independently inside every Wh×Ww window; B is read from a learned ((2Wh−1)(2Ww−1), heads) table through
``relative_position_index`` (``vitkit.layers.pos_embed_rel``). The conventions are microsoft/Swin-Transformer's
(``models/swin_transformer.py``):

- window partition in row-major order: window (r, c) of image b is row ``b·nW + r·(Wp/Ww) + c`` of the window batch,
  and its tokens are listed row by row;
- shifted windows (SW-MSA): ``torch.roll`` by (−s_h, −s_w) before the partition and (+s_h, +s_w) after it; token
  pairs that the roll brought together from different image regions get ``mask_fill`` (−100, not −inf) added to
  their logits, the regions being labelled with the official slices (0, −W), (−W, −s), (−s, None) per axis;
- a map whose sides are not multiples of the window is zero-padded at the bottom and right before the shift and
  cropped after it, the mask being built on the padded grid (Swin's detection backbone and transformers'
  ``SwinLayer.maybe_pad``; timm pads after the shift, which differs on padded maps).

The layer records per-window probabilities (layout in ``WindowAttention.attn_layout``); ``window_attention_to_grid``
places them back on the image grid. Inference reuses the bias-plus-mask tensor while the table is unchanged.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitkit.layers.attention import RecordsAttention, attend
from vitkit.layers.patch_embed import to_2tuple
from vitkit.layers.pos_embed_rel import num_relative_distances, relative_position_index

__all__ = ["WindowAttention", "window_partition", "window_reverse", "padded_grid", "shifted_window_mask",
           "shifted_window_order", "window_attention_to_grid", "table_window"]

_compiling = getattr(torch.compiler, "is_compiling", lambda: False)


def padded_grid(grid: tuple[int, int], window: tuple[int, int]) -> tuple[int, int]:
    """The grid rounded up to whole windows."""
    return -(-grid[0] // window[0]) * window[0], -(-grid[1] // window[1]) * window[1]


def window_partition(x: Tensor, window: tuple[int, int]) -> Tensor:
    """(B, H, W, C) with H, W multiples of the window → (B·nW, Wh·Ww, C), windows and tokens in row-major order."""
    B, H, W, C = x.shape
    wh, ww = window
    x = x.view(B, H // wh, wh, W // ww, ww, C).permute(0, 1, 3, 2, 4, 5)  # (B, H/Wh, W/Ww, Wh, Ww, C)
    return x.reshape(-1, wh * ww, C)  # (B·nW, N, C)


def window_reverse(windows: Tensor, window: tuple[int, int], grid: tuple[int, int]) -> Tensor:
    """Inverse of ``window_partition``: (B·nW, Wh·Ww, C) → (B, H, W, C) for the (H, W) grid."""
    (wh, ww), (H, W), C = window, grid, windows.shape[-1]
    x = windows.view(-1, H // wh, W // ww, wh, ww, C).permute(0, 1, 3, 2, 4, 5)  # (B, H/Wh, Wh, W/Ww, Ww, C)
    return x.reshape(-1, H, W, C)  # (B, H, W, C)


def shifted_window_mask(grid: tuple[int, int], window: tuple[int, int], shift: tuple[int, int],
                        fill: float = -100.0) -> Tensor:
    """SW-MSA mask (nW, N, N) for a grid of whole windows: 0 where query and key come from the same region of the
    un-shifted image, ``fill`` elsewhere (Swin ``SwinTransformerBlock.__init__``)."""
    def regions(size: int, w: int, s: int) -> Tensor:  # official slices (0, -w), (-w, -s), (-s, None)
        i = torch.arange(size)
        return (i >= size - w).long() + (i >= size - s).long()
    labels = regions(grid[0], window[0], shift[0])[:, None] * 3 + regions(grid[1], window[1], shift[1])[None, :]
    labels = window_partition(labels[None, :, :, None].float(), window)[..., 0]  # (nW, N)
    return torch.where(labels[:, None, :] != labels[:, :, None], fill, 0.0)  # (nW, N, N)


@functools.lru_cache(maxsize=64)
def shifted_window_order(padded: tuple[int, int], window: tuple[int, int], shift: tuple[int, int]) -> Tensor:
    """(nW·N,) position on the flattened (Hp, Wp) map of every window token, windows and tokens in row-major order,
    after the cyclic shift: ``x.flatten(1, 2)[:, order]`` is roll(−s) + ``window_partition`` in one copy, and its
    inverse permutation puts the windows back (roll(+s) + ``window_reverse``)."""
    with torch.device("cpu"):
        Hp, Wp = padded
        rows = (torch.arange(Hp) + shift[0]) % Hp  # torch.roll by -s puts row (r + s) mod Hp at row r
        cols = (torch.arange(Wp) + shift[1]) % Wp
        flat = (rows[:, None] * Wp + cols[None, :])[None, :, :, None]  # (1, Hp, Wp, 1)
        return window_partition(flat, window).flatten()  # (nW·N,)


@functools.lru_cache(maxsize=64)
def _computed_buffers(grid: tuple[int, int], window: tuple[int, int], shift: tuple[int, int],
                      fill: float) -> tuple[Tensor, Tensor | None]:
    """(relative-position index, SW-MSA mask or None), computed on the CPU once per geometry (the blocks of a stage
    share it; every layer registers its own copy)."""
    with torch.device("cpu"):  # index arithmetic, not weights: also quick when the model is built on "meta"
        mask = shifted_window_mask(padded_grid(grid, window), window, shift, fill) if any(shift) else None
        return relative_position_index(window), mask


class WindowAttention(RecordsAttention):
    """W-MSA (``shift`` = 0) or SW-MSA on (B, H, W, C) maps built for an (H, W) ``grid`` (other sizes work too:
    their mask is computed on the fly). Fused qkv in (q, k, v) order, heads of C / num_heads channels.

    Buffers, saved as the official Swin saves them: ``relative_position_index`` (N, N) and, for shifted windows,
    ``attn_mask`` (nW, N, N) of the padded grid; both are computed, and a checkpoint's copies are only checked.
    ``qk_scale`` replaces the d^-½ scale (official Swin ``qk_scale``).
    """

    attn_layout = ("(B·nW, heads, N, N): one row per window of the shifted, padded grid (window w of image b at "
                   "b·nW + w, windows row-major), N = Wh·Ww tokens of a window in row-major order; info: grid "
                   "(H, W), padded_grid, window, shift; vitkit.layers.window_attention.window_attention_to_grid "
                   "places them on the image")

    def __init__(self, dim: int, num_heads: int, grid: int | tuple[int, int], window: int | tuple[int, int],
                 shift: int | tuple[int, int] = 0, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, mask_fill: float = -100.0, qk_scale: float | None = None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.grid, self.window, self.shift = to_2tuple(grid), to_2tuple(window), to_2tuple(shift)
        if not all(0 <= s < w for s, w in zip(self.shift, self.window)):
            raise ValueError(f"shift {self.shift} must be in [0, window) for window {self.window}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = qk_scale or self.head_dim ** -0.5  # the official ``qk_scale or head_dim ** -0.5``
        self.mask_fill = mask_fill
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(num_relative_distances(self.window), num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        index, mask = _computed_buffers(self.grid, self.window, self.shift, mask_fill)
        device = self.relative_position_bias_table.device
        self.register_buffer("relative_position_index", index.to(device, copy=True))
        self.register_buffer("attn_mask", mask.to(device, copy=True) if mask is not None else None)
        order = shifted_window_order(padded_grid(self.grid, self.window), self.window, self.shift)
        self.register_buffer("_order", order.to(device, copy=True), persistent=False)  # gather: map → windows
        self.register_buffer("_inverse", order.argsort().to(device), persistent=False)  # gather: windows → map
        self._bias_cache: tuple[tuple, Tensor] | None = None

    @property
    def shifted(self) -> bool:
        return any(self.shift)

    def mask_for(self, grid: tuple[int, int]) -> Tensor | None:
        """The SW-MSA mask of an (H, W) map (built on its padded grid); None for regular windows."""
        if not self.shifted:
            return None
        return shifted_window_mask(padded_grid(grid, self.window), self.window, self.shift, self.mask_fill)

    # ---------------------------------------------------------------------------------------------------- forward
    def forward(self, x: Tensor) -> Tensor:
        """Pad, cyclic shift (Fig. 4) and partition, attention in every window, then the reverse: (B, H, W, C) →
        (B, H, W, C). The shift and the partition are one gather of the map's rows (``shifted_window_order``)."""
        B, H, W, C = x.shape
        Hp, Wp = padded_grid((H, W), self.window)
        if (Hp, Wp) != (H, W):
            x = F.pad(x, (0, 0, 0, Wp - W, 0, Hp - H))  # (B, Hp, Wp, C), zeros at the bottom and right
        order, inverse = self._orders((H, W), (Hp, Wp))
        N = self.window[0] * self.window[1]
        windows = x.reshape(B, Hp * Wp, C).index_select(1, order).view(-1, N, C)  # (B·nW, N, C): partition(roll(x))
        windows = self.attend_windows(windows, B, (H, W), (Hp, Wp))
        x = windows.view(B, Hp * Wp, C).index_select(1, inverse).view(B, Hp, Wp, C)  # roll(reverse(windows), +s)
        return x[:, :H, :W] if (Hp, Wp) != (H, W) else x  # (B, H, W, C)

    def _orders(self, grid: tuple[int, int], padded: tuple[int, int]) -> tuple[Tensor, Tensor]:
        if grid == self.grid:
            return self._order, self._inverse
        order = shifted_window_order(padded, self.window, self.shift).to(self._order.device)
        return order, order.argsort()

    def attend_windows(self, windows: Tensor, batch: int, grid: tuple[int, int], padded: tuple[int, int]) -> Tensor:
        """Eq. 4 in every window: (B·nW, N, C) → (B·nW, N, C)."""
        Bw, N, C = windows.shape
        qkv = self.qkv(windows).reshape(Bw, N, 3, self.num_heads, self.head_dim)  # (B·nW, N, 3, h, d)
        qkv = qkv.permute(2, 0, 3, 1, 4)  # (3, B·nW, h, N, d)
        q, k, v = qkv.unbind(0)
        bias = self.attention_bias(grid, batch).to(q.dtype)
        x = attend(q, k, v, scale=self.scale, bias=bias, dropout_p=self.attn_drop if self.training else 0.0,
                   record=self.attn_recorder, grid=grid, padded_grid=padded, window=self.window, shift=self.shift)
        x = x.transpose(1, 2).reshape(Bw, N, C)  # (B·nW, N, C)
        return self.proj_drop(self.proj(x))

    def attention_bias(self, grid: tuple[int, int], batch: int) -> Tensor:
        """B of eq. 4 plus the SW-MSA mask: (1, h, N, N) for regular windows, (B·nW, h, N, N) for shifted ones."""
        bias = self._window_bias(grid)  # (1 or nW, h, N, N)
        if bias.shape[0] == 1:
            return bias
        nW, h, N, _ = bias.shape
        return bias.unsqueeze(0).expand(batch, -1, -1, -1, -1).reshape(batch * nW, h, N, N)

    def _window_bias(self, grid: tuple[int, int]) -> Tensor:
        """Relative-position bias (+ mask) per window, (1 or nW, h, N, N). Without autograd it is kept between calls
        and rebuilt when the table or a buffer is changed in place (a version counter moves) or moves device/dtype; with
        autograd on it is always rebuilt, so gradients reach the table."""
        table = self.relative_position_bias_table
        cacheable = not (torch.is_grad_enabled() or table.is_inference() or _compiling() or torch.jit.is_tracing())
        key = (grid, table.device, table.dtype, *[(t._version, t.data_ptr()) for t in (
            table, self.relative_position_index, self.attn_mask) if t is not None]) if cacheable else None
        if key is not None and self._bias_cache is not None and self._bias_cache[0] == key:
            return self._bias_cache[1]
        N = self.window[0] * self.window[1]
        bias = table[self.relative_position_index.view(-1)].view(N, N, -1).permute(2, 0, 1)  # (h, N, N)
        mask = self.attn_mask if grid == self.grid else self.mask_for(grid)
        bias = bias.unsqueeze(0) if mask is None else bias.unsqueeze(0) + mask.to(bias).unsqueeze(1)  # (nW, h, N, N)
        bias = bias.contiguous()
        self._bias_cache = (key, bias) if key is not None else None
        return bias

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, grid={self.grid}, window={self.window}, shift={self.shift}"


# ------------------------------------------------------------------------------------------ maps on the image grid
def window_attention_to_grid(attn: Tensor, info: dict[str, Any], query: tuple[int, int] | None = None) -> Tensor:
    """Place a ``WindowAttention`` recording on the image: for each query token, its attention over its window as an
    (H, W) map, zero outside the window.

    ``attn`` (B·nW, h, N, N) and ``info`` are what ``record_attention`` stored for the layer (``maps[name]``,
    ``maps.info[name]``). Returns (B, h, H·W, H, W), queries in row-major order, or (B, h, H, W) for one
    ``query=(row, col)``. Padding tokens are dropped, so a row near a padded border sums to less than 1.
    """
    (H, W), (Hp, Wp) = info["grid"], info["padded_grid"]
    window, shift = info["window"], info["shift"]
    pos = shifted_window_order((Hp, Wp), window, shift).to(attn.device).view(-1, window[0] * window[1])  # (nW, N)
    nW, N = pos.shape
    B, h = attn.shape[0] // nW, attn.shape[1]
    attn = attn.reshape(B, nW, h, N, N).transpose(1, 2)  # (B, h, nW, N, N)
    if query is not None:
        if not (0 <= query[0] < H and 0 <= query[1] < W):
            raise ValueError(f"query {tuple(query)} is outside the {H}x{W} grid")
        target = query[0] * Wp + query[1]
        w, i = (pos == target).nonzero()[0].tolist()
        out = attn.new_zeros(B, h, Hp * Wp)
        out[:, :, pos[w]] = attn[:, :, w, i]  # (B, h, N) → the query's window
        return out.view(B, h, Hp, Wp)[:, :, :H, :W]
    dense = attn.new_zeros(B, h, Hp * Wp, Hp * Wp)
    dense[:, :, pos[:, :, None], pos[:, None, :]] = attn  # (B, h, query, key) on the padded image
    dense = dense.view(B, h, Hp, Wp, Hp, Wp)[:, :, :H, :W, :H, :W]  # drop padding queries and keys
    return dense.reshape(B, h, H * W, H, W)


# ------------------------------------------------------------------------------------ checkpoint buffers and tables
def table_window(rows: int) -> tuple[int, int] | None:
    """The square W×W window whose relative-position table has ``rows`` = (2W − 1)² rows, or None."""
    side = math.isqrt(rows)
    return ((side + 1) // 2,) * 2 if side * side == rows and side % 2 else None
