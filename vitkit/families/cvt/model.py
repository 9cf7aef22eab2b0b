"""CvT (Wu et al., "CvT: Introducing Convolutions to Vision Transformers", ICCV 2021, arXiv 2103.15808).

Three stages, each a convolutional token embedding followed by convolutional Transformer blocks (paper Fig. 2):

    x_i = LN(Conv2d_i(x_{i-1}))                              (§3.1, overlapping conv, stride 4 then 2 and 2)
    q/k/v = Linear(BN(DWConv_s(reshape2D(x))))                (§3.2, eq. 2: stride 1 for q, 2 for k and v)
    z' = z + MHSA(q, k, v), z = z' + MLP(LN(z'))              (pre-norm blocks)

No position embedding anywhere (paper §4.4): the weights fit any input size. The class token exists in the last stage
of every released model; it is split off before the convolutional projection and concatenated back to q, k and v (it
is never convolved), and its final LayerNorm is the classification feature.

Every SPEC setting of the official constructor (microsoft/CvT@f851e68 ``lib/models/cls_cvt.py``) is a config field:
one value for all stages, as every released config has it, or one per stage (``CvTConfig.per_stage``), including a
class token in an earlier stage (used by that stage's blocks, then dropped) and the 'avg' projection (q unprojected,
k and v average-pooled with ``ceil_mode``); the 'linear' projection, which the official forward cannot run, is refused.

The definition is the official code (microsoft/CvT ``lib/models/cls_cvt.py``); its numerics are the config's defaults:
QuickGELU ``x·σ(1.702x)``, LayerNorm eps 1e-5, and the attention scale ``dim_out ** -0.5`` (the full stage width, not
the head width). transformers' ``CvtForImageClassification`` runs exact GELU with the same eps and scale; its files
load with ``act_layer='gelu'`` (``formats``). Module names follow the official ones (``stage{i}.`` → ``stages.{i}.``),
so official files need only that rename.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar, Literal, Sequence

import torch
from torch import Tensor, nn

from vitkit.config import ConfigError, check_ranges
from vitkit.families.contract import (FamilyModel, LinearHead, StagedBlocks, select_indices, staged_layer_id,
                                      tokens_to_map, trunc_normal_linears_)
from vitkit.layers import Block, ConvNormAct, Mlp, PatchEmbed, RecordsAttention, attend, drop_path_rates, to_2tuple

__all__ = ["CvTConfig", "ConvolutionalVisionTransformer", "ConvProjection", "ConvAttention"]


Method = Literal["dw_bn", "avg", "linear"]


@dataclass
class CvTConfig:
    """Per-stage lists are the official ``MODEL.SPEC`` entries (transformers' ``CvtConfig`` uses the same names)."""

    img_size: int | tuple[int, int] = 224  # only the preprocessing: without position embeddings any size runs
    in_chans: int = 3
    num_classes: int = 1000  # 0 = no head (forward returns the pooled feature)
    embed_dim: tuple[int, ...] = (64, 192, 384)  # DIM_EMBED
    depth: tuple[int, ...] = (1, 2, 10)  # DEPTH
    num_heads: tuple[int, ...] = (1, 3, 6)  # NUM_HEADS
    patch_size: tuple[int, ...] = (7, 3, 3)  # PATCH_SIZE: the token-embedding conv kernels
    patch_stride: tuple[int, ...] = (4, 2, 2)  # PATCH_STRIDE
    patch_padding: tuple[int, ...] = (2, 1, 1)  # PATCH_PADDING
    # one value for every stage (all released configs), or one per stage as the official SPEC lists
    mlp_ratio: float | tuple[float, ...] = 4.0  # MLP_RATIO
    qkv_bias: bool | tuple[bool, ...] = True  # QKV_BIAS
    kernel_qkv: int | tuple[int, ...] = 3  # depth-wise projection kernel (KERNEL_QKV)
    stride_q: int | tuple[int, ...] = 1  # STRIDE_Q
    stride_kv: int | tuple[int, ...] = 2  # key/value grids are 4x smaller (§3.2 "squeezed convolutional projection")
    padding_q: int | tuple[int, ...] = 1  # PADDING_Q
    padding_kv: int | tuple[int, ...] = 1  # PADDING_KV
    qkv_proj_method: Method | tuple[Method, ...] = "dw_bn"  # QKV_PROJ_METHOD
    # CLS_TOKEN: True = the last stage's only ([False, False, True]; False = mean of the normalised last-stage
    # tokens), or one flag per stage (an earlier stage's token is used by its blocks, then dropped, as officially)
    class_token: bool | tuple[bool, ...] = True
    act_layer: Literal["quick_gelu", "gelu"] = "quick_gelu"  # official QuickGELU; transformers' CvT: exact GELU
    norm_eps: float = 1e-5  # every LayerNorm (official partial(LayerNorm, eps=1e-5); transformers' too)
    attn_scale: Literal["dim", "head_dim"] = "dim"  # official and transformers: dim_out ** -0.5 (full stage width)
    drop_rate: float | tuple[float, ...] = 0.0  # dropout after the token embedding and dense layers (DROP_RATE)
    attn_drop_rate: float | tuple[float, ...] = 0.0  # ATTN_DROP_RATE
    drop_path_rate: tuple[float, ...] = (0.0, 0.0, 0.0)  # per stage, linear over its blocks (DROP_PATH_RATE)
    init: Literal["trunc_norm", "xavier"] = "trunc_norm"  # the official INIT of the stages' dense layers

    _PER_STAGE: ClassVar[tuple[str, ...]] = ("mlp_ratio", "qkv_bias", "kernel_qkv", "stride_q", "stride_kv",
                                             "padding_q", "padding_kv", "qkv_proj_method", "class_token",
                                             "drop_rate", "attn_drop_rate")

    def per_stage(self, name: str, i: int) -> Any:
        """Stage ``i``'s value of a setting given once for all stages or as the official per-stage list."""
        value = getattr(self, name)
        return value[i] if isinstance(value, tuple) else value

    def stage_class_token(self, i: int) -> bool:
        """Whether stage ``i`` has a class token (a single flag is the last stage's)."""
        if isinstance(self.class_token, tuple):
            return self.class_token[i]
        return self.class_token and i == len(self.depth) - 1

    def validate(self) -> None:
        stages = len(self.depth)
        for name in ("embed_dim", "num_heads", "patch_size", "patch_stride", "patch_padding", "drop_path_rate"):
            if len(getattr(self, name)) != stages:
                raise ConfigError(f"{name} has {len(getattr(self, name))} entries but depth has {stages} stages")
        for name in self._PER_STAGE:
            value = getattr(self, name)
            if isinstance(value, tuple) and len(value) != stages:
                raise ConfigError(f"{name} has {len(value)} entries but depth has {stages} stages (give one value "
                                  f"for all stages or one per stage)")
        for name in ("embed_dim", "depth", "num_heads", "patch_size", "patch_stride"):
            if stages == 0 or min(getattr(self, name)) <= 0:
                raise ConfigError(f"{name} must be a non-empty list of positive integers, got {getattr(self, name)}")
        check_ranges(self, positive=("in_chans", "kernel_qkv", "stride_q", "stride_kv", "mlp_ratio"),
                     non_negative=("padding_q", "padding_kv", "num_classes"))
        if min(self.patch_padding) < 0:
            raise ConfigError(f"patch_padding must be >= 0, got {self.patch_padding}")
        bad = [f"{d}/{h}" for d, h in zip(self.embed_dim, self.num_heads) if d % h]
        if bad:
            raise ConfigError(f"embed_dim is not divisible by num_heads in stage(s) {', '.join(bad)}")
        if "linear" in [self.per_stage("qkv_proj_method", i) for i in range(stages)]:
            raise ConfigError("qkv_proj_method 'linear': the official code cannot run it: Attention.forward assigns "
                              "q, k, v only in forward_conv, which it skips when no projection is built "
                              "(UnboundLocalError, f851e68 cls_cvt.py)")
        rates = {f"{name}[{i}]": self.per_stage(name, i) for name in ("drop_rate", "attn_drop_rate")
                 for i in range(stages)}
        rates.update({f"drop_path_rate[{i}]": r for i, r in enumerate(self.drop_path_rate)})
        for name, rate in rates.items():
            if not 0.0 <= rate < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {rate}")
        if self.norm_eps <= 0:
            raise ConfigError(f"norm_eps must be positive, got {self.norm_eps}")


def split_map(x: Tensor, grid: tuple[int, int], class_token: bool) -> tuple[Tensor | None, Tensor]:
    """(B, [1 +] H·W, C) tokens → (the class token (B, 1, C) or None, the patch tokens as a (B, C, H, W) map): a view,
    channels last in memory (the official ``rearrange(x, 'b (h w) c -> b c h w')``)."""
    cls, x = (x[:, :1], x[:, 1:]) if class_token else (None, x)
    B, _, C = x.shape
    return cls, x.reshape(B, grid[0], grid[1], C).permute(0, 3, 1, 2)  # (B, C, H, W)


class ConvProjection(ConvNormAct):
    """The official ``dw_bn`` projection: depth-wise conv (no bias) → BatchNorm → tokens (paper eq. 2, Conv2d + BN);
    a ``ConvNormAct`` without activation, so in eval mode the BatchNorm is folded into the conv (one pass over the
    feature map instead of two, the same function up to float rounding)."""

    def __init__(self, dim: int, kernel_size: int, stride: int, padding: int):
        super().__init__(dim, dim, kernel_size, stride, groups=dim, act=None, padding=padding)

    def output_grid(self, H: int, W: int) -> tuple[int, int]:
        k, s, p = self.conv.kernel_size[0], self.conv.stride[0], self.conv.padding[0]
        return (H + 2 * p - k) // s + 1, (W + 2 * p - k) // s + 1

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) → (B, h·w, C)."""
        return super().forward(x).flatten(2).transpose(1, 2)  # (B, h·w, C)


class AvgProjection(nn.AvgPool2d):
    """The official ``avg`` projection of keys and values: k×k average pooling, ``ceil_mode=True``, padding counted."""

    def __init__(self, kernel_size: int, stride: int, padding: int):
        super().__init__(kernel_size, stride, padding, ceil_mode=True)

    def output_grid(self, H: int, W: int) -> tuple[int, int]:
        k, s, p = self.kernel_size, self.stride, self.padding
        sides = [-(-(n + 2 * p - k) // s) + 1 for n in (H, W)]
        return tuple(n - 1 if (n - 1) * s >= size + p else n for n, size in zip(sides, (H, W)))  # PyTorch's rule

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) → (B, h·w, C)."""
        return super().forward(x).flatten(2).transpose(1, 2)  # (B, h·w, C)


