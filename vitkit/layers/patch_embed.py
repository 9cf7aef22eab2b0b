"""Patch embedding (ViT paper eq. 1): split the image into P×P patches, flatten, project linearly.

As in the JAX code ("s2d + embedding merged into a single conv"), this is a conv with kernel = stride = P and no
padding. The same layer serves the hierarchical families: an overlapping conv (PVT v2's 7×7 stride-4 patches, CvT's
convolutional token embedding: ``stride`` < ``patch_size`` with ``padding``), an optional norm on the tokens (Swin,
PVT), PVT v1's flooring of sizes that are not a multiple of the patch (``drop_remainder``), and three output layouts:
tokens (B, N, D), channels-last maps (B, H, W, D) as Swin keeps them between stages, or channels-first maps
(B, D, H, W). Non-square images and grids are supported.
"""
from __future__ import annotations

from typing import Callable, Literal

from torch import Tensor, nn

__all__ = ["PatchEmbed", "HybridEmbed", "to_2tuple", "check_image_batch"]


def to_2tuple(x: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(x, (tuple, list)):
        if len(x) != 2:
            raise ValueError(f"expected an int or a pair, got {x!r}")
        return int(x[0]), int(x[1])
    return int(x), int(x)


def check_image_batch(x: object, in_chans: int) -> None:
    """A batch of images (B, C, H, W), floating point, with the channels the model takes: anything else is a
    ValueError saying so (a single (C, H, W) image needs a batch dimension)."""
    if not isinstance(x, Tensor):
        raise ValueError(f"expected a batch of images of shape (B, {in_chans}, H, W), got {type(x).__name__}")
    if x.ndim != 4 or x.shape[1] != in_chans:
        hint = "; add a batch dimension: x.unsqueeze(0)" if x.ndim == 3 and x.shape[0] == in_chans else ""
        raise ValueError(f"expected a batch of images of shape (B, {in_chans}, H, W), got a tensor of shape "
                         f"{tuple(x.shape)}{hint}")
    if not x.is_floating_point():
        raise ValueError(f"expected a floating-point batch of images, got {x.dtype} (normalise the images first)")


class PatchEmbed(nn.Module):
    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int | tuple[int, int] = 16,
                 in_chans: int = 3, embed_dim: int = 768, bias: bool = True, strict_img_size: bool = True, *,
                 stride: int | tuple[int, int] | None = None, padding: int | tuple[int, int] = 0,
                 norm_layer: Callable[[int], nn.Module] | None = None,
                 output_fmt: Literal["NLC", "NHWC", "NCHW"] = "NLC", drop_remainder: bool = False):
        super().__init__()
        self.img_size = to_2tuple(img_size)
        self.patch_size = to_2tuple(patch_size)
        self.stride = to_2tuple(stride if stride is not None else patch_size)
        self.padding = to_2tuple(padding)
        self.overlapping = self.stride != self.patch_size or any(self.padding)
        self.drop_remainder = drop_remainder  # True: rows/columns that do not fill a patch are dropped (conv floor)
        if not (self.overlapping or drop_remainder):
            for s, p in zip(self.img_size, self.patch_size):
                if s % p:
                    raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        self.grid_size = self.output_grid(*self.img_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.strict_img_size = strict_img_size
        self.output_fmt = output_fmt
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.stride,
                              padding=self.padding, bias=bias)
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def output_grid(self, H: int, W: int) -> tuple[int, int]:
        """The token grid (h, w) of an H×W input (the conv output size)."""
        (kh, kw), (sh, sw), (ph, pw) = self.patch_size, self.stride, self.padding
        return (H + 2 * ph - kh) // sh + 1, (W + 2 * pw - kw) // sw + 1

    def check_input(self, x: Tensor) -> None:
        check_image_batch(x, self.proj.in_channels)

    def check_size(self, H: int, W: int) -> None:
        if self.strict_img_size and (H, W) != self.img_size:
            raise ValueError(f"input is {H}x{W} but the model was built for {self.img_size[0]}x{self.img_size[1]}; "
                             f"pass img_size= to create_model, or dynamic_img_size=True")
        ph, pw = self.patch_size
        if not (self.overlapping or self.drop_remainder) and (H % ph or W % pw):
            raise ValueError(f"input {H}x{W} is not a multiple of the patch size {ph}x{pw}")

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)  # callers that unpack the shape earlier call it themselves
        B, C, H, W = x.shape
        self.check_size(H, W)
        x = self.proj(x)  # (B, D, h, w)
        if self.output_fmt == "NCHW":
            return x if isinstance(self.norm, nn.Identity) else self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        x = x.permute(0, 2, 3, 1)  # (B, h, w, D)
        x = self.norm(x)
        return x if self.output_fmt == "NHWC" else x.flatten(1, 2)  # (B, h·w, D)


class HybridEmbed(nn.Module):
    """``backbone`` (a module with ``out_chs``, ``stride`` and ``output_size(n)``, e.g. ``ResNetBackbone``) → conv with
    kernel = stride = ``patch_size`` → (B, h·w, D) tokens: google-research/vision_transformer
    ``vit_jax/models_vit.py``@c6de1e5 (the ResNet root and stages, then ``embedding``), timm's ``HybridEmbed``.

    ``patch_size`` is the patch on the feature map; ``grid_size`` the token grid of ``img_size`` (a feature map side
    that is not a multiple of the patch is floored, as the VALID conv of both does).
    """

    def __init__(self, backbone: nn.Module, img_size: int | tuple[int, int] = 224, patch_size: int = 1,
                 in_chans: int = 3, embed_dim: int = 768, strict_img_size: bool = True):
        super().__init__()
        self.backbone = backbone
        self.in_chans = in_chans
        self.img_size = to_2tuple(img_size)
        self.patch_size = to_2tuple(patch_size)
        self.grid_size = self.output_grid(*self.img_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.strict_img_size = strict_img_size
        self.proj = nn.Conv2d(backbone.out_chs, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)

    def output_grid(self, H: int, W: int) -> tuple[int, int]:
        """The token grid (h, w) of an H×W input."""
        return (self.backbone.output_size(H) // self.patch_size[0], self.backbone.output_size(W) // self.patch_size[1])

    def check_input(self, x: Tensor) -> None:
        check_image_batch(x, self.in_chans)

    def check_size(self, H: int, W: int) -> None:
        if self.strict_img_size and (H, W) != self.img_size:
            raise ValueError(f"input is {H}x{W} but the model was built for {self.img_size[0]}x{self.img_size[1]}; "
                             f"pass img_size= to create_model, or dynamic_img_size=True")
        if min(self.output_grid(H, W)) < 1:
            raise ValueError(f"input {H}x{W} is too small: the backbone's {self.backbone.stride}-pixel cells give no "
                             f"{self.patch_size[0]}x{self.patch_size[1]} patch")

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        self.check_size(*x.shape[-2:])
        x = self.proj(self.backbone(x))  # (B, D, h, w)
        return x.flatten(2).transpose(1, 2)  # (B, h·w, D)
