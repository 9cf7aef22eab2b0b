"""Tokens-to-Token ViT (Yuan et al., "Tokens-to-Token ViT: Training Vision Transformers from Scratch on ImageNet",
ICCV 2021, arXiv 2101.11986); the definition is the official code, yitu-opensource/T2T-ViT ``models/t2t_vit.py``.

The T2T module builds tokens progressively (paper §3.1):

    T₁ = SS₀(I)                        soft split: nn.Unfold(7, stride 4, pad 2), overlapping 7x7 patches
    T'ᵢ = MLP(MSA(Tᵢ))                 a narrow single-head T2T layer (eq. 1), Performer or Transformer
    Iᵢ = Reshape(T'ᵢ)                  tokens back to a (C, h, w) map (eq. 2)
    Tᵢ₊₁ = SSᵢ(Iᵢ)                     soft split: nn.Unfold(3, stride 2, pad 1) (eq. 3), i = 1, 2
    T_f = Linear(T₃)                   to the backbone width D

then a ViT backbone (eq. 5): [cls; T_f] + E with a fixed sinusoidal E, pre-norm blocks, LN, head on the class token.
The grid shrinks 4·2·2 = 16x: 224 px → 56² → 28² → 14² tokens.

Official-code details kept here: a T2T layer changes the width (C·k² → token_dim), so it has no residual around its
attention; the attention adds its own ``v`` instead (``x = v + proj(attn)``). The Transformer T2T layer scales q·kᵀ by
its *input* width (C·k²)^-1/2 (the official ``Attention`` takes head_dim = dim // num_heads with one head). The
Performer T2T layer orders its projection (k, q, v) and draws m = token_dim/2 random features once; they are a frozen
parameter of the checkpoints and are loaded, never redrawn. The backbone's q·kᵀ scale is head_dim^-1/2
(``qk_scale=None``): the official evaluation builds its models with ``pretrained=False``; only the factory functions'
``pretrained=True`` branch would set embed_dim^-1/2 (``qk_scale`` overrides it). LayerNorm eps is PyTorch's 1e-5
throughout.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch
from torch import Tensor, nn

from vitkit.config import ConfigError, check_ranges
from vitkit.families.contract import (FamilyModel, LinearHead, block_layer_id, block_outputs, select_indices,
                                      trunc_normal_linears_)
from vitkit.families.t2t_vit.formats import RESIZE
from vitkit.layers import (Attention, Block, Mlp, RecordsAttention, attend, drop_path_rates, favor_attention,
                           orthogonal_features, sinusoid_table, to_2tuple)

__all__ = ["T2TViTConfig", "T2TViT", "TokenAttention", "TokenPerformerAttention", "TokenBlock", "T2TModule",
           "t2t_grid"]

# (kernel, stride, padding) of the three soft splits (official T2T_module)
SOFT_SPLITS = ((7, 4, 2), (3, 2, 1), (3, 2, 1))


def _split_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """Output length of an unfold along one side: ⌊(s + 2p − k) / stride⌋ + 1."""
    return (size + 2 * padding - kernel) // stride + 1


def t2t_grid(img_size: int | tuple[int, int]) -> tuple[int, int]:
    """The backbone's token grid (h, w) for an input size, through the three soft splits. (The official code assumes
    ``img_size // 16``; the two agree for multiples of 16.)"""
    h, w = to_2tuple(img_size)
    for split in SOFT_SPLITS:
        h, w = _split_size(h, *split), _split_size(w, *split)
    return h, w


