"""Deterministic image operations on ``uint8`` tensors ``(C, H, W)`` (most also take ``(B, C, H, W)``); no torchvision.

Every function is pure and draws no random numbers: the random transforms in ``transforms.py`` and
``auto_augment.py`` pick the parameters and call these.

Conventions (PIL's, which timm's ``auto_augment.py`` relies on, so that magnitudes mean the same thing):
- Each op returns ``uint8``: blends and interpolated warps truncate toward zero after clamping, like
  ``PIL.Image.blend`` / ``Image.transform`` and torchvision's tensor ``_blend``; resizing rounds.
- Greyscale is ITU-R 601-2 luma (``L = 0.299 R + 0.587 G + 0.114 B``, rounded), in the same fixed point as
  ``Image.convert("L")``.
- ``affine`` takes PIL's *inverse* matrix: output pixel centre ``(x + .5, y + .5)`` samples the input at
  ``M @ (x + .5, y + .5, 1)``; samples outside the input get the fill colour with a hard edge, as PIL does.
- ``equalize`` and ``autocontrast`` build their lookup tables per channel exactly as ``PIL.ImageOps`` does.
- Resizing is ``F.interpolate`` with ``antialias=True`` (matches PIL's filter support when downscaling) and
  ``align_corners=False``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "resize", "resize_shorter", "crop", "center_crop", "pad", "hflip", "affine", "rotation_matrix",
    "to_gray", "blend", "adjust_brightness", "adjust_color", "adjust_contrast", "adjust_sharpness",
    "posterize", "solarize", "solarize_add", "invert", "autocontrast", "equalize", "normalize",
]

_LUMA = (19595, 38470, 7471)  # 0.299, 0.587, 0.114 in 1/65536 units (PIL's Convert.c)


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(0, 255).to(torch.uint8)  # truncates toward zero, as PIL's blend


def _round_uint8(x: torch.Tensor) -> torch.Tensor:
    return x.round().clamp(0, 255).to(torch.uint8)


# --- geometry -----------------------------------------------------------------------------------------------------

def resize(x: torch.Tensor, size: tuple[int, int], interpolation: str = "bilinear") -> torch.Tensor:
    """Resize ``uint8`` ``(C, H, W)`` or ``(B, C, H, W)`` to ``size = (h, w)``, antialiased."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    batched = x.unsqueeze(0) if x.ndim == 3 else x  # (B, C, H, W)
    antialias = interpolation in ("bilinear", "bicubic")
    kwargs = {} if interpolation == "nearest" else {"align_corners": False, "antialias": antialias}
    out = F.interpolate(batched.float(), size=size, mode=interpolation, **kwargs)  # (B, C, h, w)
    out = _round_uint8(out)
    return out[0] if x.ndim == 3 else out


def resize_shorter(x: torch.Tensor, size: int, interpolation: str = "bilinear") -> torch.Tensor:
    """Resize so the shorter side is ``size``; the longer side is ``int(size * long / short)`` (torchvision)."""
    h, w = x.shape[-2:]
    if h <= w:
        return resize(x, (size, int(size * w / h)), interpolation)
    return resize(x, (int(size * h / w), size), interpolation)


def crop(x: torch.Tensor, top: int, left: int, height: int, width: int) -> torch.Tensor:
    return x[..., top:top + height, left:left + width]


