"""Neighbourhood attention (Hassani et al., "Neighborhood Attention Transformer", CVPR 2023, arXiv 2204.07143) in plain
PyTorch, with the semantics of the NATTEN kernels DAT++'s 'N' blocks call (SHI-Labs/NATTEN 0.14,
``NATTEN2DQKRPBFunction`` / ``NATTEN2DAVFunction``, dilation 1):

    NA(x)_ij = Σ_{(a, b) ∈ ρ(i, j)} softmax_ab(q_ij · k_ab · d^-½ + B[h, a − i + k − 1, b − j + k − 1]) v_ab

ρ(i, j) is a k×k window of rows s_i … s_i + k − 1 and columns t_j … t_j + k − 1 with s_i = clamp(i − k//2, 0, H − k)
(t_j likewise): a query near the border keeps a full k×k window shifted inside the map (not a zero-padded one), and B
is a learned (heads, 2k − 1, 2k − 1) table (``rpb``) read at the key's offset from the query.

Two exact evaluations, no natten dependency, memory linear in H·W:
- ``neighborhood_attention`` (inference and training): queries in T×T tiles; each tile attends to the (T + k − 1)²
  band of keys that holds all its windows, through ``scaled_dot_product_attention`` with the bias and −inf outside
  each query's window. Memory and work grow as H·W·(T + k − 1)², not (H·W)².
- the explicit path (``record=``): every query's k² neighbours gathered, logits (B, h, H·W, k²) in NATTEN's layout
  (window positions row-major), which the attention recorder receives and the MAC counter counts (H·W·k²·d per
  product, what NATTEN computes).
``neighborhood_attention_dense`` is the brute-force reference: full (H·W)² attention with a mask, for tests and
``python -m vitkit.bench.natten_memory``.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitkit.layers.attention import RecordsAttention

__all__ = ["NeighborhoodAttention", "neighborhood_attention", "neighborhood_attention_dense", "neighborhood_starts",
           "neighborhood_attention_to_grid"]


def neighborhood_starts(n: int, kernel: int) -> Tensor:
    """(n,) first row (or column) of every query's window on an axis of n positions: clamp(i − k//2, 0, n − k)."""
    return (torch.arange(n) - kernel // 2).clamp(0, n - kernel)


def _check(grid: tuple[int, int], kernel: int) -> None:
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"neighbourhood kernel must be odd and positive, got {kernel}")
    if min(grid) < kernel:
        raise ValueError(f"a {grid[0]}x{grid[1]} map is smaller than the {kernel}x{kernel} neighbourhood (pad it first)")


