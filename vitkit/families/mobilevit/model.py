"""MobileViT v1 (Mehta & Rastegari, "MobileViT: Light-weight, General-purpose, and Mobile-friendly Vision Transformer",
ICLR 2022, arXiv 2110.02178); the definition is the official code, apple/ml-cvnets@7771756
``cvnets/models/classification/mobilevit.py``, ``.../config/mobilevit.py`` and ``cvnets/modules/mobilevit_block.py``.

    stem     3x3 conv, stride 2 (BN, SiLU)                                     H/2
    layer1   MobileNetV2 inverted residuals                                    H/2
    layer2   MobileNetV2 inverted residuals, the first with stride 2            H/4
    layer3-5 a stride-2 inverted residual, then one MobileViT block             H/8, H/16, H/32
    head     1x1 conv to min(4·C5, 960) (BN, SiLU), global mean pool, dropout, linear

The MobileViT block (paper §3.1, Fig. 1b) learns local and global representations:

    X_L = Conv1x1(Conv3x3(X))                     local: C → d channels (the 1x1 has no BN, no activation)
    X_U = Unfold(X_L)                             (B, d, H, W) → (B·P, N, d): P = 2x2 pixel positions, N patches
    X_G = LN(Transformer_L(X_U))                  attention across the N patches, for each pixel position separately
    X_F = Fold(X_G)                               the exact inverse of Unfold
    Y   = Conv3x3([X ; Conv1x1(X_F)])             project d → C, concatenate with the block input, fuse 2C → C

Official-code details kept here: convolutions have no bias and are followed by BatchNorm (eps 1e-5, momentum 0.1) and
SiLU ("swish") except the local 1x1 and the inverted residual's last 1x1; the transformer is pre-norm with LayerNorm
(eps 1e-5), 4 heads, a fused (q, k, v) projection, FFN width 2d with SiLU, dropout after the attention projection and
after the FFN (``dropout``), between the FFN layers (``ffn_dropout``) and on the attention probabilities. A feature
map whose side is not a multiple of the patch size is resized bilinearly (align_corners=False) up to the next
multiple before unfolding and back after folding (not padded). Eval preprocessing of the official weights: BGR pixels
in [0, 1], no mean/std (CVNets v0.1 read images with OpenCV), short side 288 bilinear, centre crop 256.

Speed (same function, same state dict): the maps are kept in channels-last memory, unfolding and folding are one copy
each, and at inference every BatchNorm is folded into its convolution (``vitkit.layers.conv.ConvNormAct``).

Module names follow timm's port (``timm/models/mobilevit.py`` on ``byobnet.py``), so timm files load unchanged; the
official and transformers layouts are converted by ``formats``. Note: later ml-cvnets commits (v0.2+) replaced the
transformer's LayerNorm by one that normalises over dim 1 whenever N equals d (e.g. MobileViT-XXS at 128 px); the
released weights were trained with v0.1's plain ``nn.LayerNorm``, which is what timm, transformers and vitkit use.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitkit.config import ConfigError, check_ranges
from vitkit.families.contract import FamilyModel, LinearHead, block_outputs, select_indices, staged_layer_id
from vitkit.layers import Attention, Block, ConvNormAct, Mlp, drop_path_rates, to_2tuple

__all__ = ["MobileViTConfig", "MobileViT", "InvertedResidual", "MobileViTBlock", "unfold_patches", "fold_patches"]


@dataclass
class MobileViTConfig:
    img_size: int | tuple[int, int] = 256
    in_chans: int = 3
    num_classes: int = 1000  # 0 = no head (forward returns pooled features)
    stem_chs: int = 16
    widths: tuple[int, ...] = (32, 64, 96, 128, 160)  # output channels of layer1 … layer5 (official out_channels)
    mv2_depths: tuple[int, ...] = (1, 3)  # inverted residuals in layer1 and layer2 (official num_blocks)
    expand_ratio: float = 4.0  # inverted-residual expansion (official mv2_exp_mult)
    transformer_dims: tuple[int, ...] = (144, 192, 240)  # d of the MobileViT blocks of layer3 … layer5
    transformer_depths: tuple[int, ...] = (2, 4, 3)  # transformer layers in each
    mlp_ratio: float = 2.0  # FFN width / d (official ffn_dim = 2d in every variant)
    num_heads: int = 4  # official number_heads (head_dim = d / 4)
    patch_size: int = 2  # unfold patch side (official patch_h = patch_w)
    kernel_size: int = 3  # of the MobileViT block's local and fusion convs (official conv_kernel_size)
    last_layer_exp_factor: int = 4  # final 1x1 conv width = min(factor · widths[-1], 960)
    drop_rate: float = 0.1  # before the classifier (official classifier_dropout, ImageNet recipe)
    proj_drop_rate: float = 0.1  # after the attention projection and the FFN (official mit.dropout)
    mlp_drop_rate: float = 0.0  # between the FFN layers (official mit.ffn_dropout)
    attn_drop_rate: float = 0.0  # on the attention probabilities (official mit.attn_dropout)
    drop_path_rate: float = 0.0  # stochastic depth in the transformer layers (official default: off)
    head_dim: int | None = None  # official mit.head_dim: heads = d / head_dim per block instead of num_heads
    no_fusion: bool = False  # official mit.no_fuse_local_global_features: no concat + kxk fusion conv
    global_pool: Literal["mean", "rms", "abs"] = "mean"  # official model.layer.global_pool (GlobalPool)

    refused_options: ClassVar[dict[str, str]] = {
        "transformer_norm_layer": "the classification MobileViT never passes it to its blocks (7771756 "
                                  "mobilevit.py): every block keeps LayerNorm, whatever it is set to",
        "output_stride": "the dilated layer4/5 of ml-cvnets' segmentation backbones (output stride 8 or 16) are not "
                         "implemented; classification runs at stride 32",
        "activation": "vitkit's MobileViT is ml-cvnets' default swish (SiLU) network; other activations are not "
                      "implemented",
        "normalization": "vitkit's MobileViT is ml-cvnets' default batch_norm network; other normalisations are not "
                         "implemented"}

    def heads(self, d: int) -> int:
        """The heads of a transformer of width ``d`` (official ``_make_mit_layer``: d // head_dim, else num_heads)."""
        return d // self.head_dim if self.head_dim else self.num_heads

    def validate(self) -> None:
        if len(self.widths) != 5 or len(self.mv2_depths) != 2:
            raise ConfigError(f"widths needs 5 entries (layer1-5) and mv2_depths 2 (layer1-2), got {self.widths} "
                              f"and {self.mv2_depths}")
        if not len(self.transformer_dims) == len(self.transformer_depths) == 3:
            raise ConfigError(f"transformer_dims and transformer_depths need 3 entries (layer3-5), got "
                              f"{self.transformer_dims} and {self.transformer_depths}")
        check_ranges(self, positive=("in_chans", "stem_chs", "num_heads", "patch_size", "kernel_size",
                               "last_layer_exp_factor", "widths", "mv2_depths", "transformer_dims",
                               "transformer_depths"),
                     non_negative=("num_classes",),
                     rates=("drop_rate", "proj_drop_rate", "mlp_drop_rate", "attn_drop_rate", "drop_path_rate"))
        bad = [d for d in self.transformer_dims if d % (self.head_dim or self.num_heads)]
        if bad:
            what = f"head_dim {self.head_dim}" if self.head_dim else f"num_heads {self.num_heads}"
            raise ConfigError(f"transformer_dims {bad} are not divisible by {what}")
        if self.kernel_size % 2 == 0:
            raise ConfigError(f"kernel_size must be odd ('same' padding), got {self.kernel_size}")
        if self.expand_ratio < 1 or self.mlp_ratio <= 0:
            raise ConfigError(f"expand_ratio must be >= 1 and mlp_ratio > 0, got {self.expand_ratio}, "
                              f"{self.mlp_ratio}")
        if min(to_2tuple(self.img_size)) < 1:
            raise ConfigError(f"img_size must be positive, got {self.img_size}")

    @property
    def num_features(self) -> int:
        return min(self.last_layer_exp_factor * self.widths[-1], 960)


def make_divisible(value: float, divisor: int = 8) -> int:
    """The nearest multiple of ``divisor`` (at least ``divisor``), rounded up when rounding would lose over 10%
    (ml-cvnets ``utils/math_utils.make_divisible``, from the TF MobileNet code)."""
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * value else new


# -------------------------------------------------------------------------------------------------------- blocks
class InvertedResidual(nn.Module):
    """MobileNetV2 inverted residual (Sandler et al. 2018, Table 1; ml-cvnets ``InvertedResidual``): 1x1 expansion
    (BN, SiLU) → 3x3 depthwise with the stride (BN, SiLU) → 1x1 linear projection (BN); ``x + block(x)`` when the
    stride is 1 and the width is unchanged."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, expand_ratio: float):
        super().__init__()
        hidden = make_divisible(round(in_chs * expand_ratio))
        self.conv1_1x1 = ConvNormAct(in_chs, hidden, 1) if expand_ratio != 1 else nn.Identity()
        self.conv2_kxk = ConvNormAct(hidden, hidden, 3, stride, groups=hidden)
        self.conv3_1x1 = ConvNormAct(hidden, out_chs, 1, act=None)
        self.has_skip = stride == 1 and in_chs == out_chs

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv3_1x1(self.conv2_kxk(self.conv1_1x1(x)))
        return x + y if self.has_skip else y


def unfold_patches(x: Tensor, patch: int) -> tuple[Tensor, tuple[int, int]]:
    """(B, C, H, W) → (B·P, N, C) and the patch grid (n_h, n_w): row b·P + p holds pixel p (row-major within its
    p x p patch) of all N = n_h·n_w patches (row-major), as the official ``unfolding``; H and W are first resized
    bilinearly to multiples of ``patch`` when they are not. One copy (none before it for a channels-last map)."""
    B, C, H, W = x.shape
    n_h, n_w = math.ceil(H / patch), math.ceil(W / patch)
    if (n_h * patch, n_w * patch) != (H, W):
        x = F.interpolate(x, size=(n_h * patch, n_w * patch), mode="bilinear", align_corners=False)
    x = x.permute(0, 2, 3, 1).reshape(B, n_h, patch, n_w, patch, C)  # (B, n_h, p_h, n_w, p_w, C), a view
    x = x.permute(0, 2, 4, 1, 3, 5)  # (B, p_h, p_w, n_h, n_w, C)
    return x.reshape(B * patch * patch, n_h * n_w, C), (n_h, n_w)  # (B·P, N, C)


def fold_patches(x: Tensor, grid: tuple[int, int], patch: int, size: tuple[int, int]) -> Tensor:
    """The inverse of ``unfold_patches``: (B·P, N, C) → (B, C, H, W) with (H, W) = ``size`` (official
    ``folding``); the map comes out in channels-last memory, one copy."""
    (n_h, n_w), C = grid, x.shape[-1]
    x = x.reshape(-1, patch, patch, n_h, n_w, C).permute(0, 3, 1, 4, 2, 5)  # (B, n_h, p_h, n_w, p_w, C)
    x = x.reshape(x.shape[0], n_h * patch, n_w * patch, C).permute(0, 3, 1, 2)  # (B, C, n_h·p, n_w·p)
    if (n_h * patch, n_w * patch) != tuple(size):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return x


# The code each source's weights run in, for a feature map not divisible by the patch size; all three resize it the
# same way (bilinear, align_corners=False, up to the next multiple, and back after folding:
# tests/families/mobilevit/test_mobilevit.py checks each against its references). A vitkit file follows the official
# code.
UNFOLD_CODE = {
    "official": "apple/ml-cvnets cvnets/modules/mobilevit_block.py@7771756 (MobileViTBlock.unfolding / folding)",
    "timm": "timm==1.0.31 timm/models/mobilevit.py (MobileVitBlock.forward)",
    "hf": "transformers 5.25.0 models/mobilevit/modeling_mobilevit.py (MobileViTLayer.unfolding / folding)",
}

PATCH_ATTN_LAYOUT = ("(B·P, heads, N, N): row b·P + p holds image b's attention for pixel position p (row-major) of "
                     "the P = patch x patch positions, among the N = n_h·n_w patches of the stage's feature map "
                     "(row-major; n_h = ceil(H_stage / patch), n_w likewise); info: grid = (n_h, n_w), "
                     "groups_per_image = P")


class MobileViTBlock(nn.Module):
    """The MobileViT block (paper §3.1; ml-cvnets ``MobileViTBlock``, v1): local 3x3 + 1x1 convs, unfold, transformer
    (shared pre-norm ``Block``s) + LayerNorm, fold, 1x1 projection, fusion by concatenation with the input + 3x3
    conv."""

    def __init__(self, dim: int, transformer_dim: int, depth: int, cfg: MobileViTConfig, drop_path: Sequence[float]):
        super().__init__()
        d, k = transformer_dim, cfg.kernel_size
        self.patch = cfg.patch_size
        self.conv_kxk = ConvNormAct(dim, dim, k)
        self.conv_1x1 = nn.Conv2d(dim, d, 1, bias=False)
        self.transformer = nn.ModuleList([
            Block(d, norm_eps=1e-5, drop_path=drop_path[i],
                  attn=Attention(d, cfg.heads(d), qkv_bias=True, attn_drop=cfg.attn_drop_rate,
                                 proj_drop=cfg.proj_drop_rate),
                  mlp=Mlp(d, int(d * cfg.mlp_ratio), act_layer="silu", drop=cfg.proj_drop_rate,
                          hidden_drop=cfg.mlp_drop_rate))
            for i in range(depth)])
        for blk in self.transformer:
            blk.attn.attn_layout = PATCH_ATTN_LAYOUT
        self.norm = nn.LayerNorm(d, eps=1e-5)
        self.conv_proj = ConvNormAct(d, dim, 1)
        self.conv_fusion = None if cfg.no_fusion else ConvNormAct(2 * dim, dim, k)

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv_1x1(self.conv_kxk(x))  # (B, d, H, W) local representation
        patches, grid = unfold_patches(y, self.patch)  # (B·P, N, d)
        for blk in self.transformer:
            blk.attn.record_info = {"grid": grid, "groups_per_image": self.patch ** 2}  # for attention recorders
            patches = blk(patches)
        y = self.conv_proj(fold_patches(self.norm(patches), grid, self.patch, x.shape[-2:]))  # (B, C, H, W)
        if self.conv_fusion is None:  # official no_fuse_local_global_features
            return y
        return self.conv_fusion(torch.cat([x, y], dim=1))  # (B, C, H, W)


def global_pool(x: Tensor, kind: str) -> Tensor:
    """ml-cvnets ``GlobalPool`` (7771756 ``cvnets/layers/global_pool.py``) over the positions, (B, h·w, C) → (B, C):
    "mean", "abs" (mean of |x|) or "rms" as it computes it, mean(x²)^-½ (the inverse of the root mean square)."""
    if kind == "rms":
        return x.pow(2).mean(dim=1).pow(-0.5)
    return (x.abs() if kind == "abs" else x).mean(dim=1)


# ------------------------------------------------------------------------------------------------------- model
class MobileViT(LinearHead, FamilyModel):
    config_cls = MobileViTConfig
    intermediates = "pyramid"
    # the stem conv sees the input channels; the official weights expect BGR (data_cfg.channel_order), which does not
    # change how another in_chans is fitted (weights.adapt sums or repeats the channels, whatever their order)
    input_weights = ("stem.conv.weight",)
    convolutional = True  # MobileNetV2 blocks and the k×k local representations (paper §3.1)

    def __init__(self, cfg: MobileViTConfig):
        super().__init__()
        self.cfg = cfg
        self.num_classes = cfg.num_classes
        self.num_features = cfg.num_features
        self.stem = ConvNormAct(cfg.in_chans, cfg.stem_chs, 3, stride=2)
        rates = iter(drop_path_rates(cfg.drop_path_rate, sum(cfg.transformer_depths)))
        stages, c = [], cfg.stem_chs
        for i, (width, depth) in enumerate(zip(cfg.widths[:2], cfg.mv2_depths)):  # layer1, layer2
            stages.append(nn.Sequential(*[InvertedResidual(c if j == 0 else width, width, 2 if i and not j else 1,
                                                           cfg.expand_ratio) for j in range(depth)]))
            c = width
        for width, d, depth in zip(cfg.widths[2:], cfg.transformer_dims, cfg.transformer_depths):  # layer3-5
            stages.append(nn.Sequential(InvertedResidual(c, width, 2, cfg.expand_ratio),
                                        MobileViTBlock(width, d, depth, cfg, [next(rates) for _ in range(depth)])))
            c = width
        self.stages = nn.Sequential(*stages)
        self.final_conv = ConvNormAct(c, cfg.num_features, 1)
        self.head_drop = nn.Dropout(cfg.drop_rate)
        self.head = self._make_head(cfg.num_classes)
        self.init_weights()

    # ----------------------------------------------------------------------------------------------- construction
    def init_weights(self) -> None:
        """The official initialisation (ImageNet yaml): convs Kaiming-normal (fan_out), dense layers
        truncated-normal(0.02), zero biases; norms at 1 / 0 (PyTorch's defaults)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set[str]:
        return set()  # the official recipe decays everything (no_decay_bn_filter_bias: false); 1-d tensors aside

    @property
    def _depths(self) -> list[int]:
        return [len(stage) for stage in self.stages]

    def layer_id(self, param_name: str) -> int:
        """Swin-style staged numbering over the stage blocks (an inverted residual or a MobileViT block): 0 for the
        stem, then block by block, the last id for the final 1x1 conv and the head."""
        parts = param_name.split(".")
        if parts[0] == "stem":
            return staged_layer_id(self._depths, None)
        if parts[0] == "stages":
            return staged_layer_id(self._depths, int(parts[1]), int(parts[2]))
        return staged_layer_id(self._depths, len(self._depths))

    @property
    def num_layer_ids(self) -> int:
        return sum(self._depths) + 2

    # --------------------------------------------------------------------------------------------------- forward
    def forward_features(self, x: Tensor) -> Tensor:
        """(B, C, H, W) → (B, h·w, num_features) tokens of the last map (h, w = H/32, W/32 ceil-divided), after the
        final 1x1 conv (the contract's layout; the maps are in channels-last memory, see ``embed``)."""
        return self.final_conv(self.stages(self.embed(x))).flatten(2).transpose(1, 2)  # (B, C, h, w) → (B, h·w, C)

    def embed(self, x: Tensor) -> Tensor:
        """The stem. The maps are kept in channels-last memory from here on (same values): oneDNN's convolutions
        are faster on it, the 1x1 convs are plain matrix products, and unfolding then moves whole pixel vectors."""
        return self.stem(x.contiguous(memory_format=torch.channels_last))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = global_pool(x, self.cfg.global_pool)  # (B, num_features)
        return x if pre_logits else self.head(self.head_drop(x))

    def forward_intermediates(self, x: Tensor, indices: int | Sequence[int] | None = None,
                              norm: bool = False) -> list[Tensor]:
        """Outputs of chosen stages (layer1 … layer5), (B, C_i, H_i, W_i) each at strides 2, 4, 8, 16, 32.
        ``norm`` has no effect: the model ends in a conv, not a norm."""
        return block_outputs(self.stages, self.embed(x), select_indices(indices, len(self.stages), "stage"))

    # ------------------------------------------------------------------------------------------------ backbone
    def named_blocks(self) -> list[tuple[str, nn.Module]]:
        """The stage blocks in forward order: the inverted residuals of layer1-5 and the MobileViT blocks of
        layer3-5 (``stages.{i}.{j}``, the units ``layer_id`` numbers)."""
        return [(f"stages.{i}.{j}", blk) for i, stage in enumerate(self.stages) for j, blk in enumerate(stage)]

    def feature_names(self) -> list[str]:
        return [f"stages.{i}" for i in range(len(self.stages))]

    # ------------------------------------------------------------------------------------------ weight loading
    def load_pretrained_state(self, state: dict[str, Tensor], report) -> dict[str, Tensor]:
        """Nothing depends on the input size (no position embedding, no bias table: MobileViT learns positions
        through its convolutions), so only a head of another class count changes (zero-initialised)."""
        from vitkit.weights.adapt import adapt_head
        trained = to_2tuple(report.source_config.get("img_size", 256))
        if trained != to_2tuple(self.cfg.img_size):
            code = UNFOLD_CODE.get(report.format, UNFOLD_CODE["official"])
            report.notes.append(f"input {to_2tuple(self.cfg.img_size)} (checkpoint built for {trained}): nothing "
                                f"needed resizing, MobileViT has no position embedding or bias table; feature maps "
                                f"not divisible by the patch size are resized bilinearly (align_corners=False) to "
                                f"the next multiple inside each MobileViT block and back after folding, as {code} "
                                f"does")
        return adapt_head(state, "head", self.head, report)
