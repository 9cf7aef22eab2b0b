"""Pictures of explanations: heat maps blended over the input image, as PIL images (PNG), with no plotting library.

The colour map is a perceptually ordered blue → cyan → yellow → red ramp (a compact "turbo"-like table); the overlay
keeps the photo visible under the map (alpha 0.5 where the map is high, fading with it).
"""
from __future__ import annotations

import base64
import io

import numpy as np
import torch
from PIL import Image
from torch import Tensor

__all__ = ["colorize", "overlay", "denormalize", "to_data_uri", "draw_points"]

# (position, R, G, B): a five-stop ramp close to matplotlib's turbo
_STOPS = np.array([[0.00, 48, 18, 59], [0.25, 40, 150, 240], [0.50, 120, 250, 90], [0.75, 250, 185, 45],
                   [1.00, 180, 20, 10]], dtype=np.float64)


def colorize(heat: np.ndarray) -> np.ndarray:
    """(H, W) values in [0, 1] → (H, W, 3) uint8 colours."""
    h = np.clip(heat, 0.0, 1.0)
    rgb = [np.interp(h, _STOPS[:, 0], _STOPS[:, c]) for c in (1, 2, 3)]
    return np.stack(rgb, -1).astype(np.uint8)


def denormalize(x: Tensor, data_cfg) -> np.ndarray:
    """A preprocessed (3, H, W) tensor → (H, W, 3) uint8 RGB, undoing mean/std and a BGR channel order."""
    mean = torch.tensor(data_cfg.mean).view(3, 1, 1)
    std = torch.tensor(data_cfg.std).view(3, 1, 1)
    img = (x.detach().float().cpu() * std + mean).clamp(0, 1)
    if data_cfg.channel_order == "BGR":
        img = img.flip(0)
    return (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def overlay(image: np.ndarray, heat: Tensor | np.ndarray, alpha: float = 0.55) -> Image.Image:
    """Blend a heat map (any size; resized bilinearly to the image) over an (H, W, 3) uint8 image."""
    heat = heat.detach().cpu().float().numpy() if isinstance(heat, Tensor) else np.asarray(heat, dtype=np.float32)
    H, W = image.shape[:2]
    if heat.shape != (H, W):
        heat = np.asarray(Image.fromarray(heat.astype(np.float32), mode="F").resize((W, H), Image.BILINEAR))
    weight = (alpha * np.clip(heat, 0, 1) ** 0.5)[..., None]
    out = (1 - weight) * image.astype(np.float32) + weight * colorize(heat).astype(np.float32)
    return Image.fromarray(out.round().clip(0, 255).astype(np.uint8))


def draw_points(image: Image.Image | np.ndarray, points: np.ndarray, refs: np.ndarray | None = None) -> Image.Image:
    """Mark sampling points (N, 2) in pixel (x, y) coordinates, and their reference points, on a copy of ``image``."""
    from PIL import ImageDraw
    out = Image.fromarray(image) if isinstance(image, np.ndarray) else image.copy()  # (H, W, 3) uint8 or PIL
    draw = ImageDraw.Draw(out)
    if refs is not None:
        for x, y in refs:
            draw.rectangle([x - 1, y - 1, x + 1, y + 1], outline=(255, 255, 255))
    for x, y in points:
        draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=(255, 40, 40))
    return out


def to_data_uri(image: Image.Image) -> str:
    """A PNG as a ``data:`` URI, for a self-contained HTML page."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
