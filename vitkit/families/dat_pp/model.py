"""DAT++ (Xia et al., "DAT++: Spatially Dynamic Vision Transformer with Deformable Attention", arXiv 2309.01430), as
the official code defines it: LeapLabTHU/DAT at the repository head (commit 32173fc, ``models/dat.py``,
``models/dat_blocks.py``, ``models/nat.py``, ``configs/dat_{tiny,small,base,base_384}.yaml``, model name
``dat_plus_plus``), the code the released ``dat_pp_*_in1k_*.pth`` files belong to.

DAT's trunk (``vitkit.families.dat.model``) with the DAT++ blocks and coordinate conventions:

    x = x + DWConv3×3(x)                                      (local perception unit, ``use_lpus``)
    x = x + DropPath(γ₁ · Attn(LN(x))),  x = x + DropPath(γ₂ · MLP(LN(x)))     (γ: layer scale, ``layer_scale_values``)

- 'N' blocks: neighbourhood attention with NATTEN's semantics, k×k windows clamped inside the map and the bias read
  at the key's offset from the query (``vitkit.layers.neighborhood_attention``, no natten dependency);
- 'D' blocks: deformable attention with strided offset networks (``strides`` 8/4/2/1: keys sampled on a 7×7 grid in
  every stage at 224 px), kernels ``ksizes`` (padding k // 2, or 0 when k equals the stride), unbounded offsets
  clamped to the map (``offset_range_factor`` −1), the "over_n_minus_1" coordinate convention, and the bias from the
  ``rpe_table`` or from the log-spaced continuous position-bias MLP (``log_cpb``);
- conv stem (``use_conv_patches``: 3×3 stride-2 conv, LN, GELU, 3×3 stride-2 conv, LN), 3×3 stride-2 downsampling,
  MLPs with a residual 3×3 depth-wise conv (``use_dwc_mlps``: fc1 → h + DWConv(h) → GELU → fc2).

The released configs set neither layer scale nor log-CPB (both default off in the official constructor); vitkit
implements both as the official code does, and every other option the official constructor runs
(docs/official_options.md): the ablations ``dwc_pes``, ``fixed_pes``, ``no_offs``
(``vitkit.layers.deformable_attention``) and the experimental block types of ``stage_spec``, 'X' (``ConvBlock``), 'P'
(``PyramidAttention``), 'E' (``vitkit.layers.slide_attention``) and 'Q' (``LearnedQueries1x1``, at the one window size
the official code runs). The deformable bias tables are sampled in normalised coordinates, so the official 384 model
(``configs/dat_base_384.yaml``) keeps the tables of a 224 model and runs at 384 (``table_img_size``):
``dat_pp_base_384`` does the same. The 'D' blocks' sampling points come out of ``deformable_points`` and
``sampling_points``, inherited from DAT.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from vitkit.config import ConfigError
from vitkit.families.dat.model import DAT, DATConfig, local_perception, stage_grids
from vitkit.layers import DropPath, NeighborhoodAttention, PatchEmbed, SpatialReductionAttention, to_2tuple
from vitkit.layers.deformable_attention import key_grid
from vitkit.layers.slide_attention import SlideAttention

__all__ = ["DATPPConfig", "DATPlusPlus"]

_SPEC = (("N", "D"), ("N", "D") * 2, ("N", "D") * 9, ("D", "D"))
_PER_STAGE = ("ksizes", "nat_ksizes", "layer_scale_values", "use_lpus", "log_cpb", "sr_ratios", "heads_q",
              "ksize_qnas", "nqs")


@dataclass
class DATPPConfig(DATConfig):
    """``DATConfig`` with DAT++'s block types and switches (official constructor names); defaults = DAT-T++."""

    dim_stem: int = 64
    dims: tuple[int, ...] = (64, 128, 256, 512)
    depths: tuple[int, ...] = (2, 4, 18, 2)
    heads: tuple[int, ...] = (2, 4, 8, 16)
    stage_spec: tuple[tuple[Literal["L", "S", "D", "N", "P", "X", "E", "Q"], ...], ...] = _SPEC
    groups: tuple[int, ...] = (1, 2, 4, 8)
    use_pes: tuple[bool, ...] = (True, True, True, True)
    strides: tuple[int, ...] = (8, 4, 2, 1)
    offset_range_factor: tuple[float, ...] = (-1.0, -1.0, -1.0, -1.0)
    use_dwc_mlps: tuple[bool, ...] = (True, True, True, True)
    use_conv_patches: bool = True
    ksizes: tuple[int, ...] = (9, 7, 5, 3)  # 'D' blocks: the offset network's depth-wise kernel
    nat_ksizes: tuple[int, ...] = (7, 7, 7, 7)  # 'N' blocks: the neighbourhood
    layer_scale_values: tuple[float, ...] = (-1.0, -1.0, -1.0, -1.0)  # > 0: layer scale with this initial value
    use_lpus: tuple[bool, ...] = (True, True, True, True)  # local perception units
    log_cpb: tuple[bool, ...] = (False, False, False, False)  # 'D' blocks: log-CPB bias instead of the rpe_table
    table_img_size: int | tuple[int, int] | None = None  # input size the rpe_tables are sized for (None: img_size)
    # the experimental block types (official defaults; no released model has them)
    sr_ratios: tuple[int, ...] = (8, 4, 2, 1)  # 'P' blocks: the key/value reduction
    heads_q: tuple[int, ...] = (6, 12, 24, 48)  # 'Q' blocks: heads
    ksize_qnas: tuple[int, ...] = (3, 3, 3, 3)  # 'Q' blocks: the window (only 1 runs officially)
    nqs: tuple[int, ...] = (2, 2, 2, 2)  # 'Q' blocks: learned queries
    qna_activation: Literal["exp", "sigmoid", "linear"] = "exp"  # 'Q' blocks

    refused_options: ClassVar[dict[str, str]] = {
        "ns_per_pts": "the official constructor passes it on, and no block reads it (32173fc): leave it out",
        "lower_lr_kvs": "a training setting, not the model's: the official optimizer.py gives parameters whose name "
                        "holds the key that fraction of the base learning rate"}
    cannot_run: ClassVar[dict[str, str]] = {}  # 32173fc runs fixed_pes and no_offs (dwc_pes with no_offs: below)

    def position_encoding(self, i: int) -> str | None:
        """The official order at 32173fc: dwc_pe, fixed_pe, log_cpb, the rpe_table; none without offsets."""
        pe = super().position_encoding(i)
        return None if self.no_offs[i] else "log_cpb" if pe == "table" and self.log_cpb[i] else pe

    def validate(self) -> None:
        super().validate()
        for name in _PER_STAGE:
            if len(getattr(self, name)) != len(self.depths):
                raise ConfigError(f"{name} needs one entry per stage, got {list(getattr(self, name))}")
        if self.use_conv_patches and self.patch_size != 4:
            raise ConfigError(f"use_conv_patches: the two stride-patch_size/2 convs make a 4x stem only for "
                              f"patch_size 4, got {self.patch_size}")
        unit = self.patch_size * 8
        if self.table_img_size is not None and any(s <= 0 or s % unit for s in to_2tuple(self.table_img_size)):
            raise ConfigError(f"table_img_size {self.table_img_size} must be a positive multiple of {unit}")
        for i, (grid, spec) in enumerate(zip(stage_grids(self), self.stage_spec)):
            k = self.nat_ksizes[i]
            if "N" in spec and (k < 3 or k % 2 == 0):
                raise ConfigError(f"nat_ksizes[{i}] = {k} must be odd and at least 3 (NATTEN's kernels)")
            if "D" in spec:
                self._validate_deformable(i, grid)
            self._validate_experimental(i, grid, spec)

    def _validate_experimental(self, i: int, grid: tuple[int, int], spec: tuple[str, ...]) -> None:
        """What the official 'P', 'X', 'E' and 'Q' blocks need to run (32173fc)."""
        dim, sr, w = self.dims[i], self.sr_ratios[i], self.window_sizes[i]
        if "P" in spec and not 1 <= sr <= min(grid):
            raise ConfigError(f"sr_ratios[{i}] = {sr} must be between 1 and stage {i}'s map {grid[0]}x{grid[1]}")
        if "X" in spec and (w < 1 or w % 2 == 0):
            raise ConfigError(f"window_sizes[{i}] = {w}: an 'X' block's depth-wise conv (padding k // 2) keeps the "
                              f"map only for odd kernels; the official residual add fails otherwise")
        if "E" in spec and dim % (4 * self.heads[i]):
            raise ConfigError(f"dims[{i}] = {dim} must be a multiple of 4 x heads[{i}] for 'E' blocks (slide "
                              f"attention reduces the width by 4 and splits it into heads)")
        if "Q" in spec:
            if self.ksize_qnas[i] != 1:
                raise ConfigError(f"ksize_qnas[{i}] = {self.ksize_qnas[i]}: the official code cannot run it: "
                                  f"FusedKQnA is built with padding 0, so a k > 1 window shrinks the map and the "
                                  f"final reshape fails (RuntimeError, 32173fc); only ksize_qnas 1 runs")
            if self.heads_q[i] < 1 or dim % self.heads_q[i] or self.nqs[i] < 1:
                raise ConfigError(f"heads_q[{i}] = {self.heads_q[i]} must divide dims[{i}] = {dim} and nqs[{i}] = "
                                  f"{self.nqs[i]} be positive ('Q' blocks)")

    def _validate_deformable(self, i: int, grid: tuple[int, int]) -> None:
        k, s = self.ksizes[i], self.strides[i]
        if k < 1:
            raise ConfigError(f"ksizes[{i}] = {k} must be positive")
        keys = key_grid(grid, k, s, 0 if k == s else k // 2)
        if min(grid) < 2 or min(keys) < 2:  # DAT++ normalises coordinates by (n - 1)
            raise ConfigError(f"stage {i}'s {grid[0]}x{grid[1]} map samples a {keys[0]}x{keys[1]} key grid with "
                              f"ksizes[{i}] = {k} and strides[{i}] = {s}; DAT++ needs at least 2x2 of both: use a "
                              f"larger img_size or a smaller stride")
        official = tuple(n // s for n in grid)  # the fixed table's key grid and the pooled map of no_offs
        what = "no_offs" if self.no_offs[i] else "fixed_pes" if self.position_encoding(i) == "fixed" else None
        if what and keys != official:
            raise ConfigError(f"{what}[{i}]: stage {i}'s offset network samples {keys[0]}x{keys[1]} keys but the "
                              f"official {'average pooling' if self.no_offs[i] else 'fixed table'} has "
                              f"{official[0]}x{official[1]} (map / strides[{i}]), and its forward fails on the "
                              f"difference: choose ksizes / strides / img_size that agree")
        if what == "fixed_pes" and stage_grids(self, self.table_img_size)[i] != grid:
            raise ConfigError(f"fixed_pes[{i}]: the fixed bias is sized for the map the model is built for, and the "
                              f"official forward cannot reshape it to another: leave table_img_size out")
        if self.no_offs[i] and self.use_pes[i] and self.dwc_pes[i]:
            raise ConfigError(f"dwc_pes[{i}] with no_offs[{i}] and use_pes[{i}]: the official code cannot run it: "
                              f"DAttentionBaseline builds no conv without offsets and its forward then adds "
                              f"residual_lepe, never assigned (UnboundLocalError, 32173fc)")


class DATPlusPlus(DAT):
    config_cls = DATPPConfig
    convention = "over_n_minus_1"
    mlp_dw_residual = True
    # Measured: the TorchScript ONNX exporter traces neighbourhood attention's tiled windows into a graph that fails
    # in ONNX Runtime (a Reshape of the cropped 15x15 map to the padded 16x16 one on the tiny config), and the
    # torch.export-based ONNX exporter stops at the deformable layers' reshape; torch-export works and is tested.
    unsupported_exports = {"onnx": "neither ONNX exporter handles neighbourhood attention + deformable attention "
                                   "yet (the TorchScript trace fails in ONNX Runtime); use --format torch-export"}

    def _make_stem(self) -> nn.Module:
        """Official ``patch_proj`` with ``use_conv_patches``: two 3×3 stride-2 convs, each followed by LN, GELU
        between them."""
        cfg = self.cfg
        if not cfg.use_conv_patches:
            return super()._make_stem()
        half, (h, w) = cfg.dim_stem // 2, to_2tuple(cfg.img_size)
        conv = dict(patch_size=3, stride=2, padding=1, strict_img_size=False, norm_layer=self.norm_layer)
        return nn.Sequential(PatchEmbed((h, w), in_chans=cfg.in_chans, embed_dim=half, output_fmt="NCHW", **conv),
                             nn.GELU(),
                             PatchEmbed((h // 2, w // 2), in_chans=half, embed_dim=cfg.dim_stem, output_fmt="NHWC",
                                        **conv))

    def _block_options(self, i: int) -> dict[str, Any]:
        scale = self.cfg.layer_scale_values[i]
        return dict(lpu=self.cfg.use_lpus[i], init_values=scale if scale > 0 else None)

    def _make_block(self, kind: str, i: int, grid: tuple[int, int], drop_path: float) -> nn.Module:
        if kind != "X":
            return super()._make_block(kind, i, grid, drop_path)
        cfg = self.cfg
        return ConvBlock(cfg.dims[i], cfg.window_sizes[i], self._make_mlp(i), self.norm_layer, drop_path,
                         lpu=cfg.use_lpus[i])

    def _make_attention(self, kind: str, i: int, grid: tuple[int, int]) -> nn.Module:
        cfg = self.cfg
        dim, heads, drops = cfg.dims[i], cfg.heads[i], dict(attn_drop=cfg.attn_drop_rate, proj_drop=cfg.drop_rate)
        if kind == "N":
            return NeighborhoodAttention(dim, heads, cfg.nat_ksizes[i], **drops)
        if kind == "P":
            return PyramidAttention(dim, heads, cfg.sr_ratios[i], **drops)
        if kind == "E":
            return SlideAttention(dim, heads, 3, **drops)
        if kind == "Q":
            return LearnedQueries1x1(dim, cfg.heads_q[i], cfg.nqs[i])
        return super()._make_attention(kind, i, grid)

    def load_pretrained_state(self, state: dict[str, Tensor], report) -> dict[str, Tensor]:
        """``DAT.load_pretrained_state`` after two fixes for 'X' blocks: the depth-wise conv sits in the official
        ``attns[d]`` (``attn.`` → ``conv.``), and the layer scales the official stage builds for every block but
        never applies to an 'X' block are dropped, with a note."""
        state = dict(state)
        for i, spec in enumerate(self.cfg.stage_spec):
            for j in (j for j, kind in enumerate(spec) if kind == "X"):
                block = f"stages.{i}.blocks.{j}."
                for key in [k for k in state if k.startswith(block + "attn.")]:
                    state[block + "conv." + key[len(block + "attn."):]] = state.pop(key)
                unused = [k for k in state if k.startswith((block + "ls1.", block + "ls2."))]
                for key in unused:
                    del state[key]
                if unused:
                    report.notes.append(f"{block}ls1/ls2 dropped: the official stage builds layer scales for an "
                                        f"'X' block and never applies them")
        return super().load_pretrained_state(state, report)

    def _deformable(self, i: int) -> dict[str, Any]:
        """Offset kernel ``ksizes[i]`` (padding 0 when it equals the stride), the position encoding
        (``DATPPConfig.position_encoding``, tables sized for ``table_img_size``), offsets unless ``no_offs``."""
        cfg = self.cfg
        k, s = cfg.ksizes[i], cfg.strides[i]
        tables = stage_grids(cfg, cfg.table_img_size)
        return dict(stride=s, offset_kernel=k, offset_padding=0 if k == s else k // 2,
                    offset_range_factor=cfg.offset_range_factor[i], position_encoding=cfg.position_encoding(i),
                    offsets=not cfg.no_offs[i], table_grid=tables[i])


class ConvBlock(nn.Module):
    """DAT++'s 'X' block (official ``TransformerStage.forward``, 32173fc): after the local perception unit,
    x + DropPath(MLP(LN(DWConv_k×k(x)))), one residual, no layer scale (ConvNeXt's block with DAT's MLP)."""

    def __init__(self, dim: int, kernel: int, mlp: nn.Module, norm_layer, drop_path: float, *, lpu: bool):
        super().__init__()
        self.lpu = nn.Conv2d(dim, dim, 3, padding=1, groups=dim) if lpu else None
        self.conv = nn.Conv2d(dim, dim, kernel, padding=kernel // 2, groups=dim)
        self.norm = norm_layer(dim)
        self.mlp = mlp
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = local_perception(self.lpu, x)  # (B, H, W, C)
        y = self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # (B, H, W, C)
        return x + self.drop_path(self.mlp(self.norm(y)))


class PyramidAttention(SpatialReductionAttention):
    """DAT++'s 'P' block (official ``PyramidAttention``, 32173fc ``dat_blocks.py``): PVT's spatial-reduction attention
    (``vitkit.layers.SpatialReductionAttention``) on a channels-last map; ``sr_ratio`` > 1 reads keys and values from
    an sr×sr stride-sr conv + LayerNorm (official ``proj_ds``)."""

    def forward(self, x: Tensor) -> Tensor:
        """(B, H, W, C) → (B, H, W, C)."""
        B, H, W, C = x.shape
        return super().forward(x.reshape(B, H * W, C), H, W).view(B, H, W, C)


class LearnedQueries1x1(nn.Module):
    """DAT++'s 'Q' block as the official code can run it (``FusedKQnA``, 32173fc ``qna.py``, "not used in the journal
    paper"; QnA, Arar et al., CVPR 2022): learned queries attending to a k×k window, here k = 1, the only window the
    official padding 0 lets run. A one-key window's softmax is 1, so each query q contributes attn_scale[q] ⊙ v and

        out = W_o (Σ_q attn_scale[q] ⊙ v),   v = x W_v,

    whatever the queries, keys and ``rpb_table`` (kept, under the official names, so that the file loads; the
    official ratio of exponentials cancels to the same). ``heads`` = the official ``heads_q``."""

    def __init__(self, dim: int, heads: int, queries: int):
        super().__init__()
        self.heads, self.queries = heads, queries
        self.proj_k = nn.Linear(dim, dim, bias=False)
        self.proj_v = nn.Linear(dim, dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)  # official proj_out (a 1×1 conv)
        self.q_param = nn.Parameter(torch.randn(queries, dim) * (heads / dim) ** 0.5)
        self.attn_scale = nn.Parameter(torch.randn(1, 1, 1, queries * heads) * 0.02)
        self.rpb_table = nn.Parameter(torch.randn(1, queries * heads) * 0.02)

    def forward(self, x: Tensor) -> Tensor:
        """(B, H, W, C) → (B, H, W, C)."""
        B, H, W, C = x.shape
        v = self.proj_v(x).view(B, H, W, self.heads, C // self.heads)  # (B, H, W, h, d)
        scale = self.attn_scale.view(self.queries, self.heads).sum(0)  # Σ_q, (h,)
        return self.proj((v * scale[:, None]).view(B, H, W, C))
