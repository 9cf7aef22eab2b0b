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
from vitkit.families.contract import (FamilyModel, LinearHead, block_layer_id, block_outputs, select_indices)
from vitkit.layers import Attention, Block, drop_path_rates, resample_pos_embed, sinusoid_table, to_2tuple

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
        x = x.contiguous(memory_format=torch.channels_last)  # faster convs and pooling, and free tokens
        for conv in self.convs:
            x = self.pool(F.relu(conv(x), inplace=True))  # (B, C_i, H_i, W_i), channels-last in memory
        return x.flatten(2).transpose(1, 2)  # (B, h·w, D): a view, already contiguous


class CCT(LinearHead, FamilyModel):
    config_cls = CCTConfig
    intermediates = "tokens"
    num_prefix_tokens = 0  # no class token: sequence pooling reads every token
    input_weights = ("tokenizer.convs.0.weight",)
    convolutional = True  # the convolutional tokenizer (paper §3.2): k×k convolutions of stride < k

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

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.pool(x)
        return x if pre_logits else self.head(x)

    def named_blocks(self) -> list[tuple[str, nn.Module]]:
        return [(f"blocks.{i}", blk) for i, blk in enumerate(self.blocks)]

    @property
    def accepts_any_size(self) -> bool:
        return self.cfg.dynamic_img_size

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
        from vitkit.families.cct.formats import fit_pos_embed
        from vitkit.weights.adapt import adapt_head
        state = fit_pos_embed(self, state, report)
        return adapt_head(state, "head", self.head, report)
