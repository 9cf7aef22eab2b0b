"""PVT v2 (Wang et al., "PVT v2: Improved Baselines with Pyramid Vision Transformer", CVMJ 2022, arXiv 2106.13797).

PVT's four-stage pyramid (``vitkit.families.pvt.model``) with the paper's three changes (§3):
- overlapping patch embedding (§3.2): a 7×7 stride-4 conv (padding 3) for stage 1, 3×3 stride-2 (padding 1) for the
  others, each followed by LayerNorm, so no position embedding is needed and any input size runs;
- convolutional feed-forward (§3.3): a 3×3 depth-wise conv between the two dense layers (``vitkit.layers.DWConvMlp``);
- linear spatial-reduction attention (§3.1, the ``_li`` variant): keys and values from a 7×7 average-pooled map, then
  a 1×1 conv, LayerNorm and GELU (``SpatialReductionAttention(linear=True)``); its MLP adds a ReLU after fc1.
Each stage ends with a LayerNorm; the classifier reads the mean of the last stage's tokens.

The definition is whai362/PVT ``classification/pvt_v2.py`` (commit 57e2dfa): LayerNorm eps 1e-6 in the blocks and
stage norms, plain ``nn.LayerNorm`` (1e-5) in the patch embeddings and the spatial reduction. Module names are timm's
(``pvt_v2.py``: ``patch_embed``, ``stages.{i}.downsample``, ``stages.{i}.blocks.{j}``, ``stages.{i}.norm``), so timm
files load as they are; ``formats`` converts the official and transformers files.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

from torch import Tensor, nn

from vitkit.families.pvt.model import PyramidConfig, PyramidModel, sra_block
from vitkit.layers import DWConvMlp, PatchEmbed

__all__ = ["PVTv2Config", "PyramidVisionTransformerV2"]


@dataclass
class PVTv2Config(PyramidConfig):
    embed_dims: tuple[int, ...] = (32, 64, 160, 256)
    linear: bool = False  # linear spatial-reduction attention (7×7 pooling) and the extra ReLU (pvt_v2_b2_li)
    proj_drop_rate: float = 0.0  # timm's name (official drop_rate): dropout after every dense layer
    drop_rate: float = 0.0  # timm's name: dropout before the classifier (the official code has none)

    _rate_fields = ("proj_drop_rate", "drop_rate")
    refused_options = {**PyramidConfig.refused_options,
                       "patch_size": "the official constructor takes it and nothing reads it: its patch embeddings "
                                     "are the fixed 7x7 / 3x3 overlapping convs (57e2dfa pvt_v2.py)"}


def overlap_embed(in_chans: int, dim: int, first: bool, eps: float) -> PatchEmbed:
    """OverlapPatchEmbed: 7×7 stride 4 (stage 1) or 3×3 stride 2, padding k // 2, then LayerNorm; (B, H, W, C) out."""
    k, s = (7, 4) if first else (3, 2)
    # the image size (224) is nominal: a padded overlapping conv takes any size
    return PatchEmbed(224, k, in_chans, dim, strict_img_size=False, stride=s, padding=k // 2,
                      norm_layer=partial(nn.LayerNorm, eps=eps), output_fmt="NHWC")


class PVTv2Stage(nn.Module):
    """Overlapping patch embedding (stages 2-4; stage 1's is the model's stem), blocks, LayerNorm."""

    def __init__(self, cfg: PVTv2Config, i: int, rates: list[float]):
        super().__init__()
        dim = cfg.embed_dims[i]
        self.downsample = None if i == 0 else overlap_embed(cfg.embed_dims[i - 1], dim, False, cfg.embed_norm_eps)
        self.blocks = nn.ModuleList([
            sra_block(cfg, i, rate, DWConvMlp(dim, int(dim * cfg.mlp_ratios[i]), act_layer=cfg.act_layer,
                                              drop=cfg.proj_drop_rate, extra_relu=cfg.linear), cfg.proj_drop_rate)
            for rate in rates])
        self.norm = nn.LayerNorm(dim, eps=cfg.norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C_in, H_in, W_in) map, or the stem's (B, H, W, C) for stage 1 → (B, C, H, W) map."""
        if self.downsample is not None:
            x = self.downsample(x)  # (B, H, W, C)
        B, H, W, C = x.shape
        x = x.flatten(1, 2)  # (B, H·W, C)
        for blk in self.blocks:
            x = blk(x, H, W)
        return self.norm(x).transpose(1, 2).reshape(B, C, H, W)  # (B, C, H, W)


class PyramidVisionTransformerV2(PyramidModel):
    config_cls = PVTv2Config
    convolutional = True  # overlapping patch embeddings (paper §3.2), the MLP's depth-wise 3×3 convolution (§3.3)

    def __init__(self, cfg: PVTv2Config):
        super().__init__()
        self.build_trunk(cfg, overlap_embed(cfg.in_chans, cfg.embed_dims[0], True, cfg.embed_norm_eps), PVTv2Stage)
        self.head_drop = nn.Dropout(cfg.drop_rate)
        self.head = self._make_head(cfg.num_classes)
        self.init_weights()

    def init_weights(self) -> None:
        """The official ``_init_weights``: dense layers truncated-normal(0.02), convs N(0, 2 / fan_out) with fan_out
        = k·k·C_out / groups, zero biases; vitkit's zero-initialised classifier."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
                nn.init.normal_(m.weight, std=math.sqrt(2.0 / fan_out))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.init_linear_()

    def no_weight_decay(self) -> set[str]:
        return set()  # no position embedding or class token (the official list names none that exist; timm's is empty)

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, C, H, W) images → (B, h·w, C_4) tokens of the last stage, after its LayerNorm (the contract's
        layout)."""
        x = self.embed(x)  # (B, H/4, W/4, C_1)
        for stage in self.stages:
            x = stage(x)  # (B, C_i, H_i, W_i)
        return x.flatten(2).transpose(1, 2)  # (B, C_4, h, w) → (B, h·w, C_4)

    def stage_map(self, i: int, out: Tensor, norm: bool) -> Tensor:
        """Stages return (B, C, H, W) maps after their own LayerNorm, so ``norm`` changes nothing."""
        return out

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.head_drop(x.mean(dim=1))  # (B, C) the mean of the last stage's tokens
        return x if pre_logits else self.head(x)

    def load_pretrained_state(self, state: dict[str, Tensor], report) -> dict[str, Tensor]:
        """Nothing depends on the input size (no position embedding, no bias table): only a classifier of another
        class count is replaced; the report says that a new input size needed nothing."""
        from vitkit.weights.adapt import adapt_head
        source = report.source_config.get("img_size")
        if source is not None and tuple(_pair(source)) != tuple(_pair(self.cfg.img_size)):
            report.notes.append(f"input size {_pair(source)} → {_pair(self.cfg.img_size)}: nothing to resize (PVT v2 "
                                f"has no position embeddings or bias tables; its convolutions take any size)")
        return adapt_head(state, "head", self.head, report)


def _pair(size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
