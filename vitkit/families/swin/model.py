"""Swin Transformer v1 (Liu et al., "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows",
ICCV 2021, arXiv 2103.14030).

    ẑˡ = W-MSA(LN(zˡ⁻¹)) + zˡ⁻¹,        zˡ = MLP(LN(ẑˡ)) + ẑˡ
    ẑˡ⁺¹ = SW-MSA(LN(zˡ)) + zˡ,         zˡ⁺¹ = MLP(LN(ẑˡ⁺¹)) + ẑˡ⁺¹           (eq. 3)

Patch partition (4×4 conv + LayerNorm), four stages of blocks that alternate regular and shifted windows
(``vitkit.layers.WindowAttention``, relative-position bias eq. 4), patch merging between stages, final LayerNorm,
global average pooling and a linear head. Features stay channels-last (B, H, W, C) from the patch embedding to the
head. Module names follow timm's ``SwinTransformer`` (the merging layer opens the stage it feeds:
``layers.{i}.downsample``), except the classifier, ``head`` (timm: ``head.fc``); ``formats`` converts the
official, timm and transformers layouts.

Window geometry follows the official code (``SwinTransformerBlock.__init__``): blocks 1, 3, … of a stage shift by
window // 2; a stage whose resolution is not larger than the window (min(H, W) <= window) uses one window of
min(H, W) and no shift. Stage sides that are not multiples of the window are zero-padded inside the attention, and
odd sides before patch merging, as transformers' ``SwinLayer`` / ``SwinPatchMerging`` and Swin's detection backbone
pad them (the official classification code only accepts sizes that divide).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import ClassVar, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitkit.config import ConfigError, check_ranges, from_dict
from vitkit.layers import Block, PatchEmbed, to_2tuple
from vitkit.layers.pos_embed_rel import relative_position_index
from vitkit.layers.window_attention import (WindowAttention, padded_grid, shifted_window_mask,
                                            table_window)
from vitkit.families.contract import (FamilyModel, LinearHead, StagedBlocks, block_outputs, select_indices,
                                      staged_layer_id, trunc_normal_linears_, zero_init_)

__all__ = ["SwinConfig", "SwinTransformer", "PatchMerging", "block_geometry"]


@dataclass
class SwinConfig:
    img_size: int | tuple[int, int] = 224
    patch_size: int = 4
    in_chans: int = 3
    num_classes: int = 1000  # 0 = no head (forward returns pooled features)
    embed_dim: int = 96  # C of the first stage; stage i has C·2^i channels
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 7
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    act_layer: Literal["gelu", "gelu_tanh"] = "gelu"
    norm_eps: float = 1e-5  # nn.LayerNorm's default, used by the official code for every norm
    drop_rate: float = 0.0  # official DROP_RATE: after the patch embedding and after every dense layer
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.1  # stochastic depth, linear over all blocks (official default)
    # how loading resizes bias tables for another window; None: as the checkpoint's source does (SWIN_RESIZE:
    # official and transformers bicubic, timm its geometric progression interpolated linearly)
    rel_pos_resize: Literal["bicubic", "geometric", "geometric_linear"] | None = None
    qk_scale: float | None = None  # the attention scale (None: head_dim ** -0.5)
    ape: bool = False  # an absolute position embedding added after the patch embedding (official ``ape``)
    patch_norm: bool = True  # LayerNorm after the patch embedding

    refused_options: ClassVar[dict[str, str]] = {
        "use_checkpoint": "activation checkpointing, a training-memory switch that changes no output; the official "
                          "forward is the same without it",
        "fused_window_process": "a CUDA kernel (kernels/window_process) for the same shift and window partition; it "
                                "changes no output and needs the compiled extension, which cannot run on a CPU",
        "norm_layer": "a class, not data: vitkit's Swin is LayerNorm with norm_eps (the official build passes "
                      "nn.LayerNorm or apex's fused LayerNorm, the same function)"}

    def validate(self) -> None:
        check_ranges(self, rates=("drop_rate", "attn_drop_rate", "drop_path_rate"),
                     positive=("patch_size", "embed_dim", "window_size", "in_chans"),
                     non_negative=("num_classes",))
        if not self.depths or len(self.depths) != len(self.num_heads) or min(self.depths) < 1:
            raise ConfigError(f"depths {list(self.depths)} and num_heads {list(self.num_heads)} need one positive "
                              f"entry per stage")
        for i, heads in enumerate(self.num_heads):
            if heads <= 0 or (self.embed_dim * 2 ** i) % heads:
                raise ConfigError(f"num_heads[{i}] = {heads} does not divide stage {i}'s width "
                                  f"{self.embed_dim * 2 ** i}")
        for s in to_2tuple(self.img_size):
            if s <= 0 or s % self.patch_size:
                P = self.patch_size
                near = sorted({max(1, s // P) * P, -(-s // P) * P})
                raise ConfigError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size} "
                                  f"(e.g. {' or '.join(map(str, near))})")


@dataclass(frozen=True)
class BlockGeometry:
    grid: tuple[int, int]  # the stage's token grid
    window: tuple[int, int]
    shift: tuple[int, int]


def stage_grids(cfg: SwinConfig) -> list[tuple[int, int]]:
    """Token grid of every stage: img / patch, then halved (rounded up: odd sides are padded) by each merging."""
    h, w = (s // cfg.patch_size for s in to_2tuple(cfg.img_size))
    grids = [(h, w)]
    for _ in cfg.depths[1:]:
        h, w = -(-h // 2), -(-w // 2)
        grids.append((h, w))
    return grids


def block_geometry(cfg: SwinConfig) -> list[list[BlockGeometry]]:
    """Window and shift of every block (official rule): shift window // 2 on odd blocks; a stage with
    min(H, W) <= window has one window of min(H, W) and no shift."""
    out = []
    for grid, depth in zip(stage_grids(cfg), cfg.depths):
        window, shift = cfg.window_size, cfg.window_size // 2
        if min(grid) <= window:
            window, shift = min(grid), 0
        out.append([BlockGeometry(grid, (window, window), (shift, shift) if j % 2 else (0, 0)) for j in range(depth)])
    return out


def computed_buffers(cfg: SwinConfig) -> dict[str, Tensor]:
    """The relative-position indices and SW-MSA masks a model built from ``cfg`` computes, by state-dict key."""
    out = {}
    for i, stage in enumerate(block_geometry(cfg)):
        for j, g in enumerate(stage):
            prefix = f"layers.{i}.blocks.{j}.attn."
            out[prefix + "relative_position_index"] = relative_position_index(g.window)
            if any(g.shift):
                out[prefix + "attn_mask"] = shifted_window_mask(padded_grid(g.grid, g.window), g.window, g.shift)
    return out


class PatchMerging(nn.Module):
    """Swin §3.1 patch merging: concatenate each 2×2 neighbourhood (official order x0 = (even row, even col),
    x1 = (odd, even), x2 = (even, odd), x3 = (odd, odd)), LayerNorm(4C), Linear(4C → 2C, no bias). Odd sides are
    zero-padded at the bottom/right first (transformers' and timm's merging)."""

    def __init__(self, dim: int, norm_layer):
        super().__init__()
        self.norm = norm_layer(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        B, H, W, C = x.shape
        if H % 2 or W % 2:
            x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
            H, W = H + H % 2, W + W % 2
        x = x.reshape(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5).flatten(3)  # (B, H/2, W/2, 4C)
        return self.reduction(self.norm(x))  # (B, H/2, W/2, 2C)


class SwinStage(nn.Module):
    """Patch merging (stages ≥ 1) then the stage's blocks: pre-norm ``Block``s whose attention is W-MSA / SW-MSA."""

    def __init__(self, cfg: SwinConfig, index: int, geometry: list[BlockGeometry], drop_path: list[float]):
        super().__init__()
        dim = cfg.embed_dim * 2 ** index
        norm_layer = partial(nn.LayerNorm, eps=cfg.norm_eps)
        self.downsample = PatchMerging(dim // 2, norm_layer) if index > 0 else nn.Identity()
        self.blocks = nn.Sequential(*[
            Block(dim, mlp_ratio=cfg.mlp_ratio, proj_drop=cfg.drop_rate, drop_path=drop_path[j],
                  act_layer=cfg.act_layer, norm_layer=norm_layer,
                  attn=WindowAttention(dim, cfg.num_heads[index], g.grid, g.window, g.shift, qkv_bias=cfg.qkv_bias,
                                       attn_drop=cfg.attn_drop_rate, proj_drop=cfg.drop_rate,
                                       qk_scale=cfg.qk_scale))
            for j, g in enumerate(geometry)])

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(self.downsample(x))  # (B, H_i, W_i, C_i)


class SwinTransformer(StagedBlocks, LinearHead, FamilyModel):
    config_cls = SwinConfig
    stages_attr = "layers"
    intermediates = "pyramid"
    input_weights = ("patch_embed.proj.weight",)

    def __init__(self, cfg: SwinConfig):
        super().__init__()
        self.cfg = cfg
        self.num_classes = cfg.num_classes
        self.num_features = cfg.embed_dim * 2 ** (len(cfg.depths) - 1)
        norm_layer = partial(nn.LayerNorm, eps=cfg.norm_eps)
        self.patch_embed = PatchEmbed(cfg.img_size, cfg.patch_size, cfg.in_chans, cfg.embed_dim,
                                      norm_layer=norm_layer if cfg.patch_norm else None, output_fmt="NHWC")
        grid = self.patch_embed.grid_size
        self.absolute_pos_embed = nn.Parameter(torch.zeros(1, grid[0] * grid[1], cfg.embed_dim)) if cfg.ape else None
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        rates = [r.item() for r in torch.linspace(0, cfg.drop_path_rate, sum(cfg.depths), device="cpu")]
        starts = [sum(cfg.depths[:i]) for i in range(len(cfg.depths))]
        self.layers = nn.Sequential(*[SwinStage(cfg, i, g, rates[starts[i]: starts[i] + cfg.depths[i]])
                                      for i, g in enumerate(block_geometry(cfg))])
        self.norm = norm_layer(self.num_features)
        self.head = self._make_head(cfg.num_classes)
        self.init_weights()

    # ----------------------------------------------------------------------------------------------- construction
    def init_weights(self) -> None:
        """Truncated-normal(0.02) dense layers with zero biases (official ``_init_weights``; the bias tables are
        initialised by ``WindowAttention``), and a zero-initialised head."""
        trunc_normal_linears_(self, std=0.02)
        if self.absolute_pos_embed is not None:
            nn.init.trunc_normal_(self.absolute_pos_embed, std=0.02)
        zero_init_(*self.classifiers())

    def no_weight_decay(self) -> set[str]:
        """The bias tables (the official ``no_weight_decay_keywords``) and the absolute position embedding."""
        return {"relative_position_bias_table"} | ({"absolute_pos_embed"} if self.cfg.ape else set())

    def layer_id(self, param_name: str) -> int:
        """microsoft/SimMIM ``get_swin_layer`` numbering (``staged_layer_id``): 0 = patch embedding, blocks
        numbered from 1 across stages, a stage's merging layer one below its first block, final norm and head last
        (the absolute position embedding with the patch embedding)."""
        depths = self.cfg.depths
        if param_name.startswith(("patch_embed.", "absolute_pos_embed")):
            return staged_layer_id(depths, None)
        if param_name.startswith("layers."):
            parts = param_name.split(".")
            stage = int(parts[1])
            return staged_layer_id(depths, stage, int(parts[3]) if parts[2] == "blocks" else None)
        return staged_layer_id(depths, len(depths))

    @property
    def num_layer_ids(self) -> int:
        return sum(self.cfg.depths) + 2

    # --------------------------------------------------------------------------------------------------- forward
    def embed(self, x: Tensor) -> Tensor:
        """Patch partition + linear embedding + LayerNorm: (B, C, H, W) → (B, H/P, W/P, C)."""
        H, W = x.shape[-2:]
        if (H, W) != self.patch_embed.img_size:
            h, w = self.patch_embed.img_size
            raise ValueError(f"input is {H}x{W} but the model was built for {h}x{w} (its windows and masks depend on "
                             f"the size); pass img_size=({H}, {W}) to create_model: weights load with their bias "
                             f"tables resized")
        x = self.patch_embed(x)  # (B, h, w, C)
        if self.absolute_pos_embed is not None:
            x = x + self.absolute_pos_embed.view(1, *x.shape[1:])  # (1, h·w, C) → (1, h, w, C)
        return self.pos_drop(x)

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, C, H, W) images → (B, h·w, D) normalised last-stage tokens (the contract's layout)."""
        return self.norm(self.layers(self.embed(x))).flatten(1, 2)  # (B, h, w, D) → (B, h·w, D)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = x.mean(dim=1)  # (B, D) global average pooling
        return x if pre_logits else self.head(x)

    def forward_intermediates(self, x: Tensor, indices: int | Sequence[int] | None = None,
                              norm: bool = False) -> list[Tensor]:
        """The output of chosen stages as (B, C_i, H_i, W_i) maps (the feature pyramid); ``norm`` applies the final
        LayerNorm to the last stage's map (timm's convention: the other stages have no norm of their own)."""
        wanted = select_indices(indices, len(self.layers), "stage")
        outs = block_outputs(self.layers, self.embed(x), wanted)  # (B, H_i, W_i, C_i) each
        if norm and wanted[-1] == len(self.layers) - 1:
            outs[-1] = self.norm(outs[-1])
        return [y.permute(0, 3, 1, 2).contiguous() for y in outs]  # (B, C_i, H_i, W_i)

    # ------------------------------------------------------------------------------------------ weight loading
    def load_pretrained_state(self, state: dict[str, Tensor], report) -> dict[str, Tensor]:
        """Adapt a vitkit-layout state dict: check the checkpoint's relative-position indices and SW-MSA masks (they
        must be what its own geometry computes), resize bias tables for another window and the absolute position
        embedding for another size as the checkpoint's source does (``report.resize``, ``SWIN_RESIZE``: bicubic as
        Swin's ``utils.load_pretrained``, timm's geometric progression for timm files; ``cfg.rel_pos_resize``
        overrides), replace the buffers by this model's, and zero-initialise a head of another class count."""
        from vitkit.weights.adapt import (adapt_head, check_window_buffers, reconcile_buffers, resample_pos_embed_state,
                                          resize_rel_pos_tables)
        source = report.source_config if report.format == "vitkit" else None  # a vitkit file states its geometry
        check_window_buffers(state, report, computed_buffers(from_dict(SwinConfig, dict(source))) if source else None,
                             label="Swin")
        rule = report.resize
        if self.absolute_pos_embed is not None:  # official utils.load_pretrained: bicubic, square grids
            state = resample_pos_embed_state(state, "absolute_pos_embed", self.absolute_pos_embed, 0,
                                             self.patch_embed.grid_size, report, scheme=rule.pos_embed if rule else
                                             "bicubic", source=rule.source if rule else "")
        method = self.cfg.rel_pos_resize or (rule.rel_pos if rule and rule.rel_pos else "bicubic")
        source = rule.rel_pos_source if rule and not self.cfg.rel_pos_resize else ""
        state = resize_rel_pos_tables(state, self, "relative_position_bias_table", report, method, table_window,
                                      source=source)
        state = reconcile_buffers(state, self, ("relative_position_index", "attn_mask"), report,
                                  "this model's input size or window differs from the checkpoint's")
        return adapt_head(state, "head", self.head, report)
