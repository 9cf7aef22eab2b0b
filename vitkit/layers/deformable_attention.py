"""Deformable multi-head attention (Xia et al., "Vision Transformer with Deformable Attention", CVPR 2022, §3.2-3.3;
DAT++, arXiv 2309.01430, §3), for channels-last feature maps (B, H, W, C):

    q = x W_q,   Δp = θ_offset(q),   x̃ = φ(x; p + Δp),   k̃ = x̃ W_k,   ṽ = x̃ W_v            (DAT eq. 9-11)
    z⁽ᵐ⁾ = σ(q⁽ᵐ⁾ k̃⁽ᵐ⁾ᵀ / √d + φ(B̂; R)) ṽ⁽ᵐ⁾,   z = Concat(z⁽¹⁾ … z⁽ᴹ⁾) W_o                      (eq. 12)

- offset network θ_offset, one per group of channels and shared by that group's heads (official ``conv_offset``):
  depth-wise k×k conv (stride s, the sampling stride) → LayerNorm → GELU → 1×1 projection to 2 channels (no bias),
  giving (Δy, Δx) on an Hk×Wk grid of reference points p;
- offsets bounded by ``offset_range_factor`` > 0: Δp = tanh(Δp) · factor / (Hk, Wk) (normalised units; DAT v1
  ``dat_blocks.py``) or · factor / (Hk − 1, Wk − 1) (DAT++); a negative factor leaves them unbounded and squashes
  p + Δp into [−1, 1] with tanh (v1) or a clamp (DAT++); a factor of 0 means what each version's code makes of it,
  raw p + Δp in v1 (neither bounded nor squashed), Δp = 0 in DAT++ (its bound, times 0);
- φ(x; ·) = ``F.grid_sample(bilinear, align_corners=True)`` of each group's channels at the deformed points, keys
  and values projected from those samples, queries from every position;
- position encoding (the official ``use_pe`` and its switches), one of:
  "table": relative-position bias at the deformed points, R = (query position − sampled position) / 2 in normalised
  coordinates, the bias ``grid_sample`` (bilinear, align_corners=True) of a (heads, 2H − 1, 2W − 1) table
  ``rpe_table`` at R (both versions); "log_cpb": DAT++'s log-spaced continuous bias, an MLP 2 → 32 → heads/groups
  (ReLU) of sign(4R') · log2(1 + |4R'|) / 3, with R' the un-halved displacement (Swin v2's log-CPB); "fixed": a
  learned bias for every (query, key-grid point) pair, a (heads, H·W, Hk·Wk) ``rpe_table`` added as it is, whatever
  the offsets (official ``fixed_pe``); "dwc": no bias but a depth-wise 3×3 conv of the queries added to the attention
  output, z = Attn(…) + DWConv(q) (official ``dwc_pe``, the ``residual_lepe`` of CSWin's locally-enhanced PE);
- without offsets (DAT++'s ``no_off`` ablation): keys and values from the s×s average-pooled map, the reference
  points as positions, no position encoding (the official code builds none).

``convention`` names the coordinate conventions of the two official code versions (everything else is an explicit
argument): "over_n" (LeapLabTHU/DAT@566a593, CVPR 2022) normalises point i of an n-point axis as (i + 0.5) / n · 2 − 1
for both reference points and queries; "over_n_minus_1" (the repository head, DAT++) puts reference points at
(i + 0.5) / (n − 1) · 2 − 1 and queries at i / (n − 1) · 2 − 1.

The sampling positions and reference points of every call reach the attention recorder (``record_attention``) as
``info["positions"]`` / ``info["references"]``, (B, groups, Hk, Wk, 2) in normalised (y, x) order;
``points_to_pixels`` converts them to pixel coordinates of the input image.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitkit.layers.attention import RecordsAttention, attend
from vitkit.layers.patch_embed import to_2tuple

__all__ = ["DeformableAttention", "OffsetNetwork", "reference_points", "points_to_pixels", "key_grid"]

Convention = Literal["over_n", "over_n_minus_1"]
PositionEncoding = Literal["table", "log_cpb", "fixed", "dwc"]


def key_grid(grid: tuple[int, int], kernel: int, stride: int, padding: int) -> tuple[int, int]:
    """(Hk, Wk): the offset network's output grid (its depth-wise conv) on an (H, W) map."""
    return tuple((n + 2 * padding - kernel) // stride + 1 for n in grid)


def reference_points(n: tuple[int, int], convention: Convention, *, queries: bool = False, dtype=torch.float32,
                     device=None) -> Tensor:
    """(n_h, n_w, 2) normalised (y, x) coordinates of an n_h×n_w grid of points (module docstring): the reference
    points of the sampling grid, or with ``queries`` the query positions the bias displacement starts from."""
    axes = []
    for size in n:
        if convention == "over_n_minus_1" and queries:
            axis = torch.arange(size, dtype=dtype, device=device)
        else:
            axis = torch.linspace(0.5, size - 0.5, size, dtype=dtype, device=device)
        denominator = size if convention == "over_n" else size - 1.0
        axes.append(axis.div(denominator).mul(2.0).sub(1.0))  # the official order of the float operations
    y, x = torch.meshgrid(*axes, indexing="ij")
    return torch.stack((y, x), -1)  # (n_h, n_w, 2)


def points_to_pixels(points: Tensor, grid: tuple[int, int], img_size: tuple[int, int]) -> Tensor:
    """Normalised (y, x) points on an H×W feature map, as ``grid_sample(align_corners=True)`` reads them, → (x, y)
    pixel coordinates of the input image (continuous: pixel (0, 0) covers [0, 1)²). Map position u ∈ [−1, 1] is
    feature index (u + 1) / 2 · (n − 1), whose centre lies at (index + 0.5) · (image size / n) in the image."""
    (H, W), (img_h, img_w) = to_2tuple(grid), to_2tuple(img_size)
    y = ((points[..., 0] + 1) / 2 * (H - 1) + 0.5) * (img_h / H)
    x = ((points[..., 1] + 1) / 2 * (W - 1) + 0.5) * (img_w / W)
    return torch.stack((x, y), -1)


class OffsetNetwork(nn.Module):
    """θ_offset of one group (DAT §3.2, official ``conv_offset``): depth-wise conv → LayerNorm → GELU → 1×1 to
    (Δy, Δx). (B·g, C_g, H, W) → (B·g, Hk, Wk, 2)."""

    def __init__(self, channels: int, kernel: int, stride: int, padding: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel, stride, padding, groups=channels)
        self.norm = nn.LayerNorm(channels)
        self.act = nn.GELU()
        self.proj = nn.Linear(channels, 2, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x).permute(0, 2, 3, 1)  # (B·g, Hk, Wk, C_g)
        return self.proj(self.act(self.norm(x)))  # (B·g, Hk, Wk, 2)


class DeformableAttention(RecordsAttention):
    """Deformable attention over an (H, W) map ``grid`` (module docstring). Projections are dense layers on channels
    (the official 1×1 convs), named as the official ``DAttentionBaseline`` (``proj_q/k/v``, ``rpe_table``) except the
    output projection, ``proj`` as in every vitkit attention layer (official ``proj_out``).

    ``position_encoding`` (module docstring): "table" (``rpe_table``, (heads, 2H_t − 1, 2W_t − 1) for ``table_grid``
    = (H_t, W_t), the grid by default; sampled in normalised coordinates, so another map size reads the same table),
    "log_cpb" (``rpe_mlp``), "fixed" (``rpe_table``, (heads, H_t·W_t, Hk·Wk): the map must be the table's), "dwc"
    (``lepe``) or None. ``offsets=False``: no offsets, keys from the average-pooled map (DAT++ ``no_off``).
    ``offset_kernel`` / ``offset_padding``: the offset network's depth-wise conv.
    """

    attn_layout = ("(B, heads, H·W, Hk·Wk): every query (row-major) over the keys sampled at the deformed points "
                   "(row-major on the Hk×Wk grid of reference points, one grid per group of heads); info: grid (H, W), "
                   "sample_grid (Hk, Wk), groups, positions and references (B, groups, Hk, Wk, 2) normalised (y, x) "
                   "for grid_sample(align_corners=True); vitkit.layers.deformable_attention.points_to_pixels "
                   "converts them to image pixels")

    def __init__(self, dim: int, num_heads: int, groups: int, grid: int | tuple[int, int], *, stride: int = 1,
                 offset_kernel: int = 3, offset_padding: int | None = None, offset_range_factor: float = 2.0,
                 position_encoding: PositionEncoding | None = "table", offsets: bool = True,
                 table_grid: int | tuple[int, int] | None = None, convention: Convention = "over_n",
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads or num_heads % groups:
            raise ValueError(f"dim {dim}, heads {num_heads} and groups {groups} must divide each other")
        self.grid, self.num_heads, self.groups = to_2tuple(grid), num_heads, groups
        self.head_dim, self.convention = dim // num_heads, convention
        self.scale = self.head_dim ** -0.5
        self.offset_range_factor = offset_range_factor
        padding = offset_kernel // 2 if offset_padding is None else offset_padding
        self.offsets = OffsetNetwork(dim // groups, offset_kernel, stride, padding)
        self.stride, self.use_offsets = stride, offsets
        if not offsets:  # official no_off: the network is built (and saved) but frozen and never read
            self.offsets.requires_grad_(False)
            position_encoding = None  # ... and no position encoding is built
        self.proj_q, self.proj_k, self.proj_v = (nn.Linear(dim, dim) for _ in range(3))
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = attn_drop
        self.proj_drop = nn.Dropout(proj_drop)
        self.position_encoding = position_encoding
        self.rpe_table = self.rpe_mlp = self.lepe = None
        th, tw = to_2tuple(table_grid or self.grid)
        if position_encoding == "table":
            self.rpe_table = nn.Parameter(torch.zeros(num_heads, 2 * th - 1, 2 * tw - 1))
        elif position_encoding == "fixed":
            hk, wk = key_grid((th, tw), offset_kernel, stride, padding)
            self.rpe_table = nn.Parameter(torch.zeros(num_heads, th * tw, hk * wk))
        elif position_encoding == "log_cpb":
            self.rpe_mlp = nn.Sequential(nn.Linear(2, 32), nn.ReLU(inplace=True),
                                         nn.Linear(32, num_heads // groups, bias=False))
        elif position_encoding == "dwc":
            self.lepe = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        elif position_encoding is not None:
            raise ValueError(f"position_encoding must be 'table', 'log_cpb', 'fixed', 'dwc' or None, "
                             f"got {position_encoding!r}")
        if self.rpe_table is not None:
            nn.init.trunc_normal_(self.rpe_table, std=0.01)

    # -------------------------------------------------------------------------------------------------- forward
    def forward(self, x: Tensor) -> Tensor:
        """(B, H, W, C) → (B, H, W, C)."""
        B, H, W, C = x.shape
        g, h = self.groups, self.num_heads
        q_map = self.proj_q(x)  # (B, H, W, C)
        sampled, pos, reference = self.sample(x, q_map)  # (B, C, Hk, Wk), (B·g, Hk, Wk, 2), (Hk, Wk, 2)
        Hk, Wk = sampled.shape[-2:]
        sampled = sampled.reshape(B, C, Hk * Wk).transpose(1, 2)  # (B, Ns, C)
        q = q_map.reshape(B, H * W, h, self.head_dim).transpose(1, 2)  # (B, h, H·W, d)
        k = self.proj_k(sampled).view(B, -1, h, self.head_dim).transpose(1, 2)  # (B, h, Ns, d)
        v = self.proj_v(sampled).view(B, -1, h, self.head_dim).transpose(1, 2)
        bias = self.bias_at(pos, (H, W)) if self.position_encoding in ("table", "log_cpb", "fixed") else None
        out = attend(q, k, v, scale=self.scale, bias=bias, dropout_p=self.attn_drop if self.training else 0.0,
                     record=self.attn_recorder, grid=(H, W), sample_grid=(Hk, Wk), groups=g,
                     positions=pos.view(B, g, Hk, Wk, 2), references=reference.expand(B, g, Hk, Wk, 2))
        out = out.transpose(1, 2).reshape(B, H, W, C)  # (B, H, W, C)
        if self.lepe is not None:
            out = out + self.lepe(q_map.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # + DWConv(q), (B, H, W, C)
        return self.proj_drop(self.proj(out))

    def sample(self, x: Tensor, q: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """φ(x; p + Δp): the (B, C, Hk, Wk) features keys and values are projected from, the (B·g, Hk, Wk, 2) points
        they were read at and the (Hk, Wk, 2) reference points. Without offsets: the s×s average-pooled map, read at
        the reference points (clamped to the map when the offsets would be unbounded, as the official code does)."""
        B, H, W, C = x.shape
        if not self.use_offsets:
            pooled = F.avg_pool2d(x.permute(0, 3, 1, 2), self.stride, self.stride)  # (B, C, H/s, W/s)
            reference = reference_points(pooled.shape[-2:], self.convention, dtype=x.dtype, device=x.device)
            pos = self.deformed_points(reference.new_zeros(1, *reference.shape), reference)  # Δp = 0: (1, Hk, Wk, 2)
            return pooled, pos.expand(B * self.groups, -1, -1, -1), reference
        offset = self.offsets(_grouped(q, self.groups))  # (B·g, Hk, Wk, 2)
        reference = reference_points(offset.shape[1:3], self.convention, dtype=x.dtype, device=x.device)  # (Hk, Wk, 2)
        pos = self.deformed_points(offset, reference)  # (B·g, Hk, Wk, 2)
        sampled = F.grid_sample(_grouped(x, self.groups), pos.flip(-1), mode="bilinear", align_corners=True)
        return sampled.reshape(B, C, *offset.shape[1:3]), pos, reference  # (B·g, C/g, Hk, Wk) → (B, C, Hk, Wk)

    def deformed_points(self, offset: Tensor, reference: Tensor) -> Tensor:
        """p + Δp with the offset range of the convention (module docstring): (B·g, Hk, Wk, 2)."""
        Hk, Wk, factor = *offset.shape[1:3], self.offset_range_factor
        if factor > 0 or (factor == 0 and self.convention == "over_n_minus_1"):  # DAT++ bounds for factor >= 0: 0 = no offsets
            n = (Hk, Wk) if self.convention == "over_n" else (Hk - 1.0, Wk - 1.0)
            scale = torch.tensor([1.0 / n[0], 1.0 / n[1]], device=offset.device)
            return offset.tanh().mul(scale).mul(factor) + reference
        pos = offset + reference
        if factor == 0:  # DAT v1: raw offsets, neither bounded nor squashed
            return pos
        return pos.tanh() if self.convention == "over_n" else pos.clamp(-1.0, 1.0)

    def bias_at(self, pos: Tensor, grid: tuple[int, int]) -> Tensor:
        """φ(B̂; R): the bias of every (query, sampled key) pair, (B, h, H·W, Ns)."""
        Bg, Hk, Wk, _ = pos.shape
        g, hg = self.groups, self.num_heads // self.groups
        B, HW, Ns = Bg // g, grid[0] * grid[1], Hk * Wk
        if self.position_encoding == "fixed":  # one learned bias per (query, key-grid point) pair
            return self.rpe_table.to(pos.dtype).expand(B, -1, -1, -1)  # (B, h, H·W, Ns)
        queries = reference_points(grid, self.convention, queries=True, dtype=pos.dtype, device=pos.device)
        displacement = queries.view(1, HW, 1, 2) - pos.view(Bg, 1, Ns, 2)  # (B·g, H·W, Ns, 2) (y, x)
        if self.position_encoding == "log_cpb":
            d = displacement.mul(4.0)
            d = torch.sign(d) * torch.log2(d.abs() + 1.0) / math.log2(8.0)
            bias = self.rpe_mlp(d)  # (B·g, H·W, Ns, h/g)
            return bias.view(B, g, HW, Ns, hg).permute(0, 1, 4, 2, 3).reshape(B, self.num_heads, HW, Ns)
        table = self.rpe_table.to(pos.dtype)
        table = table.view(1, g, hg, *table.shape[1:]).expand(B, -1, -1, -1, -1).reshape(Bg, hg, *table.shape[1:])
        bias = F.grid_sample(table, displacement.mul(0.5).flip(-1), mode="bilinear", align_corners=True)
        return bias.view(B, self.num_heads, HW, Ns)  # (B·g, h/g, H·W, Ns) → (B, h, H·W, Ns)

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, groups={self.groups}, grid={self.grid}, "
                f"offset_range_factor={self.offset_range_factor}, position_encoding={self.position_encoding}, "
                f"offsets={self.use_offsets}, convention={self.convention}")


def _grouped(x: Tensor, groups: int) -> Tensor:
    """(B, H, W, C) → (B·g, C/g, H, W): each group's channels as its own channels-first map (official
    ``'b (g c) h w -> (b g) c h w'``)."""
    B, H, W, C = x.shape
    return x.permute(0, 3, 1, 2).reshape(B * groups, C // groups, H, W)