def center_crop(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Central ``height × width`` window; the offset rounds like torchvision's ``center_crop``."""
    h, w = x.shape[-2:]
    if height > h or width > w:
        raise ValueError(f"center_crop: {height}x{width} is larger than the image {h}x{w}")
    top, left = int(round((h - height) / 2.0)), int(round((w - width) / 2.0))
    return crop(x, top, left, height, width)


def pad(x: torch.Tensor, padding: int, mode: str = "constant") -> torch.Tensor:
    """Pad all four sides by ``padding``; ``mode`` is ``constant`` (zeros) or ``reflect``."""
    if padding <= 0:
        return x
    batched = x.unsqueeze(0) if x.ndim == 3 else x  # (B, C, H, W)
    out = F.pad(batched, (padding,) * 4, mode=mode)  # (B, C, H + 2p, W + 2p)
    return out[0] if x.ndim == 3 else out


def hflip(x: torch.Tensor) -> torch.Tensor:
    return x.flip(-1)


def rotation_matrix(degrees: float, height: int, width: int) -> tuple[float, ...]:
    """PIL ``Image.rotate`` inverse matrix: counter-clockwise by ``degrees`` about the image centre."""
    a = -math.radians(degrees)
    cos, sin = math.cos(a), math.sin(a)
    cx, cy = width / 2.0, height / 2.0
    # input = R @ (out - c) + c, written as the 6 affine coefficients
    return (cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy)


def affine(x: torch.Tensor, matrix: tuple[float, ...], fill: tuple[float, ...] = (0.0, 0.0, 0.0),
           interpolation: str = "bilinear") -> torch.Tensor:
    """Warp ``uint8`` ``(C, H, W)`` with PIL's inverse affine ``matrix = (a, b, c, d, e, f)``."""
    C, H, W = x.shape
    a, b, c, d, e, f = matrix
    xs = torch.arange(W, dtype=torch.float32, device=x.device) + 0.5  # (W,) output pixel centres
    ys = torch.arange(H, dtype=torch.float32, device=x.device) + 0.5  # (H,)
    # input position u = a x + b y + c (and v likewise), mapped to grid_sample's [-1, 1] (align_corners=False)
    u = (xs * (2 * a / W) + (2 * c / W - 1)).view(1, W) + (ys * (2 * b / W)).view(H, 1)  # (H, W)
    v = (xs * (2 * d / H) + (2 * f / H - 1)).view(1, W) + (ys * (2 * e / H)).view(H, 1)  # (H, W)
    inside = (u >= -1) & (u < 1) & (v >= -1) & (v < 1)  # (H, W): PIL fills everything else
    grid = torch.stack((u, v), dim=-1)[None]  # (1, H, W, 2)
    out = F.grid_sample(x[None].float(), grid, mode=interpolation, padding_mode="border",
                        align_corners=False)[0]  # (C, H, W)
    fill_t = torch.tensor(fill, dtype=out.dtype, device=x.device).view(C, 1, 1)  # (C, 1, 1)
    # PIL truncates interpolated values; + 1e-3 keeps float32 error from turning an exact 193 into 192
    return _to_uint8(torch.where(inside, out + 1e-3, fill_t))


# --- colour -------------------------------------------------------------------------------------------------------

def to_gray(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601-2 luma of ``uint8 (..., 3, H, W)`` as float ``(..., 1, H, W)``, in PIL's 16-bit fixed point."""
    r, g, b = x.int().unbind(-3)  # each (..., H, W)
    luma = (r * _LUMA[0] + g * _LUMA[1] + b * _LUMA[2] + 0x8000) >> 16  # PIL's L24 macro, rounded
    return luma.unsqueeze(-3).float()  # (..., 1, H, W)


def blend(degenerate: torch.Tensor, x: torch.Tensor, factor: float) -> torch.Tensor:
    """PIL ``ImageEnhance``: ``degenerate + factor * (x - degenerate)``; factor 1 returns ``x``."""
    return _to_uint8(degenerate + factor * (x.float() - degenerate))


def adjust_brightness(x: torch.Tensor, factor: float) -> torch.Tensor:
    return blend(torch.zeros((), device=x.device), x, factor)


def adjust_color(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Saturation (PIL ``ImageEnhance.Color``): blend with the greyscale image."""
    return blend(to_gray(x), x, factor)


def adjust_contrast(x: torch.Tensor, factor: float) -> torch.Tensor:
    """PIL ``ImageEnhance.Contrast``: blend with the (rounded) mean grey level."""
    mean = to_gray(x).mean(dim=(-3, -2, -1), keepdim=True)  # (..., 1, 1, 1)
    return blend((mean + 0.5).floor(), x, factor)


def adjust_sharpness(x: torch.Tensor, factor: float) -> torch.Tensor:
    """PIL ``ImageEnhance.Sharpness``: blend with the 3×3 SMOOTH filter (centre 5, total 13); borders kept."""
    C, H, W = x.shape
    if H < 3 or W < 3:
        return x
    xf = x.float()
    # 3×3 box sum + 4 × centre = SMOOTH's weights; shifted slices rather than conv2d, whose thread pool costs
    # milliseconds per call on a busy 2-core CPU
    total = 4.0 * xf[:, 1:-1, 1:-1]  # (C, H - 2, W - 2)
    for dy in range(3):
        for dx in range(3):
            total = total + xf[:, dy:H - 2 + dy, dx:W - 2 + dx]
    degenerate = xf.clone()
    degenerate[:, 1:-1, 1:-1] = (total / 13.0).round()
    return blend(degenerate, x, factor)


def posterize(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Keep the ``bits`` most significant bits (0 → black); ``bits >= 8`` is the identity."""
    if bits >= 8:
        return x
    mask = (0xFF << (8 - max(bits, 0))) & 0xFF
    return x & mask


def solarize(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """Invert every value ``>= threshold`` (PIL ``ImageOps.solarize``); threshold 256 is the identity."""
    if threshold > 255:  # a uint8 comparison with 256 would wrap around
        return x
    return torch.where(x >= math.ceil(threshold), 255 - x, x)  # same set for integer x, no float copy


def solarize_add(x: torch.Tensor, add: int, threshold: int = 128) -> torch.Tensor:
    """Add ``add`` (capped at 255) to values below ``threshold`` (timm/TF ``solarize_add``)."""
    return torch.where(x < threshold, (x.int() + add).clamp(max=255).to(torch.uint8), x)


def invert(x: torch.Tensor) -> torch.Tensor:
    return 255 - x


def autocontrast(x: torch.Tensor) -> torch.Tensor:
    """Stretch each channel of ``(C, H, W)`` to 0..255 (PIL ``ImageOps.autocontrast``, cutoff 0)."""
    rows = []
    for lo, hi in zip(x.amin(dim=(-2, -1)).tolist(), x.amax(dim=(-2, -1)).tolist()):
        ix = torch.arange(256, dtype=torch.float64, device=x.device)
        if hi <= lo:  # one value: PIL leaves the channel alone
            rows.append(ix)
            continue
        scale = 255.0 / (hi - lo)  # Python floats, in PIL's order, so int() truncates the same values
        rows.append(ix * scale + (-lo * scale))
    return _apply_lut(x, _to_uint8(torch.stack(rows)))  # LUT (C, 256)


def _apply_lut(x: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """Per-channel lookup: ``uint8 (C, H, W)`` through ``lut (C, 256)``."""
    C = x.shape[0]
    return lut.gather(1, x.reshape(C, -1).long()).to(torch.uint8).view_as(x)  # (C, H, W)


def equalize(x: torch.Tensor) -> torch.Tensor:
    """Histogram equalisation per channel of ``uint8`` ``(C, H, W)`` with PIL's ``ImageOps.equalize`` table."""
    C = x.shape[0]
    flat = x.reshape(C, -1).long()  # (C, H*W)
    offsets = torch.arange(C, device=x.device).unsqueeze(1) * 256  # (C, 1)
    hist = torch.bincount((flat + offsets).reshape(-1), minlength=256 * C).view(C, 256)  # (C, 256)
    last = 255 - hist.flip(1).ne(0).int().argmax(1)  # (C,) index of the last non-empty bin
    step = (hist.sum(1) - hist.gather(1, last[:, None])[:, 0]) // 255  # (C,)
    safe = step.clamp(min=1)[:, None]  # (C, 1)
    cum = torch.cumsum(hist, 1) - hist  # (C, 256) exclusive prefix sum
    lut = ((safe // 2 + cum) // safe).clamp(max=255)  # (C, 256)
    identity = torch.arange(256, device=x.device).expand(C, 256)
    lut = torch.where(step[:, None] > 0, lut, identity)  # PIL leaves a channel alone when step is 0
    return _apply_lut(x, lut)


# --- to the model -------------------------------------------------------------------------------------------------

def normalize(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """``uint8`` ``(..., C, H, W)`` → float32 ``(x / 255 - mean) / std`` (mean/std given on the 0..1 scale)."""
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(-1, 1, 1)  # (C, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(-1, 1, 1)  # (C, 1, 1)
    return (x.float() / 255.0 - m) / s
