"""Pyramid Vision Transformer (Wang et al., "Pyramid Vision Transformer: A Versatile Backbone for Dense Prediction
without Convolutions", ICCV 2021, arXiv 2102.12122).

Four stages, each (paper §3.1, Fig. 3):
    F_{i-1} (B, C_{i-1}, H, W) → patch embedding (P_i×P_i conv, LayerNorm; P = 4, 2, 2, 2) → + E_pos,i → L_i blocks
where every block is the pre-norm Transformer block with spatial-reduction attention (eq. 2-3, ``vitkit.layers.
SpatialReductionAttention``) and the class token joins only the last stage, whose final LayerNorm output at the class
token is classified.

The definition is whai362/PVT ``classification/pvt.py`` (commit 57e2dfa):
- LayerNorm eps 1e-6 in the blocks and the final norm, but plain ``nn.LayerNorm`` (eps 1e-5) in the patch embeddings
  and in the spatial reduction (``embed_norm_eps``, ``sr_norm_eps``; transformers uses one ``layer_norm_eps``
  everywhere, and its files carry that choice);
- every stage has its own learned position embedding. At another input size the official forward resamples it on the
  fly, bilinearly without antialiasing (``_get_pos_embed``); vitkit does the same at forward time, and resamples the
  stored embeddings the same way when a checkpoint is loaded for another ``img_size``, so a model built at 384 from
  224 weights computes what the official 224 model computes on 384 inputs. One deviation: the official code decides
  whether to resample by comparing a stage's patch count with stage 1's, so it skips stage 1 for a non-square input
  of the native patch count and fails at 448×448; vitkit resamples whenever a stage's grid differs from its own.
- any input size runs; a patch conv floors sizes that are not a multiple of its patch, as the official one does;
- ``patch_size`` (stage 1's patch; the factories' 4): the official code sizes the position embeddings of stages 2-4
  for a 4-pixel patch (``PatchEmbed(img_size // 2 ** (i + 1), 2)``), so with another patch its forward resamples
  them on every call; vitkit's are sized for the real grids and an official file's are resampled once, at load, by
  the same bilinear interpolation. So with another patch, build the model for the input size (``img_size``): the
  official logits come out; fed another size than it was built for, the model resamples its already resampled
  tables, which the official code does not.

Module names follow timm's PVT v2 (``patch_embed``, ``stages.{i}.downsample``, ``stages.{i}.blocks.{j}``), so both PVT
families share one layout; ``formats`` converts the official and transformers files.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from functools import partial
from typing import Callable, ClassVar, Literal, Sequence

import torch
from torch import Tensor, nn

from vitkit.config import ConfigError, check_ranges
from vitkit.families.contract import (FamilyModel, LinearHead, StagedBlocks, select_indices, staged_layer_id,
                                      trunc_normal_linears_, zero_init_)
from vitkit.layers import (Block, Mlp, PatchEmbed, SpatialReductionAttention, drop_path_rates, resample_pos_embed,
                           to_2tuple)

__all__ = ["PVTConfig", "PyramidVisionTransformer", "PyramidConfig", "PyramidModel", "sra_block", "stage_grids"]

NUM_STAGES = 4


@dataclass
class PyramidConfig:
    """What PVT v1 and v2 configure alike: four stages of widths, heads, MLP ratios, depths and reduction ratios."""

    img_size: int | tuple[int, int] = 224
    in_chans: int = 3
    num_classes: int = 1000
    embed_dims: tuple[int, ...] = (64, 128, 320, 512)
    num_heads: tuple[int, ...] = (1, 2, 5, 8)
    mlp_ratios: tuple[float, ...] = (8.0, 8.0, 4.0, 4.0)
    depths: tuple[int, ...] = (2, 2, 2, 2)
    sr_ratios: tuple[int, ...] = (8, 4, 2, 1)
    qkv_bias: bool = True
    act_layer: Literal["gelu", "gelu_tanh"] = "gelu"
    norm_eps: float = 1e-6  # blocks and final norms (official: partial(nn.LayerNorm, eps=1e-6))
    embed_norm_eps: float = 1e-5  # patch-embedding LayerNorm (official: plain nn.LayerNorm)
    sr_norm_eps: float = 1e-5  # spatial-reduction LayerNorm (official: plain nn.LayerNorm)
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0  # stochastic depth, linear from 0 over all blocks of all stages
    qk_scale: float | None = None  # the attention scale (None: head_dim ** -0.5)

    _rate_fields: ClassVar[tuple[str, ...]] = ()  # the subclass's dropout rates, checked like the others
    refused_options: ClassVar[dict[str, str]] = {
        "num_stages": "vitkit builds PVT's four stages; the official code runs fewer only when embed_dims[num_stages "
                      "- 1] equals embed_dims[3] (its class token, final norm and head take the fourth width), a "
                      "configuration of no paper table or release, not implemented",
        "norm_layer": "a class, not data: vitkit's PVT is LayerNorm with norm_eps (the official factories pass "
                      "partial(nn.LayerNorm, eps=1e-6))"}

    def validate(self) -> None:
        for name in ("embed_dims", "num_heads", "mlp_ratios", "depths", "sr_ratios"):
            value = getattr(self, name)
            if len(value) != NUM_STAGES:
                raise ConfigError(f"{name} must have {NUM_STAGES} entries (one per stage), got {list(value)}")
            if any(v <= 0 for v in value):
                raise ConfigError(f"{name} must be positive, got {list(value)}")
        for i, (dim, heads) in enumerate(zip(self.embed_dims, self.num_heads)):
            if dim % heads:
                raise ConfigError(f"embed_dims[{i}] = {dim} is not divisible by num_heads[{i}] = {heads}")
        for name in ("drop_path_rate", "attn_drop_rate") + self._rate_fields:
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        check_ranges(self, positive=("norm_eps", "embed_norm_eps", "sr_norm_eps"))
        if self.in_chans <= 0 or self.num_classes < 0:
            raise ConfigError(f"in_chans must be positive and num_classes >= 0, got {self.in_chans}, "
                              f"{self.num_classes}")
        if min(to_2tuple(self.img_size)) < 32:
            raise ConfigError(f"img_size {self.img_size} is too small: four stages reduce it 32-fold")


@dataclass
class PVTConfig(PyramidConfig):
    drop_rate: float = 0.0  # official name: dropout after the position embedding and after every dense layer
    patch_size: int = 4  # stage 1's patch (the official factories' 4; stages 2-4 always take 2)

    _rate_fields = ("drop_rate",)

    def validate(self) -> None:
        super().validate()
        if self.patch_size < 1 or min(to_2tuple(self.img_size)) < 8 * self.patch_size:
            raise ConfigError(f"patch_size {self.patch_size} must be positive and img_size {self.img_size} at least "
                              f"8 x patch_size: the four stages reduce the image 8·patch_size-fold")
        if self.sr_ratios[-1] != 1:
            raise ConfigError(f"sr_ratios[-1] must be 1: the last stage's sequence holds the class token "
                              f"(got {list(self.sr_ratios)})")


def stage_grids(img_size: int | tuple[int, int], patch_size: int = 4) -> list[tuple[int, int]]:
    """The token grid of each stage for an input of ``img_size``: H/P, H/2P, H/4P, H/8P (floored, as the convs do)."""
    H, W = to_2tuple(img_size)
    return [(H // patch_size // 2 ** i, W // patch_size // 2 ** i) for i in range(NUM_STAGES)]


def sra_block(cfg: PyramidConfig, i: int, drop_path: float, mlp: nn.Module, proj_drop: float) -> Block:
    """One block of stage ``i``: z' = z + SRA(LN(z), H, W), z = z' + FFN(LN(z')) (PVT eq. 2-3 in the ViT block)."""
    dim = cfg.embed_dims[i]
    attn = SpatialReductionAttention(dim, cfg.num_heads[i], cfg.sr_ratios[i], linear=getattr(cfg, "linear", False),
                                     qkv_bias=cfg.qkv_bias, attn_drop=cfg.attn_drop_rate, proj_drop=proj_drop,
                                     norm_eps=cfg.sr_norm_eps, qk_scale=cfg.qk_scale)
    return Block(dim, drop_path=drop_path, norm_eps=cfg.norm_eps, attn=attn, mlp=mlp)


class PyramidModel(StagedBlocks, LinearHead, FamilyModel):
    """What PVT v1 and v2 share: the stem ``patch_embed``, four ``stages``, one classifier ``head``, the per-stage
    pyramid of ``forward_intermediates`` and Swin's layer numbering for layer-wise learning-rate decay."""

    intermediates = "pyramid"
    input_weights = ("patch_embed.proj.weight",)
    min_input_size: ClassVar[int] = 1  # PVT v1's non-overlapping patch convs need 32 pixels
    patch_embed: nn.Module
    stages: nn.ModuleList
    head: nn.Module

    def build_trunk(self, cfg: PyramidConfig, stem: nn.Module, stage: Callable[..., nn.Module]) -> None:
        """The config, the stem and the four stages, ``stage(cfg, i, drop_path_rates_of_its_blocks)``."""
        self.cfg = cfg
        self.num_classes = cfg.num_classes
        self.num_features = cfg.embed_dims[-1]
        self.patch_embed = stem
        rates = drop_path_rates(cfg.drop_path_rate, sum(cfg.depths))
        starts = [sum(cfg.depths[:i]) for i in range(NUM_STAGES)]
        self.stages = nn.ModuleList([stage(cfg, i, rates[starts[i]: starts[i] + cfg.depths[i]])
                                     for i in range(NUM_STAGES)])

    def layer_id(self, param_name: str) -> int:
        """``staged_layer_id``: the stem 0, a stage's embedding (downsample, position embedding, class token) the id
        before its first block, block j of stage i its Swin number, a stage's closing norm its last block's, the final
        norm and head the last id."""
        depths, parts = self.cfg.depths, param_name.split(".")
        if parts[0] == "patch_embed":
            return 0
        if parts[0] != "stages":
            return staged_layer_id(depths, NUM_STAGES)
        i = int(parts[1])
        if parts[2] == "blocks":
            return staged_layer_id(depths, i, int(parts[3]))
        if parts[2] == "norm":
            return staged_layer_id(depths, i, depths[i] - 1)
        return staged_layer_id(depths, i)

    @property
    def num_layer_ids(self) -> int:
        return sum(self.cfg.depths) + 2

    def forward_intermediates(self, x: Tensor, indices: int | Sequence[int] | None = None,
                              norm: bool = False) -> list[Tensor]:
        """The output map of chosen stages, (B, C_i, H/2^(i+2), W/2^(i+2)) each: an int n = the last n stages, a list
        = those (negative allowed), None = all four. ``norm``: see ``stage_map``."""
        wanted = select_indices(indices, NUM_STAGES, "stage")
        x = self.embed(x)  # (B, H/4, W/4, C_1)
        outs = []
        for i, stage in enumerate(self.stages[: wanted[-1] + 1]):
            x = self.stage_map(i, stage(x), norm=norm)  # (B, C_i, H_i, W_i)
            if i in wanted:
                outs.append(x)
        return outs

    def embed(self, x: Tensor) -> Tensor:
        """(B, C, H, W) images → the stem's (B, H/4, W/4, C_1) tokens; too small an image is a ValueError."""
        if min(x.shape[-2:]) < self.min_input_size:
            raise ValueError(f"input {x.shape[-2]}x{x.shape[-1]} is smaller than {self.min_input_size}x"
                             f"{self.min_input_size}: {type(self).__name__}'s patch embeddings reduce it 32-fold")
        return self.patch_embed(x)

    @abc.abstractmethod
    def stage_map(self, i: int, out, norm: bool) -> Tensor:
        """Stage ``i``'s output as a (B, C, H, W) map."""

    def init_linear_(self) -> None:
        """Truncated-normal(0.02) dense layers with zero biases (the official ``_init_weights``), zero classifier."""
        trunc_normal_linears_(self)
        zero_init_(*self.classifiers())


class PVTStage(nn.Module):
    """Patch embedding (stages 2-4; stage 1's is the model's stem), class token (last stage), position embedding for
    the stage's native grid, blocks."""

    def __init__(self, cfg: PVTConfig, i: int, rates: list[float]):
        super().__init__()
        dim = cfg.embed_dims[i]
        grids = stage_grids(cfg.img_size, cfg.patch_size)
        self.grid = grid = grids[i]
        self.downsample = None if i == 0 else PatchEmbed(
            grids[i - 1], 2, cfg.embed_dims[i - 1], dim, strict_img_size=False, drop_remainder=True,
            norm_layer=partial(nn.LayerNorm, eps=cfg.embed_norm_eps), output_fmt="NHWC")
        self.num_prefix_tokens = int(i == NUM_STAGES - 1)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_prefix_tokens + grid[0] * grid[1], dim))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if self.num_prefix_tokens else None
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        self.blocks = nn.ModuleList([
            sra_block(cfg, i, rate, Mlp(dim, int(dim * cfg.mlp_ratios[i]), act_layer=cfg.act_layer, drop=cfg.drop_rate),
                      cfg.drop_rate) for rate in rates])

    def position_embedding(self, grid: tuple[int, int]) -> Tensor:
        """E_pos for a ``grid`` of tokens: the stored one, or resampled bilinearly (official ``_get_pos_embed``)."""
        if grid == self.grid:
            return self.pos_embed
        return resample_pos_embed(self.pos_embed, grid, self.grid, self.num_prefix_tokens, "bilinear", antialias=False)

    def forward(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """(B, C_in, H_in, W_in) map, or the stem's (B, H, W, C) for stage 1 → ((B, [1 +] H·W, C) tokens, (H, W))."""
        if self.downsample is not None:
            x = self.downsample(x)  # (B, H, W, C)
        B, H, W, C = x.shape
        x = x.flatten(1, 2)  # (B, H·W, C)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)  # (B, 1 + H·W, C)
        x = self.pos_drop(x + self.position_embedding((H, W)))
        for blk in self.blocks:
            x = blk(x, H, W)
        return x, (H, W)


class PyramidVisionTransformer(PyramidModel):
    config_cls = PVTConfig
    min_input_size = 32
    num_prefix_tokens = 1  # the class token before the last stage's grid in forward_features

    def __init__(self, cfg: PVTConfig):
        super().__init__()
        stem = PatchEmbed(cfg.img_size, cfg.patch_size, cfg.in_chans, cfg.embed_dims[0], strict_img_size=False,
                          drop_remainder=True,
                          norm_layer=partial(nn.LayerNorm, eps=cfg.embed_norm_eps), output_fmt="NHWC")
        self.build_trunk(cfg, stem, PVTStage)
        self.norm = nn.LayerNorm(self.num_features, eps=cfg.norm_eps)
        self.head = self._make_head(cfg.num_classes)
        self.init_weights()

    def init_weights(self) -> None:
        """The official initialisation: truncated-normal(0.02) position embeddings, class token and dense layers."""
        for stage in self.stages:
            nn.init.trunc_normal_(stage.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.stages[-1].cls_token, std=0.02)
        self.init_linear_()

    def no_weight_decay(self) -> set[str]:
        return {"cls_token"}  # the official ``no_weight_decay`` (its comment: "has pos_embed may be better")

    # --------------------------------------------------------------------------------------------------- forward
    def forward_features(self, x: Tensor) -> Tensor:
        """(B, C, H, W) images → (B, 1 + N_4, C_4) last-stage tokens after the final LayerNorm."""
        x = self.embed(x)  # (B, H/4, W/4, C_1)
        for i, stage in enumerate(self.stages):
            x = stage(x)
            x = self.stage_map(i, x, norm=False) if i < NUM_STAGES - 1 else x[0]
        return self.norm(x)

    def stage_map(self, i: int, out: tuple[Tensor, tuple[int, int]], norm: bool) -> Tensor:
        """Stage tokens → (B, C, H, W), the class token left out; ``norm`` applies the final LayerNorm to the last
        stage (the only one that has a norm)."""
        x, (H, W) = out
        if i == NUM_STAGES - 1:
            x = (self.norm(x) if norm else x)[:, 1:]  # (B, H·W, C)
        return x.transpose(1, 2).reshape(x.shape[0], -1, H, W)  # (B, C, H, W)

    def feature_map(self, features: Tensor, image_hw: tuple[int, int]) -> Tensor:
        """The last stage's patch tokens (class token dropped) as a (B, C, H/32, W/32) map."""
        h, w = stage_grids(image_hw, self.cfg.patch_size)[-1]
        return features[:, 1:].transpose(1, 2).reshape(features.shape[0], -1, h, w)  # (B, C, h, w)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = x[:, 0]  # (B, C) the class token
        return x if pre_logits else self.head(x)

    # ------------------------------------------------------------------------------------------ weight loading
    def load_pretrained_state(self, state: dict[str, Tensor], report) -> dict[str, Tensor]:
        """Resample every stage's position embedding to this model's grid (bilinear, no antialiasing: what the
        official forward does at other sizes) and zero-initialise a classifier of another class count."""
        from vitkit.weights.adapt import adapt_head, resample_pos_embed_state
        source_size = report.source_config.get("img_size")  # a vitkit folder says its size: it may be non-square
        patch = report.source_config.get("patch_size", 4)
        old_grids = stage_grids(source_size, patch) if source_size else [None] * NUM_STAGES
        for i, stage in enumerate(self.stages):
            state = resample_pos_embed_state(state, f"stages.{i}.pos_embed", stage.pos_embed, stage.num_prefix_tokens,
                                             stage.grid, report, old_grids[i], interpolation="bilinear",
                                             antialias=False)
        return adapt_head(state, "head", self.head, report)