# ----------------------------------------------------------------------------------------------- index tables
def _real_tensors():
    """Real tensors even while ``torch.export`` traces with fake ones: the tables are cached, and a cached fake tensor
    would break every later eager call (as the export's own parity check)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    return unset_fake_temporarily()


@functools.lru_cache(maxsize=32)
def _neighbour_index(grid: tuple[int, int], kernel: int) -> tuple[Tensor, Tensor]:
    """For every query (row-major) its k² neighbours, window row-major: (H·W·k²,) flat key positions and (H·W·k²,)
    rows of the flattened (2k − 1)² bias table. Index arithmetic on the CPU (also under a "meta" default device)."""
    with torch.device("cpu"), _real_tensors():
        return _neighbour_index_cpu(grid, kernel)


def _neighbour_index_cpu(grid: tuple[int, int], kernel: int) -> tuple[Tensor, Tensor]:
    (H, W), k = grid, kernel
    rows = neighborhood_starts(H, k)[:, None] + torch.arange(k)  # (H, k) key rows of each query row
    cols = neighborhood_starts(W, k)[:, None] + torch.arange(k)  # (W, k)
    dr = rows - torch.arange(H)[:, None] + k - 1  # (H, k) offsets into the table
    dc = cols - torch.arange(W)[:, None] + k - 1
    keys = rows[:, None, :, None] * W + cols[None, :, None, :]  # (H, W, k, k)
    table = dr[:, None, :, None] * (2 * k - 1) + dc[None, :, None, :]  # (H, W, k, k)
    return keys.flatten(), table.flatten()


@functools.lru_cache(maxsize=32)
def _tiles(grid: tuple[int, int], kernel: int, tile: int) -> tuple[Tensor, Tensor, Tensor, Tensor, tuple[int, ...]]:
    """The tiling of an H×W map: flat query positions of every T×T tile (the last tiles repeat the border row /
    column), flat key positions of its band, and per (tile, query, band key) the bias-table row and whether the key is
    in the query's window. Returns (queries (nT·T²,), keys (nT·L²,), table (nT, T², L²), inside (nT, T², L²),
    (nTh, nTw, T, Lh, Lw)). Index arithmetic on the CPU (also under a "meta" default device)."""
    with torch.device("cpu"), _real_tensors():
        return _tiles_cpu(grid, kernel, tile)


def _tiles_cpu(grid: tuple[int, int], kernel: int, tile: int) -> tuple[Tensor, Tensor, Tensor, Tensor, tuple[int, ...]]:
    k, T = kernel, tile

    def axis(n: int) -> tuple[Tensor, Tensor, Tensor, Tensor, int, int]:
        nt, L = -(-n // T), min(T + k - 1, n)
        starts = neighborhood_starts(n, k)
        q = (torch.arange(nt)[:, None] * T + torch.arange(T)).clamp(max=n - 1)  # (nt, T) query positions
        band0 = starts[q[:, 0]].clamp(max=n - L)  # every window of the tile lies in [band0, band0 + L)
        key = band0[:, None] + torch.arange(L)  # (nt, L)
        rel = key[:, None, :] - q[:, :, None]  # (nt, T, L) key − query
        s = starts[q][:, :, None]  # (nt, T, 1)
        inside = (key[:, None, :] >= s) & (key[:, None, :] < s + k)
        return q, key, rel + k - 1, inside, nt, L

    (qr, kr, rr, ir, nth, lh), (qc, kc, rc, ic, ntw, lw) = axis(grid[0]), axis(grid[1])
    W = grid[1]
    queries = qr[:, None, :, None] * W + qc[None, :, None, :]  # (nTh, nTw, T, T)
    keys = kr[:, None, :, None] * W + kc[None, :, None, :]  # (nTh, nTw, Lh, Lw)
    table = rr[:, None, :, None, :, None] * (2 * k - 1) + rc[None, :, None, :, None, :]  # (nTh, nTw, T, T, Lh, Lw)
    inside = ir[:, None, :, None, :, None] & ic[None, :, None, :, None, :]
    nT = nth * ntw
    table = table.clamp(0, (2 * k - 1) ** 2 - 1).reshape(nT, T * T, lh * lw)  # outside rows are masked anyway
    return queries.flatten(), keys.flatten(), table, inside.reshape(nT, T * T, lh * lw), (nth, ntw, T, lh, lw)


# ------------------------------------------------------------------------------------------------- attention
def neighborhood_attention(q: Tensor, k: Tensor, v: Tensor, rpb: Tensor | None, kernel: int, *, scale: float,
                           dropout_p: float = 0.0, record: Callable[..., None] | None = None, tile: int | None = None,
                           **info: Any) -> Tensor:
    """NA over an H×W map: q, k, v (B, h, H, W, d), ``rpb`` (h, 2k − 1, 2k − 1) or None → (B, h, H, W, d).

    ``record`` (a layer's ``attn_recorder``) selects the explicit path and receives the (B, h, H·W, k²)
    probabilities with ``info``; otherwise queries are processed in ``tile``×``tile`` tiles (default k)."""
    B, h, H, W, d = q.shape
    _check((H, W), kernel)
    if record is not None:
        return _explicit(q, k, v, rpb, kernel, scale, dropout_p, record, **info)
    T = tile or kernel
    queries, keys, table, inside, (nth, ntw, T, lh, lw) = _tiles((H, W), kernel, T)
    queries, keys, table, inside = (t.to(q.device) for t in (queries, keys, table, inside))
    nT = nth * ntw
    qt = q.flatten(2, 3).index_select(2, queries).view(B, h * nT, T * T, d)  # (B, h·nT, T², d)
    kt = k.flatten(2, 3).index_select(2, keys).view(B, h * nT, lh * lw, d)  # (B, h·nT, L², d)
    vt = v.flatten(2, 3).index_select(2, keys).view(B, h * nT, lh * lw, d)
    bias = torch.zeros((), dtype=q.dtype, device=q.device) if rpb is None else rpb.flatten(1)[:, table].to(q.dtype)
    bias = torch.where(inside, bias, float("-inf")).expand(h, -1, -1, -1)  # (h, nT, T², L²)
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=bias.reshape(1, h * nT, T * T, lh * lw),
                                         dropout_p=dropout_p, scale=scale)  # (B, h·nT, T², d)
    out = out.view(B, h, nth, ntw, T, T, d).transpose(3, 4).reshape(B, h, nth * T, ntw * T, d)
    return out[:, :, :H, :W]  # (B, h, H, W, d): the repeated border queries of the last tiles dropped


def _explicit(q: Tensor, k: Tensor, v: Tensor, rpb: Tensor | None, kernel: int, scale: float, dropout_p: float,
              record: Callable[..., None], chunk_elements: int = 2 ** 24, **info: Any) -> Tensor:
    """Every query's k² neighbours gathered, in chunks of queries whose gathered keys hold about ``chunk_elements``
    values: softmax over (B, h, H·W, k²) logits, handed to ``record``."""
    B, h, H, W, d = q.shape
    keys, table = (t.to(q.device) for t in _neighbour_index((H, W), kernel))
    K, N = kernel * kernel, H * W
    keys, table = keys.view(N, K), table.view(N, K)
    q, k, v = q.flatten(2, 3) * scale, k.flatten(2, 3), v.flatten(2, 3)  # (B, h, H·W, d)
    bias = rpb.flatten(1) if rpb is not None else None  # (h, (2k − 1)²)
    step = max(1, chunk_elements // (B * h * K * d))
    probs, outs = [], []
    for n0 in range(0, N, step):
        idx = keys[n0: n0 + step]  # (n, k²)
        kn = k.index_select(2, idx.flatten()).view(B, h, -1, K, d)  # (B, h, n, k², d)
        attn = torch.einsum("bhnd,bhnkd->bhnk", q[:, :, n0: n0 + step], kn)  # (B, h, n, k²)
        if bias is not None:
            attn = attn + bias[:, table[n0: n0 + step]]
        attn = attn.softmax(dim=-1)
        probs.append(attn)
        vn = v.index_select(2, idx.flatten()).view(B, h, -1, K, d)
        attn = F.dropout(attn, dropout_p, training=dropout_p > 0)
        outs.append(torch.einsum("bhnk,bhnkd->bhnd", attn, vn))  # (B, h, n, d)
    record(torch.cat(probs, dim=2), grid=(H, W), kernel=kernel, **info)
    return torch.cat(outs, dim=2).view(B, h, H, W, d)


def neighborhood_attention_dense(q: Tensor, k: Tensor, v: Tensor, rpb: Tensor | None, kernel: int, *,
                                 scale: float, fused: bool = True) -> Tensor:
    """Brute force, written from the definition alone (no index table of this module): dense (H·W)×(H·W) attention
    whose mask is rpb[h, a − i + k − 1, b − j + k − 1] where key (a, b) lies in the clamped window of query (i, j)
    and −inf elsewhere. O((H·W)²) memory: the reference the tiled and explicit paths are tested against. ``fused``:
    ``scaled_dot_product_attention``, else softmax(q kᵀ · scale + mask) v written out. Shapes as
    ``neighborhood_attention``."""
    B, h, H, W, d = q.shape
    _check((H, W), kernel)

    def axis(n: int) -> tuple[Tensor, Tensor]:  # (query, key) pairs of one axis: in the window?, table offset
        i, a = torch.arange(n)[:, None], torch.arange(n)[None, :]
        start = (i - kernel // 2).clamp(0, n - kernel)
        return (a >= start) & (a < start + kernel), (a - i + kernel - 1).clamp(0, 2 * kernel - 2)

    (in_r, off_r), (in_c, off_c) = axis(H), axis(W)
    inside = (in_r[:, None, :, None] & in_c[None, :, None, :]).reshape(H * W, H * W).to(q.device)
    if rpb is None:
        bias = torch.zeros(h, H * W, H * W, dtype=q.dtype, device=q.device)
    else:
        bias = rpb[:, off_r[:, None, :, None].to(q.device), off_c[None, :, None, :].to(q.device)]  # (h, H, W, H, W)
        bias = bias.reshape(h, H * W, H * W).to(q.dtype)
    mask = bias.masked_fill(~inside, float("-inf"))  # (h, H·W, H·W)
    q, k, v = q.flatten(2, 3), k.flatten(2, 3), v.flatten(2, 3)  # (B, h, H·W, d)
    if fused:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[None], scale=scale)
    else:
        out = ((q * scale) @ k.transpose(-2, -1) + mask).softmax(dim=-1) @ v  # (B, h, H·W, H·W) @ (B, h, H·W, d)
    return out.view(B, h, H, W, d)


# ------------------------------------------------------------------------------------------------------ layer
class NeighborhoodAttention(RecordsAttention):
    """Multi-head neighbourhood attention on channels-last maps (B, H, W, C): fused qkv (q, k, v order), a k×k window
    per query (module docstring), relative-position bias ``rpb`` (heads, 2k − 1, 2k − 1), output projection. Module
    names follow DAT++'s ``models/nat.py`` (``qkv``, ``rpb``, ``proj``).

    A map smaller than the window on a side is zero-padded at the bottom/right before the projections and cropped
    after, as that module does (the padded positions are keys like any other).
    """

    attn_layout = ("(B, heads, H·W, k²): for each query (row-major on the map, padded to at least k×k) its k×k "
                   "neighbourhood window in row-major order, the window clamped inside the map; info: grid (H, W) "
                   "of the attended map, kernel; vitkit.layers.neighborhood_attention.neighborhood_attention_to_grid "
                   "places them on the map")

    def __init__(self, dim: int, num_heads: int, kernel: int, *, qkv_bias: bool = True, rel_pos_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, tile: int | None = None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        if kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"neighbourhood kernel must be odd and positive, got {kernel}")
        self.num_heads, self.head_dim, self.kernel, self.tile = num_heads, dim // num_heads, kernel, tile
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.rpb = nn.Parameter(torch.zeros(num_heads, 2 * kernel - 1, 2 * kernel - 1)) if rel_pos_bias else None
        if self.rpb is not None:
            nn.init.trunc_normal_(self.rpb, std=0.02, a=-2.0, b=2.0)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor) -> Tensor:
        B, H, W, C = x.shape
        Hp, Wp = max(H, self.kernel), max(W, self.kernel)
        if (Hp, Wp) != (H, W):
            x = F.pad(x, (0, 0, 0, Wp - W, 0, Hp - H))  # (B, Hp, Wp, C)
        qkv = self.qkv(x).view(B, Hp, Wp, 3, self.num_heads, self.head_dim).permute(3, 0, 4, 1, 2, 5)
        q, k, v = qkv.unbind(0)  # (B, h, Hp, Wp, d) each
        x = neighborhood_attention(q, k, v, self.rpb, self.kernel, scale=self.scale, tile=self.tile,
                                   dropout_p=self.attn_drop if self.training else 0.0, record=self.attn_recorder)
        x = x.permute(0, 2, 3, 1, 4).reshape(B, Hp, Wp, C)[:, :H, :W]  # (B, H, W, C)
        return self.proj_drop(self.proj(x))

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, kernel={self.kernel}"


def neighborhood_attention_to_grid(attn: Tensor, info: dict[str, Any], query: tuple[int, int] | None = None) -> Tensor:
    """Place a ``NeighborhoodAttention`` recording (B, h, H·W, k²) on its map: (B, h, H·W, H, W) per query, zero
    outside its window, or (B, h, H, W) for one ``query=(row, col)``."""
    (H, W), kernel = info["grid"], info["kernel"]
    keys = _neighbour_index((H, W), kernel)[0].to(attn.device).view(H * W, kernel * kernel)  # (H·W, k²)
    B, h = attn.shape[:2]
    if query is not None:
        if not (0 <= query[0] < H and 0 <= query[1] < W):
            raise ValueError(f"query {tuple(query)} is outside the {H}x{W} grid")
        n = query[0] * W + query[1]
        out = attn.new_zeros(B, h, H * W)
        out[:, :, keys[n]] = attn[:, :, n]
        return out.view(B, h, H, W)
    dense = attn.new_zeros(B, h, H * W, H * W)
    dense.scatter_(3, keys.expand(B, h, -1, -1), attn)
    return dense.view(B, h, H * W, H, W)