@dataclass
class T2TViTConfig:
    img_size: int | tuple[int, int] = 224
    in_chans: int = 3
    num_classes: int = 1000  # 0 = no head (forward returns the class token's features)
    tokens_type: Literal["performer", "transformer", "convolution"] = "performer"  # the T2T layers' attention
    token_dim: int = 64  # width of the T2T layers
    kernel_ratio: float = 0.5  # Performer: m = int(token_dim · kernel_ratio) random features
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = False
    qk_scale: float | None = None  # backbone q·kᵀ scale; None = head_dim^-1/2 (the official evaluation)
    token_drop_rate: float | None = None  # dropout in the T2T layers; None = official (Performer 0.1, Transformer 0)
    drop_rate: float = 0.0  # after the position embedding and in every backbone block (official drop_rate)
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0

    def validate(self) -> None:
        if self.tokens_type == "convolution":
            raise ConfigError("tokens_type 'convolution' cannot run in the official code (T2T-ViT@0f63dc9 "
                              "models/t2t_vit.py: T2T_module.forward calls attention1, which is built only for "
                              "'performer' and 'transformer'; its comment says 'you need change forward')")
        check_ranges(self, positive=("embed_dim", "depth", "num_heads", "token_dim", "in_chans", "mlp_ratio"),
                     non_negative=("num_classes",))
        if self.embed_dim % self.num_heads:
            raise ConfigError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if int(self.token_dim * self.kernel_ratio) < 1:
            raise ConfigError(f"kernel_ratio {self.kernel_ratio} leaves no Performer feature for token_dim "
                              f"{self.token_dim}")
        if self.qk_scale is not None and self.qk_scale <= 0:
            raise ConfigError(f"qk_scale must be positive, got {self.qk_scale}")
        for name in ("token_drop_rate", "drop_rate", "attn_drop_rate", "drop_path_rate"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {value}")
        if min(to_2tuple(self.img_size)) < 3:
            raise ConfigError(f"img_size {self.img_size} is too small: the 7x7 soft split needs at least 3 pixels")

    @property
    def t2t_drop(self) -> float:
        if self.token_drop_rate is not None:
            return self.token_drop_rate
        return 0.1 if self.tokens_type == "performer" else 0.0  # Token_performer's dp1 = dp2 = 0.1


# ------------------------------------------------------------------------------------------------ T2T layers
class TokenAttention(RecordsAttention):
    """The Transformer T2T layer's single-head attention (official ``token_transformer.Attention``), width dim →
    out_dim: ``x = v + proj(softmax(q kᵀ · dim^-1/2) v)``; v is the residual, and the scale uses the input width
    ``dim``."""

    attn_layout = "(B, 1, N, N): single-head attention among the soft-split tokens; info['grid'] = their (h, w)"

    def __init__(self, dim: int, out_dim: int, proj_drop: float = 0.0):
        super().__init__()
        self.out_dim = out_dim
        self.scale = dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * out_dim, bias=False)
        self.proj = nn.Linear(out_dim, out_dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor, grid: tuple[int, int]) -> Tensor:
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, 1, self.out_dim).permute(2, 0, 3, 1, 4).unbind(0)  # (B, 1, N, d) each
        y = attend(q, k, v, scale=self.scale, record=self.attn_recorder, grid=grid).squeeze(1)  # (B, N, d)
        return v.squeeze(1) + self.proj_drop(self.proj(y))


class TokenPerformerAttention(RecordsAttention):
    """The Performer T2T layer's attention (official ``Token_performer.single_attn``): ``kqv`` projects to (k, q, v),
    FAVOR+ attention with the stored random features ``w`` (``vitkit.layers.performer``, ε = 1e-8), then
    ``x = v + dropout(proj(attn))``. Queries and keys are not scaled."""

    attn_layout = ("(B, 1, N, N): the attention the Performer implies, row-normalised φ(q)φ(k)ᵀ (rows sum to 1; "
                   "output before proj = info['row_mass'] · A v, row_mass = s/(s+ε)); info['grid'] = tokens' (h, w)")

    def __init__(self, dim: int, out_dim: int, kernel_ratio: float = 0.5, proj_drop: float = 0.1):
        super().__init__()
        self.out_dim = out_dim
        self.kqv = nn.Linear(dim, 3 * out_dim)
        self.proj = nn.Linear(out_dim, out_dim)
        self.proj_drop = nn.Dropout(proj_drop)
        # frozen random features: part of the checkpoint, loaded with it (a Parameter, as in the official files)
        self.w = nn.Parameter(orthogonal_features(int(out_dim * kernel_ratio), out_dim), requires_grad=False)

    def forward(self, x: Tensor, grid: tuple[int, int]) -> Tensor:
        k, q, v = self.kqv(x).split(self.out_dim, dim=-1)  # (B, N, d) each
        y = favor_attention(q, k, v, self.w, eps=1e-8, record=self.attn_recorder, grid=grid)  # (B, N, d)
        return v + self.proj_drop(self.proj(y))


