"""Vision Transformer (Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021, arXiv 2010.11929).

    z0 = [x_class; x¹E; …; xᴺE] + E_pos                      (eq. 1)
    z'ℓ = MSA(LN(zℓ₋₁)) + zℓ₋₁,  zℓ = MLP(LN(z'ℓ)) + z'ℓ       (eq. 2, 3)
    y = LN(z⁰_L)                                              (eq. 4)

Module and parameter names follow timm's ``VisionTransformer`` so that timm and official DeiT state dicts load as
they are; the JAX and transformers layouts are converted in ``jax.py`` and ``formats.py``. The class token is prepended
before the position embedding is added (JAX, timm and DeiT all do so), and the position embedding covers the prefix
tokens.

The hybrid (paper §3.1, ``resnet``): the patches are taken from the feature map of a ResNet root and stages
(``vitkit.layers.resnet``) instead of the image, as google-research/vision_transformer ``vit_jax/models_vit.py``
builds R50+ViT-B/16 and the other released hybrids; timm's names for them (``vit_base_r50_s16_224`` / ``_384``).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import ClassVar, Literal, Sequence

import torch
from torch import Tensor, nn

from vitkit.config import ConfigError, check_ranges
from vitkit.families.contract import (FamilyModel, LinearHead, block_layer_id, block_outputs, select_indices,
                                      trunc_normal_linears_, zero_init_)
from vitkit.layers import (Attention, Block, HybridEmbed, PatchEmbed, ResNetBackbone, drop_path_rates,
                           resample_pos_embed, to_2tuple)

__all__ = ["ViTConfig", "VisionTransformer", "ResNetConfig", "HybridConfig", "HybridVisionTransformer"]


@dataclass
class ResNetConfig:
    """The hybrid's ResNet: vit_jax ``config.resnet`` (``models_vit.py``@c6de1e5) and the two numerical constants in
    which timm's port of it differs (timm 1.0.31 ``vision_transformer_hybrid.py``: GroupNormAct eps 1e-5,
    ``StdConv2dSame(eps=1e-8)``; a timm file brings those as hints)."""

    num_layers: tuple[int, ...] = (3, 4, 9)  # bottleneck units per stage (R50+ViT-B/16); () = the root block alone
    width_factor: float = 1.0  # root width int(64·w); stage i: bottleneck width 64·w·2^i, output 4× that
    gn_eps: float = 1e-6  # GroupNorm epsilon: flax's default (vit_jax); timm's port 1e-5
    ws_eps: float = 1e-5  # weight-standardisation epsilon: vit_jax (w − μ) / (σ + ε); timm's port 1e-8 …
    ws_eps_in_sqrt: bool = False  # … inside the root: (w − μ) / √(σ² + ε) (timm StdConv2dSame)

    def validate(self) -> None:
        width = int(64 * self.width_factor)
        if width <= 0 or width % 32:
            raise ConfigError(f"resnet.width_factor {self.width_factor}: the root width int(64·w) = {width} must be a "
                              f"positive multiple of 32 (GroupNorm's 32 groups; vit_jax cannot build it either)")
        if any(n < 1 for n in self.num_layers):
            raise ConfigError(f"resnet.num_layers {list(self.num_layers)}: every stage needs at least one unit")
        for name in ("gn_eps", "ws_eps"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"resnet.{name} must be positive, got {getattr(self, name)}")

    def backbone_stride(self) -> int:
        """Input pixels per feature-map cell: 4 for the root block, ×2 for every stage after the first."""
        return 2 ** (2 + max(len(self.num_layers) - 1, 0))

    def backbone(self, in_chans: int) -> ResNetBackbone:
        return ResNetBackbone(in_chans, self.num_layers, self.width_factor, gn_eps=self.gn_eps, ws_eps=self.ws_eps,
                              ws_eps_in_sqrt=self.ws_eps_in_sqrt)


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
    qk_scale: float | None = None  # the attention scale (timm 0.3.2 / DeiT / BEiT qk_scale); None: head_dim ** -0.5
    add_position_embedding: bool = True  # vit_jax transformer.add_position_embedding: False = no position embedding
    head_bias_init: float = 0.0  # vit_jax head_bias_init: the classifier's initial bias (initialisation only)

    refused_options: ClassVar[dict[str, str]] = {
        "classifier": "vit_jax's head choice is global_pool here ('token' = 'token', 'avg' = 'gap'); 'unpooled' / "
                      "'token_unpooled' return the encoded tokens without pooling: build class_token=False / True and "
                      "call forward_features(x) (per-token logits: head(pre_logits(forward_features(x))))",
        "resnet": "the ResNet hybrids are variants of their own, which take resnet={'num_layers': ..., 'width_factor': "
                  "...}: vit_base_r50_s16_224 / _384 (R50+ViT-B/16)",
        "encoder": "a flax module class (vit_jax's Encoder, the one every config uses), not data: vitkit's encoder is "
                   "eq. 2-3's blocks",
        "model_name": "a label the vit_jax configs carry, which builds nothing: create_model's name names the model"}

    def validate(self) -> None:
        check_ranges(self, rates=("pos_drop_rate", "proj_drop_rate", "attn_drop_rate", "drop_path_rate", "drop_rate"),
                     positive=("patch_size", "embed_dim", "depth", "num_heads", "in_chans"),
                     non_negative=("num_classes",))
        if self.embed_dim % self.num_heads:
            raise ConfigError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.global_pool == "token" and not self.class_token:
            raise ConfigError("global_pool='token' needs class_token=True")
        if self.qk_scale is not None and self.qk_scale <= 0:
            raise ConfigError(f"qk_scale must be positive (None: head_dim ** -0.5), got {self.qk_scale}")
        self._check_grid()

    def _check_grid(self) -> None:
        """The image is a whole number of patches."""
        for s in to_2tuple(self.img_size):
            if s <= 0 or s % self.patch_size:
                raise ConfigError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")


@dataclass
class HybridConfig(ViTConfig):
    """ViT's fields and the ResNet whose feature map the patches are taken from (``patch_size`` counts its cells)."""

    patch_size: int = 1
    resnet: ResNetConfig = field(default_factory=ResNetConfig)  # vit_jax resnet: the root block and stages

    def _check_grid(self) -> None:
        """The ResNet's feature map ("SAME" padding: every stride-2 layer rounds up) is a whole number of patches."""
        stride = self.resnet.backbone_stride()
        for s in to_2tuple(self.img_size):
            side = -(-s // stride)
            if s <= 0 or side % self.patch_size:
                raise ConfigError(f"img_size {self.img_size} gives the ResNet a feature map of side {side}, not a "
                                  f"multiple of patch_size {self.patch_size}")


class VisionTransformer(LinearHead, FamilyModel):
    config_cls = ViTConfig
    intermediates = "tokens"
    num_dist_tokens = 0  # DeiT's distillation token (vitkit.families.deit)
    input_weights = ("patch_embed.proj.weight",)

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.embed_dim
        self.num_classes = cfg.num_classes
        self.num_features = cfg.representation_size or D
        self.num_prefix_tokens = int(cfg.class_token) + self.num_dist_tokens
        self.patch_embed = self.make_patch_embed()
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
        """Whether the model adds an absolute position embedding (vit_jax ``transformer.add_position_embedding``; BEiT's
        fine-tuned models do not)."""
        return self.cfg.add_position_embedding

    def make_patch_embed(self) -> nn.Module:
        """eq. 1's linear patch embedding."""
        cfg = self.cfg
        return PatchEmbed(cfg.img_size, cfg.patch_size, cfg.in_chans, cfg.embed_dim,
                          strict_img_size=not cfg.dynamic_img_size)

    def make_block(self, i: int, drop_path: float) -> nn.Module:
        """Block ``i`` of the encoder (eq. 2-3); a family with another attention overrides this."""
        cfg = self.cfg
        attn = Attention(cfg.embed_dim, cfg.num_heads, cfg.qkv_bias, cfg.attn_drop_rate, cfg.proj_drop_rate,
                         scale=cfg.qk_scale)
        return Block(cfg.embed_dim, mlp_ratio=cfg.mlp_ratio, proj_drop=cfg.proj_drop_rate, drop_path=drop_path,
                     init_values=cfg.init_values, act_layer=cfg.act_layer, norm_eps=cfg.norm_eps, attn=attn)

    def init_weights(self) -> None:
        """Truncated-normal(0.02) dense layers and position embedding, zero class token and zero head kernel with the
        bias at ``head_bias_init`` (the JAX code's initialisers for the tokens and the head; timm's for the rest). A
        hybrid's ResNet keeps its own initialisation (``ResNetBackbone.init_weights``)."""
        if self.pos_embed is not None:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_linears_(self)
        self._init_classifiers()

    def _init_classifiers(self) -> None:
        """vit_jax ``models_vit.py``: the head's kernel zeros, its bias ``head_bias_init`` (0: the paper's zero head,
        App. B.1.1)."""
        zero_init_(*self.classifiers())
        with torch.no_grad():
            for head in self.classifiers():
                head.bias.fill_(self.cfg.head_bias_init)

    def reset_classifier(self, num_classes: int) -> None:
        super().reset_classifier(num_classes)
        self._init_classifiers()

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token", "dist_token"} & {n for n, _ in self.named_parameters()}

    def named_blocks(self) -> list[tuple[str, nn.Module]]:
        return [(f"blocks.{i}", blk) for i, blk in enumerate(self.blocks)]

    @property
    def accepts_any_size(self) -> bool:
        """``dynamic_img_size``: any multiple of the patch size, the position embedding resampled at forward time."""
        return self.cfg.dynamic_img_size

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
        grid = self.patch_embed.output_grid(*x.shape[-2:])
        return self._pos_embed(self.patch_embed(x), grid)  # (B, N, D) patches → (B, prefix + N, D)

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

    def patch_embedding_filters(self) -> Tensor | None:
        return self.patch_embed.proj.weight  # (D, C, P, P)

    def position_embedding_grid(self) -> tuple[Tensor, tuple[int, int]] | None:
        if self.pos_embed is None:
            return None
        return self.pos_embed[0, self.num_prefix_tokens:], self.patch_embed.grid_size  # (h·w, D)

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

        Each is (B, prefix + N, D), or with ``reshape=True`` the patch tokens as a (B, D, h, w) map (h = H/P, or the
        hybrid's grid); ``norm`` applies the final LayerNorm to each.
        """
        self.patch_embed.check_input(x)
        h, w = self.patch_embed.output_grid(*x.shape[-2:])
        outs = block_outputs(self.blocks, self.embed(x), select_indices(indices, len(self.blocks)), *self.block_args())
        outs = [self.norm(y) for y in outs] if norm else outs
        if reshape:  # (B, D, h, w)
            outs = [y[:, self.num_prefix_tokens:].transpose(1, 2).reshape(x.shape[0], -1, h, w) for y in outs]
        return outs

    # ------------------------------------------------------------------------------------------ weight loading
    def source_grid(self, report) -> tuple[int, int] | None:
        """The patch grid a checkpoint was built for, when it says so (a vitkit folder's img_size: it may be
        non-square); None otherwise, and for another patch size."""
        source_size = report.source_config.get("img_size")
        if not source_size or report.source_config.get("patch_size", self.cfg.patch_size) != self.cfg.patch_size:
            return None
        return self.patch_embed.output_grid(*to_2tuple(source_size))

    def load_pretrained_state(self, state: dict[str, Tensor], report) -> dict[str, Tensor]:
        """Adapt a vitkit-layout state dict to this model: resample the position embedding to this grid (the scheme
        of the checkpoint's source, ``report.resize``), drop a representation layer the model does not have (and
        re-initialise the head it fed), and zero-initialise heads whose class count differs (bias
        ``head_bias_init``)."""
        from vitkit.weights.adapt import adapt_head, drop_keys, reinit_head, resample_pos_embed_state
        fresh = len(report.reinitialized)
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
        return self._fresh_head_bias(state, report, report.reinitialized[fresh:])

    def _fresh_head_bias(self, state: dict[str, Tensor], report, replaced: list[str]) -> dict[str, Tensor]:
        """A head replaced for a new task starts from the model's initialiser, as vit_jax ``checkpoint.py``
        ``load_pretrained`` takes it from ``init_params``: zero kernel, bias ``head_bias_init``."""
        if not self.cfg.head_bias_init:
            return state
        out = dict(state)
        for name in ("head", "head_dist"):
            if any(line.startswith(f"{name}:") for line in replaced):
                out[f"{name}.bias"] = torch.full_like(out[f"{name}.bias"], self.cfg.head_bias_init)
                report.notes.append(f"{name}.bias set to head_bias_init={self.cfg.head_bias_init}")
        return out


class HybridVisionTransformer(VisionTransformer):
    """The hybrid (paper §3.1): eq. 1's patches are 1×1 (or P×P) cells of a ResNet's feature map, the rest is ViT."""

    config_cls = HybridConfig
    input_weights = ("patch_embed.backbone.stem.conv.weight",)
    convolutional = True  # the ResNet backbone (ViT paper §3.1, "Hybrid Architecture")
    fixed_input_channels = ("the ResNet standardises its kernels (vit_jax models_resnet.py StdConv), which removes "
                            "their scale: no kernel fitted to other input channels answers as the RGB one does")

    def make_patch_embed(self) -> nn.Module:
        cfg = self.cfg
        return HybridEmbed(cfg.resnet.backbone(cfg.in_chans), cfg.img_size, cfg.patch_size, cfg.in_chans,
                           cfg.embed_dim, strict_img_size=not cfg.dynamic_img_size)

    def patch_embedding_filters(self) -> None:
        """None: the patches are feature-map cells, not image pixels (no Figure 7 filters)."""
        return None
