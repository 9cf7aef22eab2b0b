"""Relative-position bias: the index that maps every (query, key) pair of a window to a row of a learned table, and
the resizing of that table for another window size.

Index convention (Swin ``WindowAttention``, BEiT ``Attention``; Swin paper eq. 4, BEiT §2.2): for a Wh×Ww window the
table holds (2Wh−1)(2Ww−1) rows, one per relative offset (dy, dx); the pair (i, j) reads row
(dy + Wh − 1)·(2Ww − 1) + (dx + Ww − 1) with (dy, dx) = coords(i) − coords(j) in row-major (ij) order. BEiT's models
with a class token add three rows after those: class-to-token, token-to-class and class-to-class.

Several ways to resize a table exist, and they differ by about 1e-2 in the logits, so the load report names the one
used:
- ``"bicubic"``: ``F.interpolate`` of the (2W−1)×(2W−1) grid per head (Swin's official ``utils.load_pretrained``);
- ``"bilinear"``: the same with ``mode='bilinear'`` (``align_corners=False``, no antialiasing), what transformers'
  ``BeitRelativePositionBias.forward`` does at every forward for another input size (``models/beit/modeling_beit.py``,
  5.25.0; it reads the grid as (width, height), which only matters for non-square grids);
- ``"geometric"``: BEiT's fine-tuning code (``run_class_finetuning.py``) places the old offsets on a geometric
  progression that spans the new table and interpolates each head with a cubic spline (scipy's ``interp2d(kind=
  'cubic')``, the same bicubic interpolating spline as ``RectBivariateSpline(kx=3, ky=3, s=0)``); needs scipy.
  ``"geometric_linear"`` interpolates linearly on the same positions (timm's default without scipy).
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["relative_position_index", "resize_rel_pos_bias_table", "num_relative_distances", "RelativePositionBias",
           "RESIZE_METHODS"]

RESIZE_METHODS = ("bicubic", "bilinear", "geometric", "geometric_linear")


def num_relative_distances(window: tuple[int, int]) -> int:
    return (2 * window[0] - 1) * (2 * window[1] - 1)


def relative_position_index(window: tuple[int, int], class_token: bool = False) -> Tensor:
    """(N, N) int64 index into the bias table for a window of N = Wh·Ww tokens; (N + 1, N + 1) with BEiT's class-token
    rows (index 0 is the class token)."""
    Wh, Ww = window
    coords = torch.stack(torch.meshgrid(torch.arange(Wh), torch.arange(Ww), indexing="ij")).flatten(1)  # (2, N)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # (N, N, 2) offsets (dy, dx)
    index = (rel[..., 0] + Wh - 1) * (2 * Ww - 1) + (rel[..., 1] + Ww - 1)  # (N, N)
    if class_token:
        n = num_relative_distances(window)
        index = F.pad(index, (1, 0, 1, 0))  # (N + 1, N + 1)
        index[0, :] = n  # class to token
        index[:, 0] = n + 1  # token to class
        index[0, 0] = n + 2  # class to class
    return index.contiguous()


class RelativePositionBias(nn.Module):
    """A learned relative-position bias for the Wh×Ww token grid of a window (or of a whole image, BEiT), with BEiT's
    three class-token rows when ``class_token``: ``forward()`` returns the (heads, N, N) additive attention bias
    B[h, i, j] = table[index[i, j], h] (official ``RelativePositionBias`` / ``Attention``, timm's names).

    ``relative_position_index`` is a persistent buffer because official release files carry it; the loader checks it
    against this one (``vitkit.weights.adapt.reconcile_buffers``) instead of trusting it.
    """

    def __init__(self, window: tuple[int, int], num_heads: int, class_token: bool = False):
        super().__init__()
        self.window = (int(window[0]), int(window[1]))
        self.class_token = class_token
        rows = num_relative_distances(self.window) + (3 if class_token else 0)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(rows, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(self.window, class_token))

    def forward(self) -> Tensor:
        """(heads, N, N), gathered straight into the layout attention reads: one pass over N² · heads values, no
        permuted copy. Not cached: it costs well under 1% of a BEiT-B block (measured), and a cache would hold
        (heads, N, N) per block (1.6 GB for BEiT-L at 512 px)."""
        return self.relative_position_bias_table.t()[:, self.relative_position_index]  # (heads, N, N)

    def extra_repr(self) -> str:
        heads = self.relative_position_bias_table.shape[1]
        return f"window={self.window}, heads={heads}, class_token={self.class_token}"


def resize_rel_pos_bias_table(table: Tensor, old_window: tuple[int, int], new_window: tuple[int, int],
                              extra_rows: int = 0,
                              method: Literal["bicubic", "bilinear", "geometric", "geometric_linear"] = "bicubic"
                              ) -> Tensor:
    """Resize a ((2Wh−1)(2Ww−1) + extra_rows, heads) table from ``old_window`` to ``new_window``; the extra rows (BEiT's
    class-token entries) are kept as they are. Returns a new float tensor in the input dtype."""
    if method not in RESIZE_METHODS:
        raise ValueError(f"unknown relative-position resize method {method!r}; choose from {RESIZE_METHODS}")
    src = (2 * old_window[0] - 1, 2 * old_window[1] - 1)
    dst = (2 * new_window[0] - 1, 2 * new_window[1] - 1)
    if table.shape[0] != src[0] * src[1] + extra_rows:
        raise ValueError(f"a table of {table.shape[0]} rows does not fit window {old_window} + {extra_rows} extra rows")
    if src == dst:
        return table.clone()
    grid, extra = table[: src[0] * src[1]], table[src[0] * src[1]:]
    heads = table.shape[1]
    grid = grid.float().t().reshape(heads, *src)  # (heads, 2Wh-1, 2Ww-1)
    if method in ("bicubic", "bilinear"):
        out = F.interpolate(grid[None], size=dst, mode=method, align_corners=False)[0]
    else:
        out = _geometric_resize(grid, src, dst, cubic=method == "geometric")
    out = out.reshape(heads, dst[0] * dst[1]).t()  # (rows, heads)
    return torch.cat([out.to(table.dtype), extra], dim=0)


def _geometric_offsets(src: int, dst: int) -> list[float]:
    """BEiT's positions of the ``src`` old offsets inside a ``dst``-wide table: a geometric progression whose ratio is
    found by bisection so that its half-width reaches dst // 2 (run_class_finetuning.py)."""
    left, right = 1.01, 1.5
    while right - left > 1e-6:
        q = (left + right) / 2.0
        if (1.0 - q ** (src // 2)) / (1.0 - q) > dst // 2:
            right = q
        else:
            left = q
    dis, cur = [], 1.0
    for i in range(src // 2):
        dis.append(cur)
        cur += q ** (i + 1)
    return [-d for d in reversed(dis)] + [0.0] + dis


def _geometric_resize(grid: Tensor, src: tuple[int, int], dst: tuple[int, int], cubic: bool) -> Tensor:
    ys, xs = _geometric_offsets(src[0], dst[0]), _geometric_offsets(src[1], dst[1])
    ty, tx = dst[0] // 2, dst[1] // 2
    new_y = torch.arange(-ty, ty + 1, dtype=torch.float64)
    new_x = torch.arange(-tx, tx + 1, dtype=torch.float64)
    if cubic:
        if min(src) < 4:  # a cubic spline needs at least 4 points per axis (scipy: m > k)
            raise ValueError(f"the 'geometric' (cubic) resize needs a window of at least 3x3 tokens, got a "
                             f"{(src[0] + 1) // 2}x{(src[1] + 1) // 2} one; choose 'geometric_linear' or 'bicubic'")
        try:
            from scipy.interpolate import RectBivariateSpline
        except ImportError:  # pragma: no cover - scipy comes with the train and test extras
            raise ImportError("the 'geometric' relative-position resize needs scipy: pip install scipy, "
                              "or choose 'geometric_linear' or 'bicubic'") from None
        out = [torch.from_numpy(RectBivariateSpline(ys, xs, g.double().numpy(), kx=3, ky=3, s=0)(new_y.numpy(),
                                                                                                  new_x.numpy()))
               for g in grid]
        return torch.stack(out).float()
    return _bilinear_on_grid(grid.double(), torch.tensor(ys), torch.tensor(xs), new_y, new_x).float()


def _bilinear_on_grid(z: Tensor, ys: Tensor, xs: Tensor, new_y: Tensor, new_x: Tensor) -> Tensor:
    """Linear interpolation of (heads, len(ys), len(xs)) values given on a non-uniform grid, at new_y × new_x
    (clamped to the grid's extent)."""
    def bracket(points: Tensor, at: Tensor) -> tuple[Tensor, Tensor]:
        i = torch.searchsorted(points, at.clamp(points[0], points[-1]), right=True).clamp(1, len(points) - 1) - 1
        w = ((at.clamp(points[0], points[-1]) - points[i]) / (points[i + 1] - points[i])).clamp(0, 1)
        return i, w
    iy, wy = bracket(ys, new_y)
    ix, wx = bracket(xs, new_x)
    top = z[:, iy][:, :, ix] * (1 - wx) + z[:, iy][:, :, ix + 1] * wx  # (heads, new_h, new_w)
    bottom = z[:, iy + 1][:, :, ix] * (1 - wx) + z[:, iy + 1][:, :, ix + 1] * wx
    return top * (1 - wy)[:, None] + bottom * wy[:, None]