class TokenBlock(nn.Module):
    """One T2T layer, T' = MLP(MSA(T)) (paper eq. 1; official Token_transformer / Token_performer):
    ``x = attn(LN(x))`` (no residual: the width changes, the attention adds its v), then ``x = x + MLP(LN(x))`` with an
    MLP of ratio 1. ``drop`` is the dropout after the attention projection and after the MLP."""

    def __init__(self, dim: int, out_dim: int, tokens_type: str, kernel_ratio: float, drop: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = (TokenPerformerAttention(dim, out_dim, kernel_ratio, drop) if tokens_type == "performer"
                     else TokenAttention(dim, out_dim, drop))
        self.norm2 = nn.LayerNorm(out_dim)
        self.mlp = Mlp(out_dim, out_dim)
        self.mlp_drop = nn.Dropout(drop)

    def forward(self, x: Tensor, grid: tuple[int, int]) -> Tensor:
        x = self.attn(self.norm1(x), grid)  # (B, N, out_dim)
        return x + self.mlp_drop(self.mlp(self.norm2(x)))


def soft_split(image: Tensor, unfold: nn.Unfold) -> tuple[Tensor, tuple[int, int]]:
    """(B, C, H, W) → overlapping k x k patches as tokens (B, h·w, C·k²) and their grid (h, w) (paper eq. 3)."""
    split = (unfold.kernel_size, unfold.stride, unfold.padding)  # ints: the unfolds are built square
    grid = (_split_size(image.shape[-2], *split), _split_size(image.shape[-1], *split))
    return unfold(image).transpose(1, 2), grid  # (B, h·w, C·k²)


def restructure(tokens: Tensor, grid: tuple[int, int]) -> Tensor:
    """Tokens (B, h·w, C) back to an image (B, C, h, w) (paper eq. 2, re-structurization)."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *grid)  # (B, C, h, w)


class T2TModule(nn.Module):
    """Soft split → T2T layer → re-structurize → soft split → T2T layer → re-structurize → soft split → project."""

    def __init__(self, cfg: T2TViTConfig):
        super().__init__()
        (k0, s0, p0), (k1, s1, p1), (k2, s2, p2) = SOFT_SPLITS
        self.soft_split0 = nn.Unfold(k0, stride=s0, padding=p0)
        self.soft_split1 = nn.Unfold(k1, stride=s1, padding=p1)
        self.soft_split2 = nn.Unfold(k2, stride=s2, padding=p2)
        d, layer = cfg.token_dim, dict(tokens_type=cfg.tokens_type, kernel_ratio=cfg.kernel_ratio, drop=cfg.t2t_drop)
        self.attention1 = TokenBlock(cfg.in_chans * k0 * k0, d, **layer)
        self.attention2 = TokenBlock(d * k1 * k1, d, **layer)
        self.project = nn.Linear(d * k2 * k2, cfg.embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) → (B, h·w, D) tokens, h·w = ``t2t_grid``."""
        x, grid = soft_split(x, self.soft_split0)  # (B, H/4·W/4, C·49)
        x, grid = soft_split(restructure(self.attention1(x, grid), grid), self.soft_split1)  # (B, H/8·W/8, 9·d)
        x, grid = soft_split(restructure(self.attention2(x, grid), grid), self.soft_split2)  # (B, H/16·W/16, 9·d)
        return self.project(x)


# ------------------------------------------------------------------------------------------------------ model
class T2TViT(LinearHead, FamilyModel):
    config_cls = T2TViTConfig
    num_prefix_tokens = 1  # the class token before the soft-split grid
    intermediates = "tokens"
    input_weights = ("tokens_to_token.attention1.norm1.weight",)
    fixed_input_channels = (
        "the first T2T layer LayerNorms the unfolded in_chans·7·7 values of a patch together, with a scale and shift "
        "per channel, before its projection (which has no bias in the 'transformer' T2T layers): no first layer for "
        "another in_chans answers alike in general, so none is derived; train one anew instead")

    def __init__(self, cfg: T2TViTConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.embed_dim
        self.num_classes = cfg.num_classes
        self.num_features = D
        self.grid = t2t_grid(cfg.img_size)
        self.tokens_to_token = T2TModule(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        # fixed, not learned: a frozen Parameter, so it is a state-dict key as in the official files
        self.pos_embed = nn.Parameter(sinusoid_table(1 + self.grid[0] * self.grid[1], D), requires_grad=False)
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        rates = drop_path_rates(cfg.drop_path_rate, cfg.depth)
        self.blocks = nn.Sequential(*[
            Block(D, mlp_ratio=cfg.mlp_ratio, proj_drop=cfg.drop_rate, drop_path=rates[i], norm_eps=1e-5,
                  attn=Attention(D, cfg.num_heads, cfg.qkv_bias, cfg.attn_drop_rate, cfg.drop_rate,
                                 scale=cfg.qk_scale))
            for i in range(cfg.depth)])
        self.norm = nn.LayerNorm(D)
        self.head = self._make_head(cfg.num_classes)
        self.init_weights()

    # ----------------------------------------------------------------------------------------------- construction
    def init_weights(self) -> None:
        """The official initialisation: truncated-normal(0.02) dense layers and class token, zero biases (the head
        too is truncated-normal, as in T2T_ViT._init_weights); LayerNorms at 1 / 0."""
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        trunc_normal_linears_(self)

    def no_weight_decay(self) -> set[str]:
        return {"cls_token"}  # official; pos_embed and the Performer features are frozen

    def layer_id(self, param_name: str) -> int:
        """0 for the T2T module, class token and position table, i + 1 for block i, depth + 1 for norm and head."""
        return block_layer_id(param_name, self.cfg.depth, ("cls_token", "pos_embed", "tokens_to_token."))

    @property
    def num_layer_ids(self) -> int:
        return self.cfg.depth + 2

    # --------------------------------------------------------------------------------------------------- forward
    def embed(self, x: Tensor) -> Tensor:
        """(B, C, H, W) → (B, 1 + h·w, D): T2T tokens, class token prepended, fixed position table added (eq. 5)."""
        grid = t2t_grid(tuple(x.shape[-2:]))
        if grid != self.grid:
            raise ValueError(f"a {x.shape[-2]}x{x.shape[-1]} input gives a {grid[0]}x{grid[1]} token grid; this model "
                             f"was built for img_size={self.cfg.img_size} ({self.grid[0]}x{self.grid[1]}): create it "
                             f"with img_size=({x.shape[-2]}, {x.shape[-1]})")
        x = self.tokens_to_token(x)  # (B, h·w, D)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1 + h·w, D)
        return self.pos_drop(x + self.pos_embed)

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, C, H, W) → (B, 1 + h·w, D) normalised tokens."""
        return self.norm(self.blocks(self.embed(x)))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = x[:, 0]  # (B, D) class token
        return x if pre_logits else self.head(x)

    def named_blocks(self) -> list[tuple[str, nn.Module]]:
        return [(f"blocks.{i}", blk) for i, blk in enumerate(self.blocks)]

    def forward_intermediates(self, x: Tensor, indices: int | Sequence[int] | None = None, norm: bool = False,
                              reshape: bool = False) -> list[Tensor]:
        """Outputs of chosen backbone blocks, (B, 1 + h·w, D) each, or with ``reshape=True`` the patch tokens as a
        (B, D, h, w) map; ``norm`` applies the final LayerNorm."""
        outs = block_outputs(self.blocks, self.embed(x), select_indices(indices, len(self.blocks)))
        outs = [self.norm(y) for y in outs] if norm else outs
        if reshape:  # (B, D, h, w)
            outs = [y[:, 1:].transpose(1, 2).reshape(y.shape[0], -1, *self.grid) for y in outs]
        return outs

    # ------------------------------------------------------------------------------------------ weight loading
    def load_pretrained_state(self, state: dict[str, Tensor], report) -> dict[str, Tensor]:
        """Check the T2T layer type, fit the position table to another grid, and zero-initialise a head of another
        class count."""
        from vitkit.weights.adapt import adapt_head
        self._check_tokens_type(state, report.source)
        state = self._fit_pos_embed(state, report)
        return adapt_head(state, "head", self.head, report)

    def _check_tokens_type(self, state: dict[str, Tensor], source: str) -> None:
        from vitkit.weights.load_report import CheckpointMismatchError
        held = ("performer" if "tokens_to_token.attention1.attn.kqv.weight" in state else
                "transformer" if "tokens_to_token.attention1.attn.qkv.weight" in state else None)
        if held is not None and held != self.cfg.tokens_type:
            names = "t2t_vit_7/10/12/14/19/24" if held == "performer" else "t2t_vit_t_14/19/24"
            raise CheckpointMismatchError(f"{source} holds a {held.capitalize()} T2T module, but "
                                          f"{getattr(self, 'variant_name', 'this model')} has a "
                                          f"{self.cfg.tokens_type.capitalize()} one: load it into {names} "
                                          f"(or pass tokens_type={held!r})")

    def _fit_pos_embed(self, state: dict[str, Tensor], report) -> dict[str, Tensor]:
        """Fit the checkpoint's position table to this grid as its source does (``report.resize``): the official
        transfer-learning loader interpolates the stored sinusoid bicubically (``utils.resize_pos_embed``), which
        gives a table that is no longer sinusoidal; ``pos_embed_resize="sinusoid"`` computes the formula for the new
        length instead. The table runs over the row-major token order, so its grid is the token grid."""
        from vitkit.weights.adapt import resample_pos_embed_state
        rule = report.resize or RESIZE["official"]
        pos = state.get("pos_embed")
        if rule.pos_embed == "sinusoid" and pos is not None and pos.shape != self.pos_embed.shape and \
                not torch.allclose(pos.float(), sinusoid_table(pos.shape[1], pos.shape[2]), atol=1e-3, rtol=0):
            report.notes.append("the checkpoint's position table is not the sinusoid (changed by other code); "
                                "replaced by the formula as pos_embed_resize='sinusoid' asks")
        size = report.source_config.get("img_size")  # a vitkit folder says its size: the grid may be non-square
        return resample_pos_embed_state(state, "pos_embed", self.pos_embed, 1, self.grid, report,
                                        t2t_grid(size) if size else None, scheme=rule.pos_embed, source=rule.source)
