"""Dense prediction on vitkit backbones: a feature pyramid from Swin, PVT v2 or ViT into a small segmentation head,
trained on synthetic shapes.

    python examples/dense_prediction.py --backbone swin --minutes 3

Each image (64×64) holds up to three shapes (disc, square, triangle) of random size, place and colour on a noisy
background; the target marks each pixel background / disc / square / triangle. The backbone is any vitkit family
built with ``features_only=True``: it returns (B, C_i, H_i, W_i) maps, which ``PyramidHead`` (a feature-pyramid
network in the manner of Lin et al. 2017, "Feature Pyramid Networks for Object Detection": lateral 1×1 convolutions,
top-down upsampling and summation, one 3×3 smoothing convolution) turns into per-pixel class scores. A plain ViT
gives three maps of one stride (its last blocks); the pyramid then merges them at that stride.
"""
from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import vitkit

CLASSES = ("background", "disc", "square", "triangle")

# small configurations of the three families, sized for a CPU: (variant, overrides)
BACKBONES = {
    "swin": ("swin_tiny_patch4_window7_224", dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8),
                                                  window_size=4, img_size=64)),
    "pvt_v2": ("pvt_v2_b0", dict(embed_dims=(16, 32, 64, 128), num_heads=(1, 2, 4, 8), depths=(1, 1, 2, 1),
                                 img_size=64)),
    "vit": ("vit_tiny_patch16_224", dict(patch_size=8, embed_dim=96, depth=4, num_heads=3, img_size=64)),
}


# ------------------------------------------------------------------------------------------------------ data
def shapes_batch(batch: int, g: torch.Generator, size: int = 64) -> tuple[Tensor, Tensor]:
    """(images (B, 3, size, size) in [0, 1] then standardised, masks (B, size, size) of class indices)."""
    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")  # (S, S) each
    images = torch.rand(batch, 3, 1, 1, generator=g) * 0.5 + 0.1 * torch.randn(batch, 3, size, size, generator=g)
    masks = torch.zeros(batch, size, size, dtype=torch.long)
    for b in range(batch):
        count = int(torch.randint(1, 4, (1,), generator=g))
        for _ in range(count):
            kind = int(torch.randint(1, 4, (1,), generator=g))
            r = float(torch.empty(1).uniform_(6, 14, generator=g))
            cy, cx = (float(torch.empty(1).uniform_(r, size - r, generator=g)) for _ in range(2))
            if kind == 1:  # disc
                inside = (ys - cy) ** 2 + (xs - cx) ** 2 <= r * r
            elif kind == 2:  # axis-aligned square of half-side r
                inside = ((ys - cy).abs() <= r) & ((xs - cx).abs() <= r)
            else:  # upward triangle inscribed in the circle of radius r
                top, base = cy - r, cy + r / 2
                half = (ys - top) / (base - top) * r * math.sqrt(3) / 2
                inside = (ys >= top) & (ys <= base) & ((xs - cx).abs() <= half)
            colour = torch.rand(3, 1, generator=g)
            images[b][:, inside] = colour.expand(3, int(inside.sum())) + 0.05 * torch.randn(
                3, int(inside.sum()), generator=g)
            masks[b][inside] = kind
    images = (images.clamp(0, 1) - 0.5) / 0.25
    return images, masks


# ------------------------------------------------------------------------------------------------------ model
class PyramidHead(nn.Module):
    """Lateral 1×1 convs to ``width`` channels, top-down: each coarser map upsampled (bilinear) and added to the
    next finer one, a 3×3 conv, then 1×1 class scores upsampled to the input."""

    def __init__(self, in_channels: list[int], width: int, num_classes: int):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, width, 1) for c in in_channels)
        self.smooth = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.classify = nn.Conv2d(width, num_classes, 1)

    def forward(self, maps: list[Tensor], out_hw: tuple[int, int]) -> Tensor:
        x = self.lateral[-1](maps[-1])
        for lateral, m in zip(reversed(self.lateral[:-1]), reversed(maps[:-1])):
            x = lateral(m) + F.interpolate(x, size=m.shape[-2:], mode="bilinear", align_corners=False)
        scores = self.classify(self.smooth(x))  # (B, K, h, w) at the finest map
        return F.interpolate(scores, size=out_hw, mode="bilinear", align_corners=False)  # (B, K, H, W)


class Segmenter(nn.Module):
    def __init__(self, backbone: nn.Module, num_classes: int, width: int = 64):
        super().__init__()
        self.backbone = backbone
        self.head = PyramidHead([f["num_chs"] for f in backbone.feature_info], width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x), x.shape[-2:])


def build(backbone: str) -> Segmenter:
    name, overrides = BACKBONES[backbone]
    return Segmenter(vitkit.create_model(name, features_only=True, **overrides), len(CLASSES))


# ---------------------------------------------------------------------------------------------- train / measure
@dataclass
class Result:
    backbone: str
    steps: int
    seconds: float
    pixel_accuracy: float
    mean_iou: float

    def line(self) -> str:
        return (f"{self.backbone}: {self.steps} steps in {self.seconds:.0f} s, pixel accuracy "
                f"{self.pixel_accuracy:.1%}, mIoU {self.mean_iou:.1%} ({len(CLASSES)} classes)")


def evaluate(model: Segmenter, images: Tensor, masks: Tensor) -> tuple[float, float]:
    """(pixel accuracy, mean IoU over the classes present) of the model's argmax on a fixed set."""
    model.eval()
    with torch.no_grad():
        pred = model(images).argmax(1)  # (N, H, W)
    return scores(pred, masks)


def scores(pred: Tensor, masks: Tensor) -> tuple[float, float]:
    """(pixel accuracy, mean IoU over the classes present in either) of predicted class maps."""
    ious = []
    for k in range(len(CLASSES)):
        union = ((pred == k) | (masks == k)).sum()
        if union > 0:
            ious.append(float(((pred == k) & (masks == k)).sum() / union))
    return float((pred == masks).float().mean()), sum(ious) / len(ious)


def held_out(seed: int = 0) -> tuple[Tensor, Tensor]:
    """The 64 evaluation images and masks (never trained on: another generator than the training batches')."""
    return shapes_batch(64, torch.Generator().manual_seed(10_000 + seed))


def train(backbone: str, steps: int | None = None, minutes: float | None = None, batch: int = 16,
          lr: float = 1e-3, seed: int = 0) -> Result:
    """Train ``backbone`` + head with AdamW for ``steps`` (or until ``minutes`` pass) on fresh synthetic batches;
    evaluate on 64 held-out images."""
    torch.manual_seed(seed)
    model = build(backbone)
    test_images, test_masks = held_out(seed)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    start, step = time.perf_counter(), 0
    while (steps is None or step < steps) and (minutes is None or time.perf_counter() - start < minutes * 60):
        model.train()
        images, masks = shapes_batch(batch, g)
        loss = F.cross_entropy(model(images), masks)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
    seconds = time.perf_counter() - start
    return Result(backbone, step, seconds, *evaluate(model, test_images, test_masks))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", choices=sorted(BACKBONES), nargs="+", default=sorted(BACKBONES))
    parser.add_argument("--minutes", type=float, default=3.0, help="training time per backbone")
    args = parser.parse_args(argv)
    for backbone in args.backbone:
        print(train(backbone, minutes=args.minutes).line(), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
