"""Image decoding: any file PIL can read becomes an 8-bit RGB ``PIL.Image`` or a ``uint8`` tensor ``(3, H, W)``.

Conventions:
- EXIF orientation is applied first (``ImageOps.exif_transpose``), as timm's and torchvision's loaders do not, but
  every photo viewer does; a rotated phone JPEG therefore reaches the model upright.
- Transparency (RGBA, LA, PA, P with a ``transparency`` entry) is alpha-composited on a background colour, white by
  default. PIL's ``convert("RGB")`` (what timm and torchvision use) drops alpha and exposes whatever colour is stored
  under fully transparent pixels, which is arbitrary; compositing shows the image as a viewer does.
- High bit depth is *scaled*, never clipped: ``I;16*`` (and ``I`` holding 0..65535, how PIL opens 16-bit PNG/TIFF)
  maps 0..65535 onto 0..255 (``v / 257``, rounded); ``I`` outside that range and ``F`` outside [0, 255] are min-max
  scaled; ``F`` within [0, 1] is multiplied by 255; ``F`` within [0, 255] is rounded.
- CMYK, YCbCr, LAB, HSV and 1-bit images go through PIL's own ``convert("RGB")`` (no ICC colour management).
"""
from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image, ImageOps

__all__ = ["ImageLoadError", "load_image", "to_rgb", "pil_to_tensor", "tensor_to_pil", "IMG_EXTENSIONS"]

# Extensions ImageFolder picks up (torchvision's list plus .gif); matched case-insensitively.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".tif", ".tiff", ".webp", ".gif")

_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_HIGH_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


class ImageLoadError(ValueError):
    """A file could not be decoded as an image; the message names the path and the reason."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"cannot load image {self.path}: {reason}")


def load_image(path: str | os.PathLike, *, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Decode ``path`` fully, apply its EXIF orientation and return an 8-bit RGB image.

    Raises ``ImageLoadError`` for a missing, unreadable, truncated or non-image file.
    """
    try:
        with Image.open(path) as img:
            img.load()  # decode now, so a truncated file fails here and not later in a worker
            img = ImageOps.exif_transpose(img)
            return to_rgb(img, background=background)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:  # PIL's decoding errors
        raise ImageLoadError(path, f"{type(e).__name__}: {e}") from e


def to_rgb(img: Image.Image, *, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB following the module's conventions."""
    if img.mode == "RGB":
        return img
    if img.mode in _HIGH_DEPTH_MODES:
        return Image.fromarray(_high_depth_to_uint8(np.asarray(img))).convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return img.convert("RGB")


def _high_depth_to_uint8(arr: np.ndarray) -> np.ndarray:
    """Scale a 16/32-bit integer or float greyscale array to uint8 (see the module docstring)."""
    if arr.size == 0:
        return np.zeros(arr.shape, np.uint8)
    if arr.dtype.kind in "ui":
        arr = arr.astype(np.int64)
        if arr.min() >= 0 and arr.max() <= 65535:  # 16-bit data: 65535 / 257 = 255 exactly
            return np.round(arr / 257.0).astype(np.uint8)
        return _minmax_to_uint8(arr.astype(np.float64))
    arr = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = float(arr.min()), float(arr.max())
    if lo >= 0.0 and hi <= 1.0:
        return np.round(arr * 255.0).astype(np.uint8)
    if lo >= 0.0 and hi <= 255.0:
        return np.round(arr).astype(np.uint8)
    return _minmax_to_uint8(arr)


def _minmax_to_uint8(arr: np.ndarray) -> np.ndarray:
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        return np.zeros(arr.shape, np.uint8)
    return np.round((arr - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL image (any mode, converted with ``to_rgb``) → ``uint8`` tensor ``(3, H, W)``; no torchvision."""
    arr = np.array(to_rgb(img), dtype=np.uint8, copy=True)  # (H, W, 3), writable and owned
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()  # (3, H, W)


def tensor_to_pil(x: torch.Tensor) -> Image.Image:
    """``uint8`` tensor ``(3, H, W)`` → RGB PIL image (for previews and debugging)."""
    if x.dtype != torch.uint8 or x.ndim != 3 or x.shape[0] != 3:
        raise ValueError(f"expected a uint8 tensor (3, H, W), got {x.dtype} {tuple(x.shape)}")
    return Image.fromarray(x.permute(1, 2, 0).cpu().numpy())  # (H, W, 3)