class ConvAttention(RecordsAttention):
    """Convolutional-projection multi-head attention (paper §3.2; official ``Attention``).

    ``method='dw_bn'``: q, k and v are separate depth-wise conv + BN projections of the token map (k and v with stride
    2); ``'avg'``: q the tokens themselves, k and v average-pooled (the official ``avg``). Each is followed by its own
    Linear; the class token (if any) skips the projection and is prepended to all three."""

    attn_layout = ("(B, heads, [1 +] H·W, [1 +] h·w): every query token of the stage's H×W grid over the keys of the "
                   "stride-2 h×w key grid; with a class token it comes first in both")

    def __init__(self, dim: int, num_heads: int, *, qkv_bias: bool = True, kernel_size: int = 3, stride_q: int = 1,
                 stride_kv: int = 2, padding_q: int = 1, padding_kv: int = 1, class_token: bool = False,
                 scale: Literal["dim", "head_dim"] = "dim", method: Literal["dw_bn", "avg"] = "dw_bn",
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = (dim if scale == "dim" else self.head_dim) ** -0.5  # official: dim_out ** -0.5
        self.class_token = class_token
        if method == "avg":  # official: q 'linear' (no projection), k and v average-pooled
            self.conv_proj_q = None
            self.conv_proj_k, self.conv_proj_v = (AvgProjection(kernel_size, stride_kv, padding_kv) for _ in range(2))
        else:
            self.conv_proj_q = ConvProjection(dim, kernel_size, stride_q, padding_q)
            self.conv_proj_k = ConvProjection(dim, kernel_size, stride_kv, padding_kv)
            self.conv_proj_v = ConvProjection(dim, kernel_size, stride_kv, padding_kv)
        self.proj_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj_k = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj_v = nn.Linear(dim, dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _heads(self, x: Tensor) -> Tensor:
        B, N, _ = x.shape
        return x.reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # (B, heads, N, d)

    def forward(self, x: Tensor, grid: tuple[int, int]) -> Tensor:
        B, N, C = x.shape
        H, W = grid
        cls, fmap = split_map(x, grid, self.class_token)
        fmap = fmap.contiguous(memory_format=torch.channels_last)  # a no-op, except after the class token is split off
        q = self.conv_proj_q(fmap) if self.conv_proj_q is not None else fmap.flatten(2).transpose(1, 2)  # (B, n, C)
        k, v = self.conv_proj_k(fmap), self.conv_proj_v(fmap)  # (B, n', C) each
        if cls is not None:
            q, k, v = (torch.cat([cls, t], dim=1) for t in (q, k, v))  # (B, 1 + n, C)
        q, k, v = self._heads(self.proj_q(q)), self._heads(self.proj_k(k)), self._heads(self.proj_v(v))
        x = attend(q, k, v, scale=self.scale, dropout_p=self.attn_drop if self.training else 0.0,
                   record=self.attn_recorder, grid=(H, W), kv_grid=self.conv_proj_k.output_grid(H, W),
                   class_token=self.class_token)  # (B, heads, N, d)
        x = x.transpose(1, 2).reshape(B, N, C)  # (B, N, C)
        return self.proj_drop(self.proj(x))


class CvTStage(nn.Module):
    """One stage: convolutional token embedding (conv + LayerNorm, paper §3.1), optional class token, blocks."""

    def __init__(self, cfg: CvTConfig, i: int, in_chans: int, img_size: tuple[int, int]):
        super().__init__()
        dim, at = cfg.embed_dim[i], partial(cfg.per_stage, i=i)
        norm = partial(nn.LayerNorm, eps=cfg.norm_eps)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if cfg.stage_class_token(i) else None
        self.patch_embed = PatchEmbed(img_size, cfg.patch_size[i], in_chans, dim, strict_img_size=False,
                                      stride=cfg.patch_stride[i], padding=cfg.patch_padding[i], norm_layer=norm)
        self.pos_drop = nn.Dropout(at("drop_rate"))
        rates = drop_path_rates(cfg.drop_path_rate[i], cfg.depth[i])  # official: linspace(0, rate, depth) per stage
        self.blocks = nn.ModuleList([
            Block(dim, drop_path=rate, norm_layer=norm,
                  attn=ConvAttention(dim, cfg.num_heads[i], qkv_bias=at("qkv_bias"), kernel_size=at("kernel_qkv"),
                                     stride_q=at("stride_q"), stride_kv=at("stride_kv"), padding_q=at("padding_q"),
                                     padding_kv=at("padding_kv"), class_token=self.cls_token is not None,
                                     scale=cfg.attn_scale, method=at("qkv_proj_method"),
                                     attn_drop=at("attn_drop_rate"), proj_drop=at("drop_rate")),
                  mlp=Mlp(dim, int(dim * at("mlp_ratio")), act_layer=cfg.act_layer, drop=at("drop_rate")))
            for rate in rates])

    def forward(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """(B, C_in, H_in, W_in) map → ((B, [1 +] H·W, C) tokens, (H, W))."""
        grid = self.patch_embed.output_grid(x.shape[-2], x.shape[-1])
        x = self.patch_embed(x)  # (B, H·W, C)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1 + H·W, C)
        x = self.pos_drop(x)
        for block in self.blocks:
            x = block(x, grid)
        return x, grid

    def to_map(self, x: Tensor, grid: tuple[int, int]) -> Tensor:
        """Tokens → (B, C, H, W) map of the patch tokens (the class token dropped), a channels-last view."""
        return split_map(x, grid, self.cls_token is not None)[1]


class ConvolutionalVisionTransformer(StagedBlocks, LinearHead, FamilyModel):
    input_weights = ("stages.0.patch_embed.proj.weight",)
    convolutional = True  # overlapping token embeddings and depth-wise projections (paper §3.1-3.2)
    config_cls = CvTConfig
    intermediates = "pyramid"

    def __init__(self, cfg: CvTConfig):
        super().__init__()
        self.cfg = cfg
        self.num_classes = cfg.num_classes
        self.num_features = cfg.embed_dim[-1]
        stages, in_chans, size = [], cfg.in_chans, to_2tuple(cfg.img_size)
        for i in range(len(cfg.depth)):
            stages.append(CvTStage(cfg, i, in_chans, size))
            in_chans, size = cfg.embed_dim[i], stages[-1].patch_embed.grid_size
        self.stages = nn.ModuleList(stages)
        self.norm = nn.LayerNorm(self.num_features, eps=cfg.norm_eps)
        self.class_token = cfg.stage_class_token(len(cfg.depth) - 1)  # the last stage's is the classified feature
        self.head_drop = nn.Dropout(cfg.per_stage("drop_rate", len(cfg.depth) - 1))
        self.head = self._make_head(cfg.num_classes)
        self.init_weights()

    # ----------------------------------------------------------------------------------------------- construction
    def init_weights(self) -> None:
        """The official init (``_init_weights_trunc_normal``): truncated-normal(0.02) dense layers, class token and
        head, zero biases; norms start at identity; convolutions keep PyTorch's default. ``init='xavier'``: the
        stages' dense layers Xavier-uniform instead (``_init_weights_xavier``; the head stays truncated-normal)."""
        trunc_normal_linears_(self)
        if self.cfg.init == "xavier":
            for m in self.stages.modules():
                if isinstance(m, nn.Linear):
                    nn.init.xavier_uniform_(m.weight)
        for stage in self.stages:
            if stage.cls_token is not None:
                nn.init.trunc_normal_(stage.cls_token, std=0.02)

    def no_weight_decay(self) -> set[str]:
        """The class token (official ``no_weight_decay``); norms, BatchNorm and biases are 1-d."""
        return {n for n, _ in self.named_parameters() if n.endswith("cls_token")}

    def layer_id(self, param_name: str) -> int:
        """Swin/SimMIM numbering over the three stages: the first token embedding 0, block j of stage i
        sum(depth[:i]) + j + 1, a later stage's token embedding and class token one below its first block, the
        final norm and head last."""
        parts = param_name.split(".")
        if parts[0] != "stages":
            return staged_layer_id(self.cfg.depth, len(self.cfg.depth))
        stage = int(parts[1])
        if parts[2] == "blocks":
            return staged_layer_id(self.cfg.depth, stage, int(parts[3]))
        return staged_layer_id(self.cfg.depth, stage if stage > 0 else None)

    @property
    def num_layer_ids(self) -> int:
        return sum(self.cfg.depth) + 2

    # --------------------------------------------------------------------------------------------------- forward
    def _stages(self, x: Tensor, last: int) -> list[tuple[Tensor, tuple[int, int]]]:
        outs = []
        for i, stage in enumerate(self.stages[: last + 1]):
            if i:
                x = self.stages[i - 1].to_map(*outs[-1])  # (B, C, H, W)
            outs.append(stage(x))
        return outs

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, C, H, W) images → the last stage's normalised tokens (B, [1 +] H·W, D), class token first."""
        tokens, _ = self._stages(x, len(self.stages) - 1)[-1]
        return self.norm(tokens)  # LayerNorm is per token: norm(cls) as the official head takes it

    def feature_map(self, features: Tensor, image_hw: tuple[int, int]) -> Tensor:
        return tokens_to_map(features, int(self.class_token), image_hw)  # (B, D, h, w) of the last stage

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = x[:, 0] if self.class_token else x.mean(dim=1)  # (B, D): official forward_features
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward_intermediates(self, x: Tensor, indices: int | Sequence[int] | None = None,
                              norm: bool = False) -> list[Tensor]:
        """Per-stage maps (B, C_i, H_i, W_i) of the patch tokens (strides 4, 8, 16 for the official configs).
        ``norm`` applies the final LayerNorm to the last stage's map (the only stage of its width)."""
        wanted = select_indices(indices, len(self.stages), "stage")
        outs = self._stages(x, wanted[-1])
        maps = []
        for i in wanted:
            tokens, grid = outs[i]
            if norm and i == len(self.stages) - 1:
                tokens = self.norm(tokens)
            maps.append(self.stages[i].to_map(tokens, grid).contiguous())  # (B, C, H, W)
        return maps

    # ------------------------------------------------------------------------------------------ weight loading
    def load_pretrained_state(self, state: dict[str, Tensor], report) -> dict[str, Tensor]:
        """Only the classifier can need adapting: CvT has no position embedding or bias table, so weights of any input
        size fit (the report says so when the size is another or unknown)."""
        from vitkit.weights.adapt import adapt_head
        source = report.source_config.get("img_size")
        if source is None or to_2tuple(source) != to_2tuple(self.cfg.img_size):
            h, w = to_2tuple(self.cfg.img_size)
            report.notes.append(f"nothing to resize for {h}x{w} input: CvT has no position embedding or bias table, "
                                f"its weights fit any input size")
        return adapt_head(state, "head", self.head, report)
