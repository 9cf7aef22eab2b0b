"""The ResNet of the ViT hybrids (ViT paper §3.1 "Hybrid Architecture", App. B.1.2 / D.4): a BiT-style ResNet with
weight-standardised convolutions and GroupNorm (32 groups), non-pre-activation bottlenecks, every convolution and
pooling "SAME"-padded.

    root     x → maxpool₃ₓ₃/₂(relu(GN(StdConv₇ₓ₇/₂(x))))
    unit     y = relu(shortcut(x) + GN₃(conv₃(relu(GN₂(conv₂(relu(GN₁(conv₁(x)))))))))
             conv₁, conv₃ 1×1, conv₂ 3×3 with the unit's stride; shortcut = GN(StdConv₁ₓ₁(x)) when the channels or
             the stride change, else x
    stage i  units of bottleneck width 64·w·2^i and output 4× that; stride 1 for the first stage, 2 after

as google-research/vision_transformer ``vit_jax/models_vit.py`` (the root block) and ``vit_jax/models_resnet.py``
(``ResidualUnit``, ``ResNetStage``)@c6de1e5 build it, and timm 1.0.31 ``models/resnetv2.py`` for its hybrids
(``create_resnetv2_stem(stem_type='same', preact=False)``, ``Bottleneck``, ``DownsampleConv``). Module names are
timm's (``stem.conv``, ``stem.norm``, ``stages.{i}.blocks.{j}.conv1`` … ``downsample.conv``), so timm's hybrid
state dicts need no rename; the JAX ``.npz`` names are converted by the ViT family's JAX reader.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from vitkit.layers.conv import StdConv2d, pad_same

__all__ = ["ResNetStem", "ResNetBottleneck", "ResNetStage", "ResNetBackbone"]

GROUPS = 32  # GroupNorm groups: flax's nn.GroupNorm default (vit_jax) and timm's GroupNormAct(num_groups=32)


class _Numerics:
    """The two epsilons that differ between vit_jax and timm's port: GroupNorm's and the weight standardisation's."""

    def __init__(self, gn_eps: float, ws_eps: float, ws_eps_in_sqrt: bool):
        self.gn_eps, self.ws_eps, self.ws_eps_in_sqrt = gn_eps, ws_eps, ws_eps_in_sqrt

    def conv(self, in_chs: int, out_chs: int, kernel: int, stride: int = 1) -> StdConv2d:
        return StdConv2d(in_chs, out_chs, kernel, stride, eps=self.ws_eps, eps_in_sqrt=self.ws_eps_in_sqrt)

    def norm(self, chs: int) -> nn.GroupNorm:
        return nn.GroupNorm(GROUPS, chs, eps=self.gn_eps)


class ResNetStem(nn.Module):
    """The root block: StdConv 7×7 stride 2 → GroupNorm → ReLU → max-pool 3×3 stride 2 (stride 4 in all)."""

    def __init__(self, in_chs: int, out_chs: int, numerics: _Numerics):
        super().__init__()
        self.conv = numerics.conv(in_chs, out_chs, 7, 2)
        self.norm = numerics.norm(out_chs)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) → (B, out_chs, ⌈H/4⌉, ⌈W/4⌉)
        x = F.relu(self.norm(self.conv(x)))
        x = pad_same(x, (3, 3), (2, 2), value=float("-inf"))
        return F.max_pool2d(x, 3, 2)


