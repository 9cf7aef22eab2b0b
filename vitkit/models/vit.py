"""Vision Transformer (Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021, arXiv 2010.11929).

    z0 = [x_class; x¹E; …; xᴺE] + E_pos                      (eq. 1)
    z'ℓ = MSA(LN(zℓ₋₁)) + zℓ₋₁,  zℓ = MLP(LN(z'ℓ)) + z'ℓ       (eq. 2, 3)
    y = LN(z⁰_L)                                              (eq. 4)

Module and parameter names follow timm's ``VisionTransformer`` so that timm and official DeiT state dicts load as
they are; the JAX and transformers layouts are converted in ``vitkit.weights``. The class token is prepended before the
position embedding is added (JAX, timm and DeiT all do so), and the position embedding covers the prefix tokens.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal, Sequence

import torch
from torch import Tensor, nn

from vitkit.config import ConfigError, check_ranges
from vitkit.layers import Block, PatchEmbed, drop_path_rates, resample_pos_embed, to_2tuple
from vitkit.models.base import (FamilyModel, LinearHead, block_layer_id, block_outputs, select_indices,
                                tokens_to_map, trunc_normal_linears_, zero_init_)
from vitkit.models.vit_formats import RESIZE_CHOICES, VIT_FORMATS, VIT_RESIZE, WEIGHTS
from vitkit.registry import register_family
from vitkit.specs import INCEPTION_MEAN, INCEPTION_STD, PreprocessConfig, Reference

__all__ = ["ViTConfig", "VisionTransformer"]


@dataclass
class ViTConfig:
    img_size: int | tuple[int, int] = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000  # 0 = no head (forward returns pooled features)
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    class_token: bool = True
    global_pool: Literal["token", "avg"] = "token"  # paper App. D.3: class token or global average pooling
    fc_norm: bool | None = None  # LayerNorm after pooling instead of before (None: only with global_pool='avg')
    representation_size: int | None = None  # the paper's pre-training "pre-logits" layer (dense + tanh)
    init_values: float | None = None  # LayerScale (CaiT / DeiT-III); None = off as in the paper
    act_layer: Literal["gelu", "gelu_tanh"] = "gelu"  # JAX checkpoints were trained with tanh-approximate GELU
    norm_eps: float = 1e-6  # flax/timm default; transformers' ViTConfig uses 1e-12
    pos_drop_rate: float = 0.0  # dropout right after adding the position embedding (paper App. B.1)
    proj_drop_rate: float = 0.0  # dropout after every dense layer except qkv (paper App. B.1)
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0  # stochastic depth, linearly increasing over blocks
    drop_rate: float = 0.0  # dropout before the classifier
    dynamic_img_size: bool = False  # accept any multiple of the patch size; position embeddings resampled on the fly

    def validate(self) -> None:
        check_ranges(self, rates=("pos_drop_rate", "proj_drop_rate", "attn_drop_rate", "drop_path_rate", "drop_rate"),
                     positive=("patch_size", "embed_dim", "depth", "num_heads", "in_chans"),
                     non_negative=("num_classes",))
        if self.embed_dim % self.num_heads:
            raise ConfigError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.global_pool == "token" and not self.class_token:
            raise ConfigError("global_pool='token' needs class_token=True")
        for s in to_2tuple(self.img_size):
            if s % self.patch_size:
                raise ConfigError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")


class VisionTransformer(LinearHead, FamilyModel):
    config_cls = ViTConfig
    intermediates = "tokens"
    num_dist_tokens = 0  # DeiT's distillation token (vitkit.models.deit)

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.embed_dim
        self.num_classes = cfg.num_classes
        self.num_features = cfg.representation_size or D
        self.num_prefix_tokens = int(cfg.class_token) + self.num_dist_tokens
        self.patch_embed = PatchEmbed(cfg.img_size, cfg.patch_size, cfg.in_chans, D,
                                      strict_img_size=not cfg.dynamic_img_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D)) if cfg.class_token else None
        self.pos_embed = (nn.Parameter(torch.zeros(1, self.num_prefix_tokens + self.patch_embed.num_patches, D))
                          if self.has_pos_embed else None)
        self.pos_drop = nn.Dropout(cfg.pos_drop_rate)
        rates = drop_path_rates(cfg.drop_path_rate, cfg.depth)
        self.blocks = nn.Sequential(*[self.make_block(i, rates[i]) for i in range(cfg.depth)])
        use_fc_norm = cfg.global_pool == "avg" if cfg.fc_norm is None else cfg.fc_norm
        self.norm = nn.Identity() if use_fc_norm else nn.LayerNorm(D, eps=cfg.norm_eps)
        self.fc_norm = nn.LayerNorm(D, eps=cfg.norm_eps) if use_fc_norm else nn.Identity()
        self.pre_logits = (nn.Sequential() if not cfg.representation_size else
                           nn.Sequential(OrderedDict(fc=nn.Linear(D, cfg.representation_size), act=nn.Tanh())))
        self.head_drop = nn.Dropout(cfg.drop_rate)
        self.head = self._make_head(cfg.num_classes)
        self.init_weights()

    # ----------------------------------------------------------------------------------------------- construction
    @property
    def has_pos_embed(self) -> bool:
        """Whether the model adds an absolute position embedding (BEiT's fine-tuned models do not)."""
        return True

    def make_block(self, i: int, drop_path: float) -> nn.Module:
        """Block ``i`` of the encoder (eq. 2-3); a family with another attention overrides this."""
        cfg = self.cfg
        return Block(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio, cfg.qkv_bias, cfg.proj_drop_rate, cfg.attn_drop_rate,
                     drop_path, cfg.init_values, cfg.act_layer, cfg.norm_eps)

    def init_weights(self) -> None:
        """Truncated-normal(0.02) dense layers and position embedding, zero class token and zero head kernel (the
        JAX code's initialisers for the tokens and the head; timm's for the rest)."""
        if self.pos_embed is not None:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_linears_(self)
        zero_init_(*self.classifiers())

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token", "dist_token"} & {n for n, _ in self.named_parameters()}

    def layer_id(self, param_name: str) -> int:
        """0 for the embeddings, i + 1 for block i, depth + 1 for the final norm and head (BEiT's layer decay)."""
        return block_layer_id(param_name, self.cfg.depth, ("cls_token", "dist_token", "pos_embed", "patch_embed"))

    @property
    def num_layer_ids(self) -> int:
        return self.cfg.depth + 2

    # --------------------------------------------------------------------------------------------------- forward
    def prefix_tokens(self, B: int) -> list[Tensor]:
        return [self.cls_token.expand(B, -1, -1)] if self.cls_token is not None else []

    def _pos_embed(self, x: Tensor, grid: tuple[int, int]) -> Tensor:
        """eq. 1: prepend the prefix tokens, then add the position embedding (resampled if the grid changed)."""
        x = torch.cat(self.prefix_tokens(x.shape[0]) + [x], dim=1)  # (B, prefix + N, D)
        pos = self.pos_embed
        if pos is None:
            return self.pos_drop(x)
        if grid != self.patch_embed.grid_size:
            pos = resample_pos_embed(pos, grid, self.patch_embed.grid_size, self.num_prefix_tokens)
        return self.pos_drop(x + pos)

    def embed(self, x: Tensor) -> Tensor:
        self.patch_embed.check_input(x)  # (B, 3, H, W), or a ValueError that says so
        B, C, H, W = x.shape
        P = self.patch_embed.patch_size
        x = self.patch_embed(x)  # (B, N, D)
        return self._pos_embed(x, (H // P[0], W // P[1]))

    def block_args(self) -> tuple:
        """Extra arguments every block's forward receives (none for ViT; BEiT's shared relative-position bias)."""
        return ()

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, C, H, W) images → (B, prefix + N, D) normalised tokens (eq. 1-4 before pooling)."""
        x = self.embed(x)
        args = self.block_args()
        for blk in self.blocks:
            x = blk(x, *args)
        return self.norm(x)

    def pool(self, x: Tensor) -> Tensor:
        if self.cfg.global_pool == "avg":
            return x[:, self.num_prefix_tokens:].mean(dim=1)  # (B, D)
        return x[:, 0]  # (B, D) class token, eq. 4

    def patch_embedding_filters(self) -> Tensor:
        return self.patch_embed.proj.weight  # (D, C, P, P)

    def position_embedding_grid(self) -> tuple[Tensor, tuple[int, int]]:
        return self.pos_embed[0, self.num_prefix_tokens:], self.patch_embed.grid_size  # (h·w, D)

    def feature_map(self, features: Tensor, image_hw: tuple[int, int]) -> Tensor:
        return tokens_to_map(features, self.num_prefix_tokens, image_hw)  # (B, D, h, w)

    def readout_weights(self, features: Tensor) -> Tensor:
        """The class token, or every patch token equally for global average pooling (App. D.3)."""
        weights = features.new_zeros(features.shape[:2])  # (B, N)
        if self.cfg.global_pool == "avg":
            weights[:, self.num_prefix_tokens:] = 1.0 / (features.shape[1] - self.num_prefix_tokens)
        else:
            weights[:, 0] = 1.0
        return weights

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.pre_logits(self.fc_norm(self.pool(x)))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward_intermediates(self, x: Tensor, indices: int | Sequence[int] | None = None, norm: bool = False,
                              reshape: bool = False) -> list[Tensor]:
        """Outputs of chosen blocks: an int n = the last n blocks, a list of block indices (negative allowed), None =
        every block.

        Each is (B, prefix + N, D), or with ``reshape=True`` the patch tokens as a (B, D, H/P, W/P) map; ``norm``
        applies the final LayerNorm to each.
        """
        self.patch_embed.check_input(x)
        B, _, H, W = x.shape
        P = self.patch_embed.patch_size
        outs = block_outputs(self.blocks, self.embed(x), select_indices(indices, len(self.blocks)), *self.block_args())
        outs = [self.norm(y) for y in outs] if norm else outs
        if reshape:  # (B, D, h, w)
            outs = [y[:, self.num_prefix_tokens:].transpose(1, 2).reshape(B, -1, H // P[0], W // P[1]) for y in outs]
        return outs

    # ------------------------------------------------------------------------------------------ weight loading
    def source_grid(self, report) -> tuple[int, int] | None:
        """The patch grid a checkpoint was built for, when it says so (a vitkit folder's img_size: it may be
        non-square); None otherwise, and for another patch size."""
        source_size = report.source_config.get("img_size")
        if not source_size or report.source_config.get("patch_size", self.cfg.patch_size) != self.cfg.patch_size:
            return None
        return tuple(s // p for s, p in zip(to_2tuple(source_size), self.patch_embed.patch_size))

    def load_pretrained_state(self, state: dict[str, Tensor], report) -> dict[str, Tensor]:
        """Adapt a vitkit-layout state dict to this model: resample the position embedding to this grid (the scheme
        of the checkpoint's source, ``report.resize``), drop a representation layer the model does not have (and
        re-initialise the head it fed), and zero-initialise heads whose class count differs."""
        from vitkit.weights.adapt import adapt_head, drop_keys, reinit_head, resample_pos_embed_state
        if self.pos_embed is not None:
            rule = report.resize
            state = resample_pos_embed_state(state, "pos_embed", self.pos_embed, self.num_prefix_tokens,
                                             self.patch_embed.grid_size, report, self.source_grid(report),
                                             scheme=rule.pos_embed if rule else None,
                                             source=rule.source if rule else "")
        if not self.cfg.representation_size and any(k.startswith("pre_logits.") for k in state):
            state = drop_keys(state, "pre_logits.", report,
                              "representation layer removed: transfer replaces the whole pre-training head "
                              "(paper App. B.1.1)")
            state = reinit_head(state, "head", self.head, report, "its input, the representation layer, was removed")
        for name in ("head", "head_dist"):
            if hasattr(self, name):  # a plain ViT keeps a checkpoint's head_dist for the mismatch error
                state = adapt_head(state, name, getattr(self, name), report)
        return state


# -------------------------------------------------------------------------------------------------- variants
# Widths, depths, heads and MLP sizes: ViT paper Table 1 (B, L, H) and DeiT Table 1 / AugReg (Ti, S).
SIZES = {
    "tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
    "large": dict(embed_dim=1024, depth=24, num_heads=16),
    "huge": dict(embed_dim=1280, depth=32, num_heads=16),
}
PATCHES = (8, 14, 16, 32)
RESOLUTIONS = (224, 384)

VARIANTS = {
    f"vit_{size}_patch{p}_{res}": dict(**dims, patch_size=p, img_size=res)
    for size, dims in SIZES.items() for p in PATCHES for res in RESOLUTIONS if res % p == 0
}
# Google's checkpoints expect pixels in [-1, 1]; timm evaluates at crop 0.9 (224) and 1.0 (384).
DATA_CFGS = {
    name: PreprocessConfig(mean=INCEPTION_MEAN, std=INCEPTION_STD, crop_pct=0.9 if cfg["img_size"] == 224 else 1.0)
    for name, cfg in VARIANTS.items()
}



def closed_form_size(cfg: dict, prefix_tokens: int = 1, heads: int = 1, num_classes: int = 1000) -> Reference:
    """Parameters and forward MACs of a ViT written out by hand from the paper's layer sizes (eq. 1-4), independent of
    the model code: a block has 12·D² + 13·D parameters and, over T tokens, 12·T·D² + 2·T²·D MACs (q/k/v, output
    projection, the 4·D MLP, and the two attention products). Agrees with the published counts, e.g. ViT-B/16
    86.57 M / 17.56 G, ViT-L/16 304.33 M / 61.55 G, DeiT-Ti 5.72 M / 1.25 G (architectures.md §1.1-1.2)."""
    D, depth, P, S = cfg["embed_dim"], cfg["depth"], cfg["patch_size"], cfg["img_size"]
    N = (S // P) ** 2
    T = N + prefix_tokens
    params = (3 * P * P * D + D) + prefix_tokens * D + T * D + depth * (12 * D * D + 13 * D) + 2 * D \
        + heads * (D * num_classes + num_classes)
    macs = N * 3 * P * P * D + depth * (12 * T * D * D + 2 * T * T * D) + heads * D * num_classes
    return Reference(params / 1e6, macs / 1e9, "closed form of the ViT paper's layer sizes (eq. 1-4)",
                     params_tol=1e-6, macs_rtol=1e-6)


def tiny(name: str, cfg: dict) -> dict:
    """2 blocks of width 48 on a 2x2 patch grid: forward and backward in milliseconds."""
    return dict(depth=2, embed_dim=48, num_heads=3, img_size=2 * cfg["patch_size"])


register_family("vit", VisionTransformer, VARIANTS, DATA_CFGS, formats=VIT_FORMATS, weights=WEIGHTS,
                references={n: closed_form_size(c) for n, c in VARIANTS.items()}, tiny=tiny,
                paper="Dosovitskiy et al. 2020, arXiv 2010.11929", resize=VIT_RESIZE, resize_choices=RESIZE_CHOICES)
