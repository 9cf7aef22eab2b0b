"""Patch embedding (ViT paper eq. 1): split the image into P×P patches, flatten, project linearly.

As in the JAX code ("s2d + embedding merged into a single conv"), this is a conv with kernel = stride = P and no
padding. Non-square images and patch grids are supported.
"""
from __future__ import annotations

from torch import Tensor, nn

__all__ = ["PatchEmbed", "to_2tuple"]


def to_2tuple(x: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(x, (tuple, list)):
        if len(x) != 2:
            raise ValueError(f"expected an int or a pair, got {x!r}")
        return int(x[0]), int(x[1])
    return int(x), int(x)


class PatchEmbed(nn.Module):
    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int | tuple[int, int] = 16,
                 in_chans: int = 3, embed_dim: int = 768, bias: bool = True, strict_img_size: bool = True):
        super().__init__()
        self.img_size = to_2tuple(img_size)
        self.patch_size = to_2tuple(patch_size)
        for s, p in zip(self.img_size, self.patch_size):
            if s % p:
                raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.strict_img_size = strict_img_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size, bias=bias)

    def check_input(self, x: Tensor) -> None:
        """A batch of images (B, C, H, W) with the channels the model takes: anything else is a ValueError saying so
        (a single (C, H, W) image needs a batch dimension)."""
        C = self.proj.in_channels
        if x.ndim != 4 or x.shape[1] != C:
            hint = "; add a batch dimension: x.unsqueeze(0)" if x.ndim == 3 and x.shape[0] == C else ""
            raise ValueError(f"expected a batch of images of shape (B, {C}, H, W), got a tensor of shape "
                             f"{tuple(x.shape)}{hint}")

    def check_size(self, H: int, W: int) -> None:
        ph, pw = self.patch_size
        if self.strict_img_size and (H, W) != self.img_size:
            raise ValueError(f"input is {H}x{W} but the model was built for {self.img_size[0]}x{self.img_size[1]}; "
                             f"pass img_size= to create_model, or dynamic_img_size=True")
        if H % ph or W % pw:
            raise ValueError(f"input {H}x{W} is not a multiple of the patch size {ph}x{pw}")

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)  # callers that unpack the shape earlier call it themselves
        B, C, H, W = x.shape
        self.check_size(H, W)
        x = self.proj(x)  # (B, D, H/P, W/P)
        return x.flatten(2).transpose(1, 2)  # (B, N, D)
