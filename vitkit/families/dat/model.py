"""DAT, the Deformable Attention Transformer (Xia et al., "Vision Transformer with Deformable Attention", CVPR 2022,
arXiv 2201.00520), as the official code defines it: LeapLabTHU/DAT at tag ``CVPR2022`` (commit 566a593,
``models/dat.py``, ``models/dat_blocks.py``, ``configs/dat_*.yaml``).

    x = x + DropPath(Attn(LN(x))),   x = x + DropPath(MLP(LN(x)))          (pre-norm blocks, DAT §3.4)

A 4×4 patch embedding with LayerNorm, four stages whose blocks are named by ``stage_spec``: 'L' local window
attention and 'S' shifted windows (``vitkit.layers.WindowAttention``, the shift ⌈window / 2⌉ = 4 for window 7, as
``ShiftWindowAttention``), 'D' deformable attention (``vitkit.layers.deformable_attention``); 2×2 stride-2 conv + LN
between stages; LayerNorm, global average pooling and a linear head (``cls_norm``, ``cls_head``). Maps stay
channels-last (B, H, W, C) from the stem to the head; the official NCHW 1×1 convs are dense layers here.

The official forward returns ``(logits, positions, references)``; vitkit's returns the logits, and
``DAT.deformable_points`` returns them with every deformable layer's sampling positions and reference points
(normalised and in input pixels); ``DAT.sampling_points`` (the family contract's optional capability) is those points
alone. Config keys are the official constructor's names (``dims``, ``depths``, ``stage_spec``, ``heads``, ``groups``,
``dim_stem``, …). DAT++ (the repository head) is ``vitkit.families.dat_pp``, a family of its own built on this one:
its weights and blocks differ.

Every constructor option the official code runs is built (docs/official_options.md), the paper's ablation switches
too: ``dwc_pes`` (a depth-wise 3×3 conv of the queries added to the attention output instead of the bias table). Two
switches the official code builds but cannot run are refused with the reason (``DATConfig.cannot_run``: its forward
raises), as are the arguments it takes and never reads (``refused_options``).

Another input size: the stage maps change with it, the windows stay (a map the window does not divide is
zero-padded inside the window attention, as Swin's detection backbone does; the official classification code needs
divisible maps, which is why its 384 config uses window 12), and loading a checkpoint of another size resizes every
``rpe_table`` and (for another window) ``relative_position_bias_table`` bicubically, as the official
``load_pretrained`` does, and recomputes the index and mask buffers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitkit.config import ConfigError, check_ranges, from_dict
from vitkit.families.contract import (FamilyModel, LinearHead, StagedBlocks, block_outputs, select_indices,
                                      staged_layer_id, zero_init_)
from vitkit.layers import Block, DWConvMlp, Mlp, PatchEmbed, record_attention, to_2tuple
from vitkit.layers.deformable_attention import DeformableAttention, points_to_pixels
from vitkit.layers.pos_embed_rel import relative_position_index
from vitkit.layers.window_attention import (WindowAttention, padded_grid, shifted_window_mask,
                                            table_window)

__all__ = ["DATConfig", "DAT", "DATBlock", "stage_grids", "computed_buffers"]

_STAGES = 4
_PER_STAGE = ("dims", "depths", "heads", "window_sizes", "stage_spec", "groups", "use_pes", "strides",
              "offset_range_factor", "use_dwc_mlps", "dwc_pes", "fixed_pes", "no_offs")


@dataclass
class DATConfig:
    img_size: int | tuple[int, int] = 224
    patch_size: int = 4
    in_chans: int = 3
    num_classes: int = 1000  # 0 = no head (forward returns pooled features)
    expansion: int = 4  # MLP hidden width = expansion · dim
    dim_stem: int = 96
    dims: tuple[int, ...] = (96, 192, 384, 768)
    depths: tuple[int, ...] = (2, 2, 6, 2)
    heads: tuple[int, ...] = (3, 6, 12, 24)
    window_sizes: tuple[int, ...] = (7, 7, 7, 7)
    stage_spec: tuple[tuple[Literal["L", "S", "D"], ...], ...] = (("L", "S"), ("L", "S"), ("L", "D") * 3, ("L", "D"))
    groups: tuple[int, ...] = (-1, -1, 3, 6)  # offset groups of the 'D' blocks (-1: stage without them)
    use_pes: tuple[bool, ...] = (False, False, True, True)  # 'D' blocks: the rpe_table bias
    strides: tuple[int, ...] = (-1, -1, 1, 1)  # 'D' blocks: the offset network's stride (keys on an H/s × W/s grid)
    offset_range_factor: tuple[float, ...] = (-1.0, -1.0, 2.0, 2.0)  # > 0 bounds the offsets, < 0 leaves them free
    # (0: raw offsets in v1, none in DAT++, as each official version computes it)
    use_dwc_mlps: tuple[bool, ...] = (False, False, False, False)  # MLP with a 3×3 depth-wise conv
    use_conv_patches: bool = False  # 7×7 stride-4 stem and 3×3 stride-2 downsampling instead of 4×4 / 2×2
    # ablation switches of the 'D' blocks (no released model sets them), read only where use_pes is on, as officially:
    dwc_pes: tuple[bool, ...] = (False, False, False, False)  # a depth-wise 3×3 conv of q added to the output
    fixed_pes: tuple[bool, ...] = (False, False, False, False)  # a learned (H·W, Hk·Wk) bias per head, no sampling
    no_offs: tuple[bool, ...] = (False, False, False, False)  # no offsets: keys from the average-pooled map
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.2

    # Official constructor arguments that build nothing here, with the reason (create_model names it)
    refused_options: ClassVar[dict[str, str]] = {
        "sr_ratios": "no block of DAT v1 (566a593) reads it (only DAT++'s 'P' blocks do): leave it out",
        "ns_per_pts": "the official constructor passes it on, and no block reads it (566a593): leave it out"}
    # Switches the official code at 566a593 builds but cannot run: its forward raises
    cannot_run: ClassVar[dict[str, str]] = {
        "fixed_pes": "DAttentionBaseline.forward at 566a593 reads self.n_sample, which is never set (AttributeError)",
        "no_offs": "DAttentionBaseline.forward at 566a593 calls offset.fill(0.0); Tensor.fill does not exist "
                   "(AttributeError)"}

    def validate(self) -> None:
        check_ranges(self, rates=("drop_rate", "attn_drop_rate", "drop_path_rate"),
                     positive=("patch_size", "in_chans", "dim_stem", "expansion"),
                     non_negative=("num_classes",))
        for name in _PER_STAGE:
            if len(getattr(self, name)) != _STAGES:
                raise ConfigError(f"{name} needs one entry per stage (DAT has {_STAGES}), got {list(getattr(self, name))}")
        unit = self.patch_size * 2 ** (_STAGES - 1)
        for s in to_2tuple(self.img_size):
            if s <= 0 or s % unit:
                raise ConfigError(f"img_size {self.img_size} must be a multiple of {unit} (patch_size x 2^3: every "
                                  f"stage halves the map), e.g. {max(1, s // unit) * unit}")
        for i in range(_STAGES):
            self._validate_stage(i)

    def _validate_stage(self, i: int) -> None:
        dim, heads, spec = self.dims[i], self.heads[i], self.stage_spec[i]
        if self.depths[i] < 1 or len(spec) != self.depths[i]:
            raise ConfigError(f"stage_spec[{i}] {list(spec)} must name one block type per block of depths[{i}] = "
                              f"{self.depths[i]}")
        if heads <= 0 or dim % heads:
            raise ConfigError(f"heads[{i}] = {heads} does not divide dims[{i}] = {dim}")
        if i and dim != 2 * self.dims[i - 1]:
            raise ConfigError(f"dims[{i}] = {dim} must be 2 x dims[{i - 1}] (the official stage projection from "
                              f"2 x dims[{i - 1}] channels could not run otherwise)")
        if "L" in spec or "S" in spec:
            window = self.window_sizes[i]
            if window < (2 if "S" in spec else 1):
                raise ConfigError(f"window_sizes[{i}] = {window} is too small for stage {i}'s "
                                  f"{'shifted ' if 'S' in spec else ''}windows")
        if "D" in spec:
            g = self.groups[i]
            if g < 1 or heads % g:
                raise ConfigError(f"groups[{i}] = {g} must be a positive divisor of heads[{i}] = {heads} (stage {i} "
                                  f"has deformable blocks)")
            if self.strides[i] < 1:
                raise ConfigError(f"strides[{i}] = {self.strides[i]} must be >= 1 (stage {i} has deformable blocks)")
            for name in self.cannot_run:
                if name in self.switches(i):
                    raise ConfigError(f"{name}[{i}]: the official code cannot run it: {self.cannot_run[name]}")

    def switches(self, i: int) -> set[str]:
        """The ablation switches stage ``i``'s 'D' blocks act on: the official forward reads ``dwc_pes`` and then
        ``fixed_pes`` only with ``use_pes`` (the first wins), ``no_offs`` always."""
        pe = ("dwc_pes" if self.dwc_pes[i] else "fixed_pes" if self.fixed_pes[i] else None) if self.use_pes[i] else None
        return {name for name in (pe, "no_offs" if self.no_offs[i] else None) if name}

    def position_encoding(self, i: int) -> str | None:
        """Stage ``i``'s deformable position encoding (``vitkit.layers.deformable_attention``): the official
        ``use_pe`` branches in their order, dwc_pe, fixed_pe, then the rpe_table."""
        if not self.use_pes[i]:
            return None
        return "dwc" if self.dwc_pes[i] else "fixed" if self.fixed_pes[i] else "table"


def stage_grids(cfg: DATConfig, img_size: int | tuple[int, int] | None = None) -> list[tuple[int, int]]:
    """The (H, W) map of every stage for ``img_size`` (default: the config's): img / patch_size, halved by each
    downsampling."""
    h, w = (s // cfg.patch_size for s in to_2tuple(img_size or cfg.img_size))
    return [(h >> i, w >> i) for i in range(len(cfg.depths))]


def shift_of(window: int) -> int:
    """'S' blocks shift by ⌈window / 2⌉ (official ``TransformerStage``: ``math.ceil(window_size / 2)``)."""
    return math.ceil(window / 2)


def computed_buffers(cfg: DATConfig) -> dict[str, Tensor]:
    """The relative-position indices and shifted-window masks a model built from ``cfg`` computes, by key."""
    out = {}
    for i, (grid, spec, w) in enumerate(zip(stage_grids(cfg), cfg.stage_spec, cfg.window_sizes)):
        for j, kind in enumerate(spec):
            prefix = f"stages.{i}.blocks.{j}.attn."
            if kind in "LS":
                out[prefix + "relative_position_index"] = relative_position_index((w, w))
            if kind == "S":
                s = shift_of(w)
                out[prefix + "attn_mask"] = shifted_window_mask(padded_grid(grid, (w, w)), (w, w), (s, s))
    return out


class DATBlock(Block):
    """The shared pre-norm ``Block`` with DAT++'s optional local perception unit before it, x + DWConv3×3(x)
    (official ``local_perception_units``; identity in DAT v1)."""

    def __init__(self, dim: int, *, lpu: bool = False, **kwargs: Any):
        super().__init__(dim, **kwargs)
        self.lpu = nn.Conv2d(dim, dim, 3, padding=1, groups=dim) if lpu else None

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(local_perception(self.lpu, x))


def local_perception(lpu: nn.Module | None, x: Tensor) -> Tensor:
    """x + DWConv3×3(x) on a (B, H, W, C) map, or x without a unit."""
    return x if lpu is None else x + lpu(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # (B, H, W, C)


class DATStage(nn.Module):
    """Downsampling (stages ≥ 1, the official ``down_projs[i - 1]``), a 1×1 projection when the stem's width differs
    from the stage's (official ``TransformerStage.proj``), then the blocks."""

    def __init__(self, downsample: nn.Module | None, proj: nn.Module | None, blocks: list[nn.Module]):
        super().__init__()
        self.downsample, self.proj = downsample, proj
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        if self.downsample is not None:
            x = self.downsample(x.permute(0, 3, 1, 2))  # (B, H/2, W/2, C_i)
        if self.proj is not None:
            x = self.proj(x)
        return self.blocks(x)  # (B, H_i, W_i, C_i)


class DAT(StagedBlocks, LinearHead, FamilyModel):
    config_cls = DATConfig
    intermediates = "pyramid"
    convention = "over_n"  # coordinate conventions of the deformable attention (vitkit.layers.deformable_attention)
    mlp_dw_residual = False  # DAT++'s depth-wise conv MLP adds its input back (official TransformerMLPWithConv)
    input_weights = ("stem.proj.weight", "stem.0.proj.weight")  # DAT's patch conv, DAT++'s first stem conv
    convolutional = True  # the offset network's depth-wise convolution (paper §3.2); DAT++'s conv stem and blocks

    def __init__(self, cfg: DATConfig):
        super().__init__()
        self.cfg = cfg
        self.num_classes = cfg.num_classes
        self.num_features = cfg.dims[-1]
        self.norm_layer = partial(nn.LayerNorm, eps=1e-5)  # LayerNormProxy: nn.LayerNorm's default
        self.stem = self._make_stem()
        rates = [r.item() for r in torch.linspace(0, cfg.drop_path_rate, sum(cfg.depths), device="cpu")]
        self.stages = nn.ModuleList()
        for i, grid in enumerate(stage_grids(cfg)):
            start = sum(cfg.depths[:i])
            self.stages.append(self._make_stage(i, grid, rates[start: start + cfg.depths[i]]))
        self.norm = self.norm_layer(self.num_features)
        self.head = self._make_head(cfg.num_classes)
        self.init_weights()

    # ----------------------------------------------------------------------------------------------- construction
    def _make_stem(self) -> nn.Module:
        """Official ``patch_proj``: Conv(P×P, stride P) + LN, or a 7×7 stride-4 conv (``use_conv_patches``)."""
        cfg = self.cfg
        conv = dict(patch_size=7, stride=cfg.patch_size, padding=3) if cfg.use_conv_patches else \
            dict(patch_size=cfg.patch_size)
        return PatchEmbed(cfg.img_size, in_chans=cfg.in_chans, embed_dim=cfg.dim_stem, strict_img_size=False,
                          norm_layer=self.norm_layer, output_fmt="NHWC", **conv)

    def _make_stage(self, i: int, grid: tuple[int, int], rates: list[float]) -> DATStage:
        cfg, dim = self.cfg, self.cfg.dims[i]
        downsample = None
        if i:  # official down_projs[i - 1]: Conv(2×2 stride 2, or 3×3 stride 2 pad 1), no bias, + LN
            conv = dict(patch_size=3, stride=2, padding=1) if cfg.use_conv_patches else dict(patch_size=2)
            downsample = PatchEmbed((grid[0] * 2, grid[1] * 2), in_chans=cfg.dims[i - 1], embed_dim=dim, bias=False,
                                    strict_img_size=False, norm_layer=self.norm_layer, output_fmt="NHWC", **conv)
        proj = nn.Linear(cfg.dim_stem, dim) if i == 0 and cfg.dim_stem != dim else None
        blocks = [self._make_block(kind, i, grid, rate) for kind, rate in zip(cfg.stage_spec[i], rates)]
        return DATStage(downsample, proj, blocks)

    def _make_block(self, kind: str, i: int, grid: tuple[int, int], drop_path: float) -> nn.Module:
        return DATBlock(self.cfg.dims[i], attn=self._make_attention(kind, i, grid), mlp=self._make_mlp(i),
                        norm_layer=self.norm_layer, drop_path=drop_path, **self._block_options(i))

    def _block_options(self, i: int) -> dict[str, Any]:
        return {}

    def _make_mlp(self, i: int) -> nn.Module:
        """Official ``TransformerMLP`` (fc1 → GELU → fc2) or, with ``use_dwc_mlps``, ``TransformerMLPWithConv``."""
        cfg, dim = self.cfg, self.cfg.dims[i]
        if cfg.use_dwc_mlps[i]:
            return DWConvMlp(dim, dim * cfg.expansion, drop=cfg.drop_rate, dw_residual=self.mlp_dw_residual)
        return Mlp(dim, dim * cfg.expansion, drop=cfg.drop_rate)

    def _make_attention(self, kind: str, i: int, grid: tuple[int, int]) -> nn.Module:
        cfg, dim, heads = self.cfg, self.cfg.dims[i], self.cfg.heads[i]
        if kind in "LS":
            w = cfg.window_sizes[i]
            return WindowAttention(dim, heads, grid, w, shift_of(w) if kind == "S" else 0,
                                   attn_drop=cfg.attn_drop_rate, proj_drop=cfg.drop_rate)
        if kind == "D":
            return DeformableAttention(dim, heads, cfg.groups[i], grid, convention=self.convention,
                                       attn_drop=cfg.attn_drop_rate, proj_drop=cfg.drop_rate, **self._deformable(i))
        raise ConfigError(f"stage_spec[{i}]: block type {kind!r} is not one of this model's")

    def _deformable(self, i: int) -> dict[str, Any]:
        """DAT v1: offset kernel [9, 7, 5, 3][stage] with padding k // 2, the position encoding ``use_pes`` and its
        switches choose (``DATConfig.position_encoding``)."""
        cfg = self.cfg
        kernel = (9, 7, 5, 3)[i]
        return dict(stride=cfg.strides[i], offset_kernel=kernel, offset_padding=kernel // 2,
                    offset_range_factor=cfg.offset_range_factor[i], position_encoding=cfg.position_encoding(i))

    def init_weights(self) -> None:
        """PyTorch's default initialisation (the official ``reset_parameters`` iterates parameters, not modules,
        so it changes nothing), relative-position tables truncated-normal(0.01) as the official blocks, and a
        zero-initialised head (vitkit's convention)."""
        for name, p in self.named_parameters():
            if name.endswith(("relative_position_bias_table", "rpe_table")):
                nn.init.trunc_normal_(p, std=0.01)
        zero_init_(*self.classifiers())

    def no_weight_decay(self) -> set[str]:
        """The bias tables (official ``no_weight_decay_keywords``: names containing ``relative_position_bias_table``
        or ``rpe_table``, which also covers DAT++'s log-CPB MLP, ``rpe_mlp`` here), those this model has."""
        names = [n for n, _ in self.named_parameters()]
        out = {n.rsplit(".", 1)[-1] for n in names if n.endswith(("relative_position_bias_table", "rpe_table"))}
        return out | {n for n in names if ".rpe_mlp." in n}

    def layer_id(self, param_name: str) -> int:
        """``staged_layer_id`` (SimMIM's Swin numbering): stem 0, blocks from 1 across stages, a stage's downsampling
        (and stage 0's projection) one below its first block, final norm and head last."""
        depths = self.cfg.depths
        if param_name.startswith("stem."):
            return staged_layer_id(depths, None)
        if param_name.startswith("stages."):
            parts = param_name.split(".")
            return staged_layer_id(depths, int(parts[1]), int(parts[3]) if parts[2] == "blocks" else None)
        return staged_layer_id(depths, len(depths))

    @property
    def num_layer_ids(self) -> int:
        return sum(self.cfg.depths) + 2

    # --------------------------------------------------------------------------------------------------- forward
    def embed(self, x: Tensor) -> Tensor:
        """The stem: (B, C, H, W) images → (B, H/4, W/4, dim_stem)."""
        size = to_2tuple(self.cfg.img_size)
        if tuple(x.shape[-2:]) != size:
            raise ValueError(f"input is {x.shape[-2]}x{x.shape[-1]} but the model was built for {size[0]}x{size[1]} "
                             f"(its bias tables, windows and masks depend on the size); pass img_size=({x.shape[-2]}, "
                             f"{x.shape[-1]}) to create_model: weights load with their tables resized")
        return self.stem(x)

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, C, H, W) images → (B, h·w, D) normalised last-stage tokens (the contract's layout)."""
        x = self.embed(x)
        for stage in self.stages:
            x = stage(x)
        return self.norm(x).flatten(1, 2)  # (B, h, w, D) → (B, h·w, D)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = x.mean(dim=1)  # (B, D): cls_norm, then global average pooling
        return x if pre_logits else self.head(x)

    def forward_intermediates(self, x: Tensor, indices: int | Sequence[int] | None = None,
                              norm: bool = False) -> list[Tensor]:
        """The output of chosen stages as (B, C_i, H_i, W_i) maps (the feature pyramid); ``norm`` applies the final
        LayerNorm (``cls_norm``) to the last stage's map."""
        wanted = select_indices(indices, len(self.stages), "stage")
        outs = block_outputs(self.stages, self.embed(x), wanted)  # (B, H_i, W_i, C_i) each
        if norm and wanted[-1] == len(self.stages) - 1:
            outs[-1] = self.norm(outs[-1])
        return [y.permute(0, 3, 1, 2).contiguous() for y in outs]  # (B, C_i, H_i, W_i)

    def deformable_points(self, x: Tensor) -> tuple[Tensor, dict[str, dict[str, Any]]]:
        """What the official forward returns besides the logits: for every deformable layer (module name, e.g.
        ``stages.2.blocks.1.attn``) its ``positions`` (sampled points) and ``references`` (reference points),
        (B, groups, Hk, Wk, 2) in normalised (y, x) order as ``grid_sample(align_corners=True)`` reads them on the
        layer's (H, W) ``grid``, and the same as (x, y) pixel coordinates of the input image (``pixels``,
        ``reference_pixels``; ``vitkit.layers.deformable_attention.points_to_pixels``). Runs the forward with the
        attention recorder on (the explicit softmax path)."""
        with record_attention(self) as maps:
            logits = self(x)
        img = tuple(x.shape[-2:])
        points = {}
        for name, info in maps.info.items():
            if "positions" in info:
                points[name] = dict(grid=info["grid"], positions=info["positions"], references=info["references"],
                                    pixels=points_to_pixels(info["positions"], info["grid"], img),
                                    reference_pixels=points_to_pixels(info["references"], info["grid"], img))
        return logits, points

    def sampling_points(self, x: Tensor) -> dict[str, dict[str, Any]]:
        """The points part of ``deformable_points``: per deformable layer (module name) its ``pixels`` and
        ``reference_pixels`` ((B, groups, Hk, Wk, 2), (x, y) in input pixels) for ``x``, with the normalised
        ``positions`` / ``references`` and the layer's ``grid``."""
        return self.deformable_points(x)[1]

    # ------------------------------------------------------------------------------------------ weight loading
    def load_pretrained_state(self, state: dict[str, Tensor], report) -> dict[str, Tensor]:
        """Adapt a vitkit-layout state dict: check the checkpoint's window indices and masks (they must be what its
        own geometry computes), resize bias tables for another input size or window (bicubic, as the official
        ``load_pretrained``), replace the buffers by this model's, and zero-initialise a head of another class
        count."""
        from vitkit.weights.adapt import adapt_head, check_window_buffers, reconcile_buffers, resize_rel_pos_tables
        source = report.source_config if report.format == "vitkit" else None  # a vitkit file states its geometry
        check_window_buffers(state, report, computed_buffers(from_dict(type(self.cfg), dict(source))) if source else
                             None, label="DAT", shift_of=shift_of)
        state = resize_rel_pos_tables(state, self, "relative_position_bias_table", report, "bicubic", table_window)
        state = resize_grid_tables(state, self, ("rpe_table", "attn.rpb"), report)
        state = reconcile_buffers(state, self, ("relative_position_index", "attn_mask"), report,
                                  "this model's input size or window differs from the checkpoint's")
        return adapt_head(state, "head", self.head, report)


def resize_grid_tables(state: dict[str, Tensor], model: nn.Module, suffixes: tuple[str, ...],
                       report) -> dict[str, Tensor]:
    """(heads, a, b) bias tables whose size differs from the model's (the deformable ``rpe_table``, a (2h − 1, 2w − 1)
    grid or ``fixed_pes``' (H·W, Hk·Wk) bias; neighbourhood ``rpb``): bicubic ``F.interpolate`` of the (a, b) plane,
    align_corners False, the official ``load_pretrained``'s resize of any ``rpe_table``."""
    out = dict(state)
    for key, target in model.state_dict().items():
        table = state.get(key)
        if not key.endswith(suffixes) or table is None or table.shape == target.shape or table.ndim != 3 \
                or table.shape[0] != target.shape[0]:
            continue
        resized = F.interpolate(table[None].float(), size=target.shape[1:], mode="bicubic", align_corners=False)
        out[key] = resized[0].to(table.dtype)  # (heads, a', b')
        report.resized.append(f"{key} {tuple(table.shape)} → {tuple(target.shape)} (bicubic)")
    return out