class _Downsample(nn.Module):
    """The projection shortcut: StdConv 1×1 (strided) → GroupNorm, no activation (vit_jax ``conv_proj`` / ``gn_proj``;
    timm ``DownsampleConv``)."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, numerics: _Numerics):
        super().__init__()
        self.conv = numerics.conv(in_chs, out_chs, 1, stride)
        self.norm = numerics.norm(out_chs)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.conv(x))


class ResNetBottleneck(nn.Module):
    """One non-pre-activation bottleneck unit of bottleneck width ``mid_chs`` and output ``4·mid_chs``."""

    def __init__(self, in_chs: int, mid_chs: int, stride: int, numerics: _Numerics):
        super().__init__()
        out_chs = 4 * mid_chs
        needs_projection = in_chs != out_chs or stride != 1  # vit_jax ResidualUnit's rule
        self.downsample = _Downsample(in_chs, out_chs, stride, numerics) if needs_projection else None
        self.conv1 = numerics.conv(in_chs, mid_chs, 1)
        self.norm1 = numerics.norm(mid_chs)
        self.conv2 = numerics.conv(mid_chs, mid_chs, 3, stride)
        self.norm2 = numerics.norm(mid_chs)
        self.conv3 = numerics.conv(mid_chs, out_chs, 1)
        self.norm3 = numerics.norm(out_chs)

    def forward(self, x: Tensor) -> Tensor:  # (B, in_chs, H, W) → (B, 4·mid_chs, ⌈H/s⌉, ⌈W/s⌉)
        shortcut = x if self.downsample is None else self.downsample(x)
        y = F.relu(self.norm1(self.conv1(x)))
        y = F.relu(self.norm2(self.conv2(y)))
        y = self.norm3(self.conv3(y))
        return F.relu(shortcut + y)


class ResNetStage(nn.Module):
    """``depth`` units; the first one strided (vit_jax ``ResNetStage``)."""

    def __init__(self, in_chs: int, mid_chs: int, depth: int, stride: int, numerics: _Numerics):
        super().__init__()
        self.blocks = nn.Sequential(*[ResNetBottleneck(in_chs if j == 0 else 4 * mid_chs, mid_chs,
                                                       stride if j == 0 else 1, numerics) for j in range(depth)])

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(x)


class ResNetBackbone(nn.Module):
    """Root block and stages: ``num_layers`` units per stage (() = the root alone), root width ``int(64·w)``.

    ``out_chs``: channels of the output map; ``stride``: input pixels per output cell (4, then ×2 per stage after
    the first); ``output_size(n)``: the output side for an input side n ("SAME": ⌈n / 2⌉ at every stride-2 layer).
    """

    def __init__(self, in_chs: int, num_layers: tuple[int, ...], width_factor: float, *, gn_eps: float = 1e-6,
                 ws_eps: float = 1e-5, ws_eps_in_sqrt: bool = False):
        super().__init__()
        numerics = _Numerics(gn_eps, ws_eps, ws_eps_in_sqrt)
        width = int(64 * width_factor)
        self.stem = ResNetStem(in_chs, width, numerics)
        stages, chs = [], width
        for i, depth in enumerate(num_layers):
            stages.append(ResNetStage(chs, width * 2 ** i, depth, 1 if i == 0 else 2, numerics))
            chs = 4 * width * 2 ** i
        self.stages = nn.Sequential(*stages)
        self.out_chs = chs
        self.num_strided = 2 + max(len(num_layers) - 1, 0)  # the root's conv and pool, then every later stage
        self.stride = 2 ** self.num_strided
        self.init_weights()

    def output_size(self, n: int) -> int:
        for _ in range(self.num_strided):
            n = -(-n // 2)
        return n

    def init_weights(self) -> None:
        """Kernels N(0, 1/fan_in) (flax's LeCun normal; the standardisation removes their scale), GroupNorm 1 and 0,
        and each unit's last GroupNorm scale 0 (vit_jax ``ResidualUnit``: ``gn3`` ``scale_init=zeros``), so that
        every unit starts as its shortcut."""
        for m in self.modules():
            if isinstance(m, StdConv2d):
                nn.init.normal_(m.weight, std=m.weight[0].numel() ** -0.5)
            elif isinstance(m, nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, ResNetBottleneck):
                nn.init.zeros_(m.norm3.weight)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) → (B, out_chs, H', W'), H' = output_size(H)
        return self.stages(self.stem(x))
