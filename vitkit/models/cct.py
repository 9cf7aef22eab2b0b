"""Compact Convolutional Transformer (Hassani et al., "Escaping the Big Data Paradigm with Compact Transformers",
arXiv 2104.05704).

    x₀ = MaxPool(ReLU(Conv2d(x)))  (repeated), flattened into tokens      (§3.2, convolutional tokenizer)
    z = x₀ + E_pos  (learnable, sinusoidal or none)
    z' = LN(z + MSA(LN(z))),  z = z' + MLP(z')                             (SHI-Labs ``TransformerEncoderLayer``)
    x_L = LN(z_L);  w = softmax(g(x_L)) over tokens;  y = wᵀ x_L            (§3.1, sequence pooling)

The definition is the official code, SHI-Labs/Compact-Transformers ``src/cct.py``, ``src/utils/tokenizer.py`` and
``src/utils/transformers.py`` at cd11f09: qkv without bias, LayerNorm eps 1e-5, GELU, no class token, the encoder
block whose second norm normalises the residual stream (``Block(residual_norm=True)``), attention dropout 0.1 and
stochastic depth 0.1 as model defaults. Config names are the official constructor's (``embedding_dim``,
``num_layers``, ``n_conv_layers``, ``positional_embedding``, ...).

Sinusoidal position tables are frozen: a buffer here, loaded from the checkpoint (and checked against the table the
official formula gives), regenerated only for another token count, as the official ``_cct`` does. The official
``*_sine`` factory functions at cd11f09 drop ``positional_embedding`` and build a learnable model (introduced in
404de47, after the checkpoints were trained); vitkit's ``*_sine`` variants are sinusoidal, and a checkpoint's own
table decides which kind a loaded model gets.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitkit.config import ConfigError, check_ranges
from vitkit.layers import Attention, Block, drop_path_rates, resample_pos_embed, sinusoid_table, to_2tuple
from vitkit.models.base import (FamilyModel, LinearHead, block_layer_id, block_outputs, select_indices,
                                tokens_to_map)
from vitkit.models.cct_formats import CCT_FORMATS, WEIGHTS
from vitkit.registry import register_family
from vitkit.specs import IMAGENET_MEAN, IMAGENET_STD, PreprocessConfig, Reference

__all__ = ["CCTConfig", "CCT", "ConvTokenizer"]


@dataclass
class CCTConfig:
    img_size: int | tuple[int, int] = 224
    in_chans: int = 3
    num_classes: int = 1000  # 0 = no head (forward returns the pooled features)
    embedding_dim: int = 768
    num_layers: int = 14
    num_heads: int = 6
    mlp_ratio: float = 4.0
    n_conv_layers: int = 1  # tokenizer: Conv → ReLU → MaxPool, this many times
    kernel_size: int = 7
    stride: int | None = None  # None: max(1, kernel_size // 2 - 1), as the official _cct
    padding: int | None = None  # None: max(1, kernel_size // 2)
    pooling_kernel_size: int = 3
    pooling_stride: int = 2
    pooling_padding: int = 1
    conv_channels: int = 64  # channels of the tokenizer's intermediate conv layers (official in_planes)
    positional_embedding: Literal["learnable", "sine", "none"] = "learnable"
    dropout: float = 0.0  # after the position embedding, the attention projection and both MLP layers
    attention_dropout: float = 0.1  # official default
    stochastic_depth: float = 0.1  # official default, linearly increasing over the blocks
    dynamic_img_size: bool = False  # accept other input sizes: learnable table resampled, sine table regenerated

    def validate(self) -> None:
        check_ranges(self, rates=("dropout", "attention_dropout", "stochastic_depth"),
                     positive=("in_chans", "embedding_dim", "num_layers", "num_heads", "n_conv_layers", "kernel_size",
                               "pooling_kernel_size", "pooling_stride", "conv_channels", "mlp_ratio"),
                     non_negative=("num_classes",))
        if self.embedding_dim % self.num_heads:
            raise ConfigError(f"embedding_dim {self.embedding_dim} is not divisible by num_heads {self.num_heads}")
        if (self.stride is not None and self.stride <= 0) or (self.padding is not None and self.padding < 0) \
                or self.pooling_padding < 0:
            raise ConfigError("stride must be positive, padding and pooling_padding >= 0")
        if self.pooling_padding > self.pooling_kernel_size // 2:
            raise ConfigError(f"pooling_padding {self.pooling_padding} must be at most half of pooling_kernel_size "
                              f"{self.pooling_kernel_size}")
        h, w = token_grid(self, *to_2tuple(self.img_size))
        if h <= 0 or w <= 0:
            raise ConfigError(f"img_size {self.img_size} leaves no token after the {self.n_conv_layers}-layer "
                              f"tokenizer")

    @property
    def conv_stride(self) -> int:
        return self.stride if self.stride is not None else max(1, self.kernel_size // 2 - 1)

    @property
    def conv_padding(self) -> int:
        return self.padding if self.padding is not None else max(1, self.kernel_size // 2)


def token_grid(cfg: CCTConfig, H: int, W: int) -> tuple[int, int]:
    """The (h, w) token grid of an H×W image: each tokenizer layer is a conv then a max-pool (output-size formula of
    both: (n + 2·padding − kernel) // stride + 1)."""
    def out(n: int, k: int, s: int, p: int) -> int:
        return (n + 2 * p - k) // s + 1
    for _ in range(cfg.n_conv_layers):
        H, W = (out(n, cfg.kernel_size, cfg.conv_stride, cfg.conv_padding) for n in (H, W))
        H, W = (out(n, cfg.pooling_kernel_size, cfg.pooling_stride, cfg.pooling_padding) for n in (H, W))
    return H, W


class ConvTokenizer(nn.Module):
    """CCT's convolutional tokenizer (paper §3.2; official ``Tokenizer``): ``n_conv_layers`` × [Conv2d without bias →
    ReLU → MaxPool2d], intermediate layers ``conv_channels`` wide, the last ``embedding_dim``; the final map is
    flattened row-major into tokens."""

    def __init__(self, cfg: CCTConfig):
        super().__init__()
        chans = [cfg.in_chans] + [cfg.conv_channels] * (cfg.n_conv_layers - 1) + [cfg.embedding_dim]
        self.convs = nn.ModuleList(
            nn.Conv2d(chans[i], chans[i + 1], cfg.kernel_size, cfg.conv_stride, cfg.conv_padding, bias=False)
            for i in range(cfg.n_conv_layers))
        self.pool = nn.MaxPool2d(cfg.pooling_kernel_size, cfg.pooling_stride, cfg.pooling_padding)

    def forward(self, x: Tensor) -> Tensor:
        x = x.contiguous(memory_format=torch.channels_last)  # faster convs and pooling (cct.md), and free tokens
        for conv in self.convs:
            x = self.pool(F.relu(conv(x), inplace=True))  # (B, C_i, H_i, W_i), channels-last in memory
        return x.flatten(2).transpose(1, 2)  # (B, h·w, D): a view, already contiguous


class CCT(LinearHead, FamilyModel):
    config_cls = CCTConfig
    intermediates = "tokens"
    num_prefix_tokens = 0  # no class token: sequence pooling reads every token

    def __init__(self, cfg: CCTConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.embedding_dim
        self.num_classes = cfg.num_classes
        self.num_features = D
        self.grid = token_grid(cfg, *to_2tuple(cfg.img_size))
        self.tokenizer = ConvTokenizer(cfg)
        n = self.grid[0] * self.grid[1]
        if cfg.positional_embedding == "learnable":
            self.pos_embed = nn.Parameter(torch.zeros(1, n, D))
        elif cfg.positional_embedding == "sine":  # frozen: saved with the weights, never trained
            self.register_buffer("pos_embed", sinusoid_table(n, D, angle_dtype=torch.float32))
        else:
            self.pos_embed = None
        self.pos_drop = nn.Dropout(cfg.dropout)
        rates = drop_path_rates(cfg.stochastic_depth, cfg.num_layers)
        self.blocks = nn.Sequential(*[
            Block(D, mlp_ratio=cfg.mlp_ratio, proj_drop=cfg.dropout, drop_path=rates[i], norm_eps=1e-5,
                  attn=Attention(D, cfg.num_heads, qkv_bias=False, attn_drop=cfg.attention_dropout,
                                 proj_drop=cfg.dropout),
                  residual_norm=True)
            for i in range(cfg.num_layers)])
        self.norm = nn.LayerNorm(D)
        self.attn_pool = nn.Linear(D, 1)
        self.head = self._make_head(cfg.num_classes)
        self.init_weights()

    # ----------------------------------------------------------------------------------------------- construction
    def init_weights(self) -> None:
        """The official initialisation: Kaiming-normal tokenizer convs, truncated-normal(0.02) dense layers (head
        included) with zero biases, unit LayerNorms, and a learnable position table drawn with std 0.2 (not 0.02)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if isinstance(self.pos_embed, nn.Parameter):
            nn.init.trunc_normal_(self.pos_embed, std=0.2)

    def no_weight_decay(self) -> set[str]:
        """None besides 1-d tensors: the official training (timm ``create_optimizer``; CCT defines no
        ``no_weight_decay``) decays the learnable position table."""
        return set()

    def layer_id(self, param_name: str) -> int:
        """0 for the tokenizer and position table, i + 1 for block i, num_layers + 1 for norm, pooling and head."""
        return block_layer_id(param_name, self.cfg.num_layers, ("tokenizer.", "pos_embed"))

    @property
    def num_layer_ids(self) -> int:
        return self.cfg.num_layers + 2

    # --------------------------------------------------------------------------------------------------- forward
    def _pos_embed(self, grid: tuple[int, int]) -> Tensor:
        """The position table for a token grid: the model's own, or (``dynamic_img_size``) the learnable table
        resampled as the official ``pe_check`` does (bilinear), or the sinusoid regenerated for the new length."""
        if grid == self.grid:
            return self.pos_embed
        if not self.cfg.dynamic_img_size:
            raise ValueError(f"input gives a {grid[0]}x{grid[1]} token grid but the model was built for "
                             f"{self.grid[0]}x{self.grid[1]} (img_size {self.cfg.img_size}); pass img_size= to "
                             f"create_model, or dynamic_img_size=True")
        if self.cfg.positional_embedding == "sine":
            table = sinusoid_table(grid[0] * grid[1], self.cfg.embedding_dim, angle_dtype=torch.float32)
            return table.to(self.pos_embed)
        return resample_pos_embed(self.pos_embed, grid, self.grid, 0, "bilinear", antialias=False)

    def embed(self, x: Tensor) -> Tensor:
        """Tokenize and add the position embedding: (B, C, H, W) → (B, N, D)."""
        grid = token_grid(self.cfg, x.shape[2], x.shape[3])
        x = self.tokenizer(x)  # (B, N, D)
        if self.pos_embed is not None:  # without one, any input size works
            x = x + self._pos_embed(grid)
        return self.pos_drop(x)

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, C, H, W) images → (B, N, D) normalised tokens (before sequence pooling)."""
        return self.norm(self.blocks(self.embed(x)))

    def pool(self, x: Tensor) -> Tensor:
        """Sequence pooling (paper §3.1): importance weights softmax(g(x_L)) over the N tokens, then their weighted
        sum."""
        w = self.attn_pool(x).softmax(dim=1)  # (B, N, 1)
        return (w.transpose(1, 2) @ x).squeeze(1)  # (B, D)

    def readout_weights(self, features: Tensor) -> Tensor:
        """(B, N): the sequence-pooling weights softmax(g(x_L)), what the head reads of each token."""
        return self.attn_pool(features).softmax(dim=1).squeeze(-1)

    def feature_map(self, features: Tensor, image_hw: tuple[int, int]) -> Tensor:
        return tokens_to_map(features, 0, image_hw)  # (B, D, h, w)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.pool(x)
        return x if pre_logits else self.head(x)

    def forward_intermediates(self, x: Tensor, indices: int | Sequence[int] | None = None, norm: bool = False,
                              reshape: bool = False) -> list[Tensor]:
        """Outputs of chosen blocks (an int n = the last n, a list of indices, None = all), each (B, N, D), or with
        ``reshape=True`` a (B, D, h, w) map; ``norm`` applies the final LayerNorm to each."""
        wanted = select_indices(indices, len(self.blocks))  # a bad index fails before any work
        h, w = token_grid(self.cfg, x.shape[2], x.shape[3])
        outs = block_outputs(self.blocks, self.embed(x), wanted)
        outs = [self.norm(y) for y in outs] if norm else outs
        return [y.transpose(1, 2).reshape(y.shape[0], -1, h, w) for y in outs] if reshape else outs  # (B, D, h, w)

    # ------------------------------------------------------------------------------------------ weight loading
    def load_pretrained_state(self, state: dict[str, Tensor], report) -> dict[str, Tensor]:
        """Fit the position table to this model's token count (learnable: resampled bilinearly as the official
        ``pe_check``; sine: loaded and checked, or regenerated for another count as the official ``_cct``) and
        zero-initialise a head of another class count (the official ``fc_check`` keeps a fresh head)."""
        from vitkit.models.cct_formats import fit_pos_embed
        from vitkit.weights.adapt import adapt_head
        state = fit_pos_embed(self, state, report)
        return adapt_head(state, "head", self.head, report)


# -------------------------------------------------------------------------------------------------- variants
# src/cct.py size presets: layers, heads, MLP ratio, width.
SIZES = {
    2: dict(num_layers=2, num_heads=2, mlp_ratio=1.0, embedding_dim=128),
    4: dict(num_layers=4, num_heads=2, mlp_ratio=1.0, embedding_dim=128),
    6: dict(num_layers=6, num_heads=4, mlp_ratio=2.0, embedding_dim=256),
    7: dict(num_layers=7, num_heads=4, mlp_ratio=2.0, embedding_dim=256),
    14: dict(num_layers=14, num_heads=6, mlp_ratio=3.0, embedding_dim=384),
}
# (size, kernel, conv layers, resolution, classes, has a _sine twin): the official factory functions' defaults. The
# CIFAR variants default to 10 classes, CCT-7/7x2 to Flowers-102's 102, CCT-14 to ImageNet's 1000.
_SHAPES = [(2, 3, 2, 32, 10, True), (4, 3, 2, 32, 10, True), (6, 3, 1, 32, 10, True), (6, 3, 2, 32, 10, True),
           (7, 3, 1, 32, 10, True), (7, 3, 2, 32, 10, True), (7, 7, 2, 224, 102, True),
           (14, 7, 2, 224, 1000, False), (14, 7, 2, 384, 1000, False)]
VARIANTS = {}
for _size, _k, _convs, _res, _classes, _sine in _SHAPES:
    _cfg = dict(**SIZES[_size], kernel_size=_k, n_conv_layers=_convs, img_size=_res, num_classes=_classes)
    VARIANTS[f"cct_{_size}_{_k}x{_convs}_{_res}"] = dict(_cfg, positional_embedding="learnable")
    if _sine:
        VARIANTS[f"cct_{_size}_{_k}x{_convs}_{_res}_sine"] = dict(_cfg, positional_embedding="sine")

# Official evaluation preprocessing (configs/datasets/*.yml): dataset mean/std, bicubic, crop_pct 1.0 (0.9 ImageNet).
_CIFAR = PreprocessConfig(mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616), crop_pct=1.0, label_set=None)
_FLOWERS = PreprocessConfig(mean=(0.4353, 0.3773, 0.2872), std=(0.2966, 0.2455, 0.2698), crop_pct=1.0,
                            label_set=None)
_IMAGENET = PreprocessConfig(mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_pct=0.9)
DATA_CFGS = {name: {10: _CIFAR, 102: _FLOWERS, 1000: _IMAGENET}[cfg["num_classes"]] for name, cfg in VARIANTS.items()}

# Trainable parameters (M; a sine table is a buffer) and forward GMACs at the native size with the default class count,
# counted on the official code (CCT(...) at cd11f09 on zeros, torch FlopCounterMode / 2, attention products included;
# tests/data/cct/make_reference.py → official_sizes.json). architectures.md §1.8 counted the same way and rounds them
# to two decimals (CCT-7/3x1 3.76 M / 1.18 G, CCT-14/7x2 22.37 M / 5.52 G). The older examples/README.md table
# (CCT-7/3x1 3.760M / 0.947G) counts fewer MACs: its counter misses part of attention.
_SOURCE = "official CCT at cd11f09, counted (tests/data/cct/official_sizes.json; architectures.md §1.8)"
_COUNTED = {
    "cct_2_3x2_32": (0.283723, 0.035341568),
    "cct_2_3x2_32_sine": (0.275531, 0.035341568),
    "cct_4_3x2_32": (0.482123, 0.050021632),
    "cct_4_3x2_32_sine": (0.473931, 0.050021632),
    "cct_6_3x1_32": (3.233803, 1.013844480),
    "cct_6_3x1_32_sine": (3.168267, 1.013844480),
    "cct_6_3x2_32": (3.326923, 0.253463040),
    "cct_6_3x2_32_sine": (3.310539, 0.253463040),
    "cct_7_3x1_32": (3.760139, 1.181616640),
    "cct_7_3x1_32_sine": (3.694603, 1.181616640),
    "cct_7_3x2_32": (3.853259, 0.289114624),
    "cct_7_3x2_32_sine": (3.836875, 0.289114624),
    "cct_7_7x2_224": (4.573735, 1.604554240),
    "cct_7_7x2_224_sine": (4.523559, 1.604554240),
    "cct_14_7x2_224": (22.367273, 5.521901568),
    "cct_14_7x2_384": (22.513193, 18.580282368),
}
REFERENCES = {name: Reference(params, gmacs, _SOURCE, params_tol=1e-6, macs_rtol=1e-6)
              for name, (params, gmacs) in _COUNTED.items()}


def tiny(name: str, cfg: dict) -> dict:
    """2 blocks of width 32 on a few tokens: 16-px inputs for the 3x3 tokenizers (8x8 or 4x4 tokens), 32 px for the
    7x7 stride-2 ones (2x2 tokens)."""
    return dict(num_layers=2, embedding_dim=32, num_heads=2, conv_channels=8, img_size=16 if cfg["kernel_size"] == 3
                else 32)


register_family("cct", CCT, VARIANTS, DATA_CFGS, formats=CCT_FORMATS, weights=WEIGHTS, references=REFERENCES,
                tiny=tiny, paper="Hassani et al. 2021, arXiv 2104.05704")
