"""Training and evaluation transforms: ``transform(uint8 (3, H, W), generator) -> float32 (3, H, W)``, normalised.

Conventions:
- Random-resized crop follows the Inception / timm ``RandomResizedCropAndInterpolation`` recipe: 10 tries at an
  area fraction in ``scale`` and a log-uniform aspect ratio in ``ratio``, then a centre crop clamped to ``ratio``.
- Random crop with padding is the CIFAR standard (He et al. 2016): pad 4 px with **zeros** (torchvision
  ``RandomCrop(32, padding=4)``'s default; ``padding_mode='reflect'`` is available), then crop at a random offset.
- Eval resize + centre crop follows timm's ``crop_pct``: resize the shorter side to ``floor(img_size / crop_pct)``,
  then centre-crop ``img_size``.
- Random erasing follows timm's ``RandomErasing`` (Zhong et al. 2020) in ``mode='pixel'``: applied after
  normalisation, per-pixel N(0, 1) values, area 2%..1/3, aspect 0.3..3.3; DeiT uses probability 0.25.
- Train order is timm's ``transforms_factory``: crop → flip → auto-augment (uint8) → normalise → erase.

Why own code rather than kornia (measured with ``python -m vitkit.data.bench --augment``; numbers in
``vitkit/data/README.md``): kornia 0.9 draws every random parameter from torch's *global* generator (its docs say
there is no per-instance generator, and ``generator=`` is refused), so per-sample, worker-independent, resumable
augmentation would need ``fork_rng`` + reseeding around every call; its RandAugment is not timm's flavour (no
``mstd``/``inc``, ops without replacement, no per-op probability 0.5). Speed does not argue for kornia either: in one
thread (a DataLoader worker) this per-sample code ran 15-20× faster than kornia per sample at 32 px and 3-6× at
224 px; kornia's batched path was faster at 32 px (about 1-2.4×) and 3-4× slower at 224 px.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from torch.utils.data import Dataset

from ..config import ConfigError
from . import functional as Fn
from .auto_augment import OpContext, build_auto_augment
from .mixup import MixupCutmix
from .rng import coin, log_uniform, randrange, sample_generator, uniform
from .splits import DataConfig

__all__ = [
    "Transform", "Compose", "RandomResizedCrop", "RandomCropPad", "RandomHorizontalFlip", "Resize",
    "ResizeCenterCrop", "Normalize", "ToBGR", "RandomErasing", "AugmentConfig", "build_train_transform",
    "build_eval_transform", "build_mixup", "TransformDataset",
]


class Transform(Protocol):
    def __call__(self, x: torch.Tensor, g: torch.Generator | None) -> torch.Tensor: ...


class Compose:
    """Apply transforms in order, passing the same generator to each."""

    def __init__(self, transforms: list):
        self.transforms = list(transforms)

    def __call__(self, x: torch.Tensor, g: torch.Generator | None = None) -> torch.Tensor:
        for t in self.transforms:
            x = t(x, g)
        return x

    def __repr__(self) -> str:
        return "Compose(\n" + "".join(f"  {t!r},\n" for t in self.transforms) + ")"


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


class RandomResizedCrop:
    """Inception crop: random area and aspect ratio, resized to ``size``."""

    def __init__(self, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), interpolation: str = "bilinear"):
        self.size, self.scale, self.ratio, self.interpolation = _pair(size), scale, ratio, interpolation

    def params(self, H: int, W: int, g: torch.Generator) -> tuple[int, int, int, int]:
        """``(top, left, height, width)`` of the crop."""
        area = H * W
        for _ in range(10):
            target = area * uniform(g, *self.scale)
            aspect = log_uniform(g, *self.ratio)
            w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
            if 0 < w <= W and 0 < h <= H:
                return randrange(g, 0, H - h + 1), randrange(g, 0, W - w + 1), h, w
        return self._fallback(H, W)

    def _fallback(self, H: int, W: int) -> tuple[int, int, int, int]:
        in_ratio = W / H
        if in_ratio < min(self.ratio):
            w, h = W, int(round(W / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            w, h = int(round(H * max(self.ratio))), H
        else:
            w, h = W, H
        return (H - h) // 2, (W - w) // 2, h, w

    def __call__(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        top, left, h, w = self.params(x.shape[-2], x.shape[-1], g)
        return Fn.resize(Fn.crop(x, top, left, h, w), self.size, self.interpolation)

    def __repr__(self) -> str:
        return f"RandomResizedCrop(size={self.size}, scale={self.scale}, ratio={self.ratio})"


class RandomCropPad:
    """Pad by ``padding`` then take a random ``size`` crop (the CIFAR standard)."""

    def __init__(self, size, padding: int = 4, mode: str = "constant"):
        self.size, self.padding, self.mode = _pair(size), padding, mode

    def __call__(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        x = Fn.pad(x, self.padding, self.mode)  # (C, H + 2p, W + 2p)
        (h, w), (H, W) = self.size, x.shape[-2:]
        if h > H or w > W:
            raise ValueError(f"RandomCropPad: crop {h}x{w} is larger than the padded image {H}x{W}")
        return Fn.crop(x, randrange(g, 0, H - h + 1), randrange(g, 0, W - w + 1), h, w)

    def __repr__(self) -> str:
        return f"RandomCropPad(size={self.size}, padding={self.padding}, mode={self.mode!r})"


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        return Fn.hflip(x) if coin(g, self.p) else x

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class Resize:
    """Resize the shorter side to ``size`` (an int) or the whole image to ``(h, w)``."""

    def __init__(self, size: int | tuple[int, int], interpolation: str = "bilinear"):
        self.size, self.interpolation = size, interpolation

    def __call__(self, x: torch.Tensor, g: torch.Generator | None = None) -> torch.Tensor:
        if isinstance(self.size, int):
            return Fn.resize_shorter(x, self.size, self.interpolation)
        return Fn.resize(x, _pair(self.size), self.interpolation)

    def __repr__(self) -> str:
        return f"Resize({self.size}, {self.interpolation})"


class ResizeCenterCrop:
    """timm eval: shorter side to ``floor(img_size / crop_pct)`` (``crop_mode='squash'``: both sides, aspect not
    kept, timm's squash mode), then centre-crop ``img_size``."""

    def __init__(self, img_size: int, crop_pct: float = 1.0, interpolation: str = "bicubic",
                 crop_mode: str = "center"):
        self.img_size, self.crop_pct, self.interpolation, self.crop_mode = img_size, crop_pct, interpolation, crop_mode
        self.scale_size = math.floor(img_size / crop_pct)

    def __call__(self, x: torch.Tensor, g: torch.Generator | None = None) -> torch.Tensor:
        if self.crop_mode == "squash":
            x = Fn.resize(x, (self.scale_size, self.scale_size), self.interpolation)
        else:
            x = Fn.resize_shorter(x, self.scale_size, self.interpolation)
        return Fn.center_crop(x, self.img_size, self.img_size)

    def __repr__(self) -> str:
        return f"ResizeCenterCrop({self.img_size}, crop_pct={self.crop_pct}, {self.crop_mode}, {self.interpolation})"


class Normalize:
    """``uint8`` → float32 ``(x / 255 - mean) / std``."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, x: torch.Tensor, g: torch.Generator | None = None) -> torch.Tensor:
        return Fn.normalize(x, self.mean, self.std)

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean}, std={self.std})"


class RandomErasing:
    """timm ``RandomErasing`` on one normalised float image ``(C, H, W)``; returns a new tensor."""

    def __init__(self, prob: float = 0.25, min_area: float = 0.02, max_area: float = 1 / 3,
                 min_aspect: float = 0.3, max_aspect: float | None = None, mode: str = "pixel", count: int = 1):
        self.prob, self.min_area, self.max_area, self.mode, self.count = prob, min_area, max_area, mode, count
        self.aspect = (min_aspect, max_aspect or 1 / min_aspect)

    def _values(self, shape: tuple[int, int, int], g: torch.Generator) -> torch.Tensor:
        if self.mode == "pixel":
            return torch.randn(shape, generator=g)  # (C, h, w)
        if self.mode == "rand":
            return torch.randn((shape[0], 1, 1), generator=g)  # (C, 1, 1)
        return torch.zeros((shape[0], 1, 1))

    def __call__(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        if not coin(g, self.prob):
            return x
        x = x.clone()
        C, H, W = x.shape
        count = self.count if self.count <= 1 else randrange(g, 1, self.count + 1)
        for _ in range(count):
            for _attempt in range(10):
                target = uniform(g, self.min_area, self.max_area) * H * W / count
                aspect = log_uniform(g, *self.aspect)
                h, w = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
                if w < W and h < H:
                    top, left = randrange(g, 0, H - h + 1), randrange(g, 0, W - w + 1)
                    x[:, top:top + h, left:left + w] = self._values((C, h, w), g).to(x)
                    break
        return x

    def __repr__(self) -> str:
        return f"RandomErasing(p={self.prob}, mode={self.mode!r})"


@dataclass
class AugmentConfig:
    """The recipe's ``augment:`` section. Defaults are the CIFAR standard (pad-4 crop + flip), nothing else;
    DeiT's recipe is ``random_resized_crop: true, crop_padding: 0, auto_augment: rand-m9-mstd0.5-inc1,
    random_erasing: 0.25, mixup: 0.8, cutmix: 1.0, label_smoothing: 0.1``."""

    random_resized_crop: bool = False
    scale: tuple[float, float] = (0.08, 1.0)  # Inception / timm
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    crop_padding: int = 4  # 0 = off; must be 0 when random_resized_crop is on
    padding_mode: Literal["constant", "reflect"] = "constant"  # zeros, torchvision RandomCrop's default
    hflip: float = 0.5
    auto_augment: str | None = None  # 'rand-m9-mstd0.5-inc1', 'rand-m9-n2', 'trivial' or None
    random_erasing: float = 0.0  # probability; DeiT 0.25
    mixup: float = 0.0  # Beta alpha; DeiT 0.8
    cutmix: float = 0.0  # Beta alpha; DeiT 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    label_smoothing: float = 0.0  # DeiT 0.1

    def validate(self) -> None:
        lo, hi = self.scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ConfigError(f"augment.scale: need 0 < min <= max <= 1, got {self.scale}")
        if not 0.0 < self.ratio[0] <= self.ratio[1]:
            raise ConfigError(f"augment.ratio: need 0 < min <= max, got {self.ratio}")
        if self.crop_padding < 0:
            raise ConfigError(f"augment.crop_padding: must be >= 0, got {self.crop_padding}")
        if self.random_resized_crop and self.crop_padding:
            raise ConfigError("augment: random_resized_crop and crop_padding exclude each other; set crop_padding: 0")
        for name in ("hflip", "random_erasing", "mixup_prob", "mixup_switch_prob"):
            _check_unit(f"augment.{name}", getattr(self, name))
        if self.mixup < 0 or self.cutmix < 0:
            raise ConfigError(f"augment.mixup/cutmix: alphas must be >= 0, got {self.mixup}, {self.cutmix}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"augment.label_smoothing: must be in [0, 1), got {self.label_smoothing}")
        if self.auto_augment is not None:
            try:
                build_auto_augment(self.auto_augment)
            except ValueError as e:
                raise ConfigError(f"augment.auto_augment: {e}") from None

    @property
    def mixup_active(self) -> bool:
        return (self.mixup > 0 or self.cutmix > 0) and self.mixup_prob > 0


def _check_unit(where: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{where}: must be a probability in [0, 1], got {value}")


def _fill(mean: tuple[float, ...]) -> tuple[float, float, float]:
    return tuple(float(min(255, round(255 * m))) for m in mean)  # timm's img_mean for the geometric ops


class ToBGR:
    """(3, H, W) R, G, B → B, G, R, for weights trained on OpenCV-read images (MobileViT's ``channel_order``)."""

    def __call__(self, x: torch.Tensor, g: torch.Generator | None = None) -> torch.Tensor:
        return x.flip(-3)

    def __repr__(self) -> str:
        return "ToBGR()"


def _in_model_order(channel_order: str) -> list:
    if channel_order not in ("RGB", "BGR"):
        raise ConfigError(f"channel_order must be 'RGB' or 'BGR', got {channel_order!r}")
    return [ToBGR()] if channel_order == "BGR" else []


def build_train_transform(aug: AugmentConfig, data_cfg: DataConfig, mean: tuple[float, ...],
                          std: tuple[float, ...], *, channel_order: str = "RGB") -> Compose:
    """crop → flip → auto-augment → normalise → erase, at ``data_cfg.img_size``; mean/std on the 0..1 scale, in the
    model's ``channel_order`` (BGR: the channels are swapped just before normalising)."""
    size, interp = data_cfg.img_size, data_cfg.interpolation
    if aug.random_resized_crop:
        ops: list = [RandomResizedCrop(size, aug.scale, aug.ratio, interp)]
    else:
        ops = [Resize(size, interp), RandomCropPad(size, aug.crop_padding, aug.padding_mode)]
    if aug.hflip > 0:
        ops.append(RandomHorizontalFlip(aug.hflip))
    if aug.auto_augment:
        rgb_mean = mean[::-1] if channel_order == "BGR" else mean
        ops.append(build_auto_augment(aug.auto_augment, OpContext(fill=_fill(rgb_mean))))
    ops += _in_model_order(channel_order)
    ops.append(Normalize(mean, std))
    if aug.random_erasing > 0:
        ops.append(RandomErasing(aug.random_erasing, mode="pixel"))
    return Compose(ops)


def build_eval_transform(data_cfg: DataConfig, mean: tuple[float, ...], std: tuple[float, ...], *,
                         channel_order: str = "RGB") -> Compose:
    """timm eval: resize by ``crop_pct`` → centre crop ``img_size`` → (BGR: swap the channels) → normalise."""
    return Compose([ResizeCenterCrop(data_cfg.img_size, data_cfg.crop_pct, data_cfg.interpolation, data_cfg.crop_mode),
                    *_in_model_order(channel_order), Normalize(mean, std)])


def build_mixup(aug: AugmentConfig, num_classes: int) -> MixupCutmix | None:
    """The batch-level Mixup/CutMix of ``aug``, or ``None`` when both alphas (or ``mixup_prob``) are 0; the loss is
    then ``F.cross_entropy(label_smoothing=aug.label_smoothing)``."""
    if not aug.mixup_active:
        return None
    return MixupCutmix(aug.mixup, aug.cutmix, aug.mixup_prob, aug.mixup_switch_prob, aug.label_smoothing, num_classes)


class TransformDataset(Dataset):
    """Apply ``transform(img, sample_generator(seed, epoch, index))`` to ``base[index]``; ``None`` items pass through.

    The epoch comes from ``set_epoch`` (call it before creating each epoch's DataLoader iterator; with
    ``persistent_workers=True`` the workers keep their copy, so index with ``(index, epoch)`` tuples instead).
    """

    def __init__(self, base, transform, seed: int = 0):
        self.base, self.transform, self.seed, self.epoch = base, transform, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: int | tuple[int, int]):
        index, epoch = key if isinstance(key, tuple) else (key, self.epoch)
        item = self.base[index]
        if item is None:
            return None
        img, label = item
        return self.transform(img, sample_generator(self.seed, epoch, index)), label

    @property
    def classes(self) -> list[str]:
        return self.base.classes

    @property
    def targets(self):
        return self.base.targets
