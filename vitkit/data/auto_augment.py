"""RandAugment (Cubuk et al. 2020) and TrivialAugment (Müller & Hutter 2021) on ``uint8`` tensors ``(3, H, W)``.

Conventions:
- RandAugment follows timm's ``auto_augment.py`` (the DeiT default ``rand-m9-mstd0.5-inc1``): 15 ops (no Cutout;
  random erasing does that job), ``n`` ops drawn *with* replacement, each applied with probability 0.5 (``p``),
  magnitude ``m`` on a 0..10 scale, optionally jittered by a normal with std ``mstd`` (``mstd > 100``: uniform in
  ``[0, m]``) and clipped to ``[0, mmax]`` (10), and the ``inc1`` table of ops whose strength grows with ``m``.
  Translations are relative (``0.45 × m / 10`` of the side). Config strings parse as timm's
  (``rand-m9-n2-mstd0.5-inc1-mmax10-p0.5``), except that ``inc0`` really means off (timm reads ``bool("0")``).
- TrivialAugment follows torchvision's ``TrivialAugmentWide`` op table (14 ops with Identity, 31 magnitude bins,
  absolute translation up to 32 px, rotation up to 135°, shear and enhance factors up to 0.99, posterize 8..2 bits).
- Both use the PIL-style primitives of ``functional.py``: geometric ops warp with bilinear sampling and a fill colour
  (timm passes the dataset mean, ``img_mean``; torchvision's TrivialAugmentWide default would be black, nearest).
- Every random choice comes from the ``torch.Generator`` passed to ``__call__``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch

from . import functional as Fn
from .rng import coin, gauss, randrange, uniform

__all__ = ["RandAugment", "TrivialAugmentWide", "parse_rand_augment", "build_auto_augment", "RAND_OPS",
           "RAND_INCREASING_OPS", "TRIVIAL_OPS"]

_LEVEL_DENOM = 10.0  # timm: magnitude "m9" means 9 / 10 of each op's range


@dataclass(frozen=True)
class OpContext:
    """What the geometric ops need besides the magnitude."""

    fill: tuple[float, float, float] = (128.0, 128.0, 128.0)  # timm's default fill when no mean is given
    interpolation: str = "bilinear"
    translate_pct: float = 0.45  # timm's relative translation range


def _signed(g: torch.Generator, v: float) -> float:
    return -v if coin(g, 0.5) else v  # timm's _randomly_negate


def _warp(x: torch.Tensor, matrix: tuple[float, ...], ctx: OpContext) -> torch.Tensor:
    return Fn.affine(x, matrix, ctx.fill, ctx.interpolation)


# --- RandAugment ops: (image, magnitude in 0..10, context, generator) -> image -------------------------------------

def _rotate(x, m, ctx, g):
    deg = _signed(g, m / _LEVEL_DENOM * 30.0)  # [-30, 30] degrees
    return _warp(x, Fn.rotation_matrix(deg, x.shape[-2], x.shape[-1]), ctx)


def _shear_x(x, m, ctx, g):
    return _warp(x, (1.0, _signed(g, m / _LEVEL_DENOM * 0.3), 0.0, 0.0, 1.0, 0.0), ctx)


def _shear_y(x, m, ctx, g):
    return _warp(x, (1.0, 0.0, 0.0, _signed(g, m / _LEVEL_DENOM * 0.3), 1.0, 0.0), ctx)


def _translate_x_rel(x, m, ctx, g):
    px = _signed(g, m / _LEVEL_DENOM * ctx.translate_pct) * x.shape[-1]
    return _warp(x, (1.0, 0.0, px, 0.0, 1.0, 0.0), ctx)


def _translate_y_rel(x, m, ctx, g):
    px = _signed(g, m / _LEVEL_DENOM * ctx.translate_pct) * x.shape[-2]
    return _warp(x, (1.0, 0.0, 0.0, 0.0, 1.0, px), ctx)


def _enhance(fn: Callable[[torch.Tensor, float], torch.Tensor], increasing: bool):
    def op(x, m, ctx, g):
        if increasing:  # 1.0 is "no change"; larger m moves further towards 0.1 or 1.9
            factor = max(0.1, 1.0 + _signed(g, m / _LEVEL_DENOM * 0.9))
        else:  # [0.1, 1.9], m = 5 is roughly the identity
            factor = m / _LEVEL_DENOM * 1.8 + 0.1
        return fn(x, factor)
    return op


def _posterize(increasing: bool):
    def op(x, m, ctx, g):
        bits = int(m / _LEVEL_DENOM * 4)  # TF EfficientNet: keep 0..4 bits, milder as m grows
        return Fn.posterize(x, 4 - bits if increasing else bits)
    return op


def _solarize(increasing: bool):
    def op(x, m, ctx, g):
        thresh = min(256, int(m / _LEVEL_DENOM * 256))  # [0, 256] (timm clips m > 10), milder as m grows
        return Fn.solarize(x, 256 - thresh if increasing else thresh)
    return op


def _solarize_add(x, m, ctx, g):
    return Fn.solarize_add(x, min(128, int(m / _LEVEL_DENOM * 110)), threshold=128)  # timm clips m > 10


def _no_arg(fn):
    return lambda x, m, ctx, g: fn(x)


RAND_OPS = {
    "AutoContrast": _no_arg(Fn.autocontrast),
    "Equalize": _no_arg(Fn.equalize),
    "Invert": _no_arg(Fn.invert),
    "Rotate": _rotate,
    "Posterize": _posterize(False),
    "Solarize": _solarize(False),
    "SolarizeAdd": _solarize_add,
    "Color": _enhance(Fn.adjust_color, False),
    "Contrast": _enhance(Fn.adjust_contrast, False),
    "Brightness": _enhance(Fn.adjust_brightness, False),
    "Sharpness": _enhance(Fn.adjust_sharpness, False),
    "ShearX": _shear_x,
    "ShearY": _shear_y,
    "TranslateXRel": _translate_x_rel,
    "TranslateYRel": _translate_y_rel,
}

# timm's _RAND_INCREASING_TRANSFORMS: same positions, severity grows with magnitude
RAND_INCREASING_OPS = dict(RAND_OPS)
RAND_INCREASING_OPS.update({
    "Posterize": _posterize(True),
    "Solarize": _solarize(True),
    "Color": _enhance(Fn.adjust_color, True),
    "Contrast": _enhance(Fn.adjust_contrast, True),
    "Brightness": _enhance(Fn.adjust_brightness, True),
    "Sharpness": _enhance(Fn.adjust_sharpness, True),
})


@dataclass(frozen=True)
class RandAugmentSpec:
    """A parsed ``rand-...`` string."""

    num_ops: int = 2
    magnitude: float = 10.0  # timm's default when no "m" is given
    magnitude_std: float = 0.0
    magnitude_max: float = _LEVEL_DENOM
    increasing: bool = False
    prob: float = 0.5


def parse_rand_augment(config: str) -> RandAugmentSpec:
    """Parse a timm RandAugment string such as ``rand-m9-mstd0.5-inc1``; raises ``ValueError`` naming a bad part."""
    parts = config.split("-")
    if parts[0] != "rand":
        raise ValueError(f"RandAugment config must start with 'rand', got {config!r}")
    fields: dict = {}
    for part in parts[1:]:
        match = re.fullmatch(r"([a-z]+)(\d+(?:\.\d*)?)", part)
        if not match:
            raise ValueError(f"bad RandAugment config part {part!r} in {config!r}")
        key, val = match.group(1), float(match.group(2))
        if key == "m":
            fields["magnitude"] = val
        elif key == "n":
            fields["num_ops"] = int(val)
        elif key == "mstd":
            fields["magnitude_std"] = float("inf") if val > 100 else val
        elif key == "mmax":
            fields["magnitude_max"] = val
        elif key == "inc":
            fields["increasing"] = bool(int(val))
        elif key == "p":
            fields["prob"] = val
        else:
            raise ValueError(f"unknown RandAugment key {key!r} in {config!r} (known: m, n, mstd, mmax, inc, p)")
    return RandAugmentSpec(**fields)


class RandAugment:
    """timm-flavoured RandAugment; ``__call__(uint8 (3, H, W), generator) -> uint8 (3, H, W)``."""

    def __init__(self, spec: RandAugmentSpec, ctx: OpContext = OpContext()):
        self.spec = spec
        self.ctx = ctx
        self.names = list(RAND_OPS)  # names, not closures, so the transform pickles into spawned workers

    def _magnitude(self, g: torch.Generator) -> float:
        m, std = self.spec.magnitude, self.spec.magnitude_std
        if std == float("inf"):
            m = uniform(g, 0.0, m)
        elif std > 0:
            m = gauss(g, m, std)
        return max(0.0, min(m, self.spec.magnitude_max))

    def __call__(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        table = RAND_INCREASING_OPS if self.spec.increasing else RAND_OPS
        chosen = [self.names[randrange(g, 0, len(self.names))] for _ in range(self.spec.num_ops)]  # with replacement
        for name in chosen:
            if coin(g, self.spec.prob):
                x = table[name](x, self._magnitude(g), self.ctx, g)
        return x

    def __repr__(self) -> str:
        return f"RandAugment({self.spec})"


# --- TrivialAugmentWide ---------------------------------------------------------------------------------------------

def _ta_table(bins: int) -> dict[str, tuple[list[float], bool]]:
    """torchvision's TrivialAugmentWide space: op -> (magnitude per bin, signed)."""
    def lin(lo, hi):
        return [lo + (hi - lo) * i / (bins - 1) for i in range(bins)]
    return {
        "Identity": ([0.0], False),
        "ShearX": (lin(0.0, 0.99), True),
        "ShearY": (lin(0.0, 0.99), True),
        "TranslateX": (lin(0.0, 32.0), True),
        "TranslateY": (lin(0.0, 32.0), True),
        "Rotate": (lin(0.0, 135.0), True),
        "Brightness": (lin(0.0, 0.99), True),
        "Color": (lin(0.0, 0.99), True),
        "Contrast": (lin(0.0, 0.99), True),
        "Sharpness": (lin(0.0, 0.99), True),
        "Posterize": ([8 - round(i / ((bins - 1) / 6)) for i in range(bins)], False),
        "Solarize": (lin(255.0, 0.0), False),
        "AutoContrast": ([0.0], False),
        "Equalize": ([0.0], False),
    }


TRIVIAL_OPS = tuple(_ta_table(31))


def _apply_trivial(x: torch.Tensor, name: str, v: float, ctx: OpContext) -> torch.Tensor:
    H, W = x.shape[-2:]
    geometric = {
        "ShearX": (1.0, v, 0.0, 0.0, 1.0, 0.0),
        "ShearY": (1.0, 0.0, 0.0, v, 1.0, 0.0),
        "TranslateX": (1.0, 0.0, float(int(v)), 0.0, 1.0, 0.0),
        "TranslateY": (1.0, 0.0, 0.0, 0.0, 1.0, float(int(v))),
    }
    if name in geometric:
        return _warp(x, geometric[name], ctx)
    if name == "Rotate":
        return _warp(x, Fn.rotation_matrix(v, H, W), ctx)
    enhance = {"Brightness": Fn.adjust_brightness, "Color": Fn.adjust_color, "Contrast": Fn.adjust_contrast,
               "Sharpness": Fn.adjust_sharpness}
    if name in enhance:
        return enhance[name](x, 1.0 + v)
    if name == "Posterize":
        return Fn.posterize(x, int(v))
    if name == "Solarize":
        return Fn.solarize(x, v)
    if name == "AutoContrast":
        return Fn.autocontrast(x)
    if name == "Equalize":
        return Fn.equalize(x)
    return x  # Identity


class TrivialAugmentWide:
    """One op chosen uniformly, one magnitude bin chosen uniformly, a random sign for signed ops."""

    def __init__(self, ctx: OpContext = OpContext(), num_bins: int = 31):
        self.ctx = ctx
        self.table = list(_ta_table(num_bins).items())

    def __call__(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        name, (values, signed) = self.table[randrange(g, 0, len(self.table))]
        v = values[randrange(g, 0, len(values))]
        if signed and coin(g, 0.5):
            v = -v
        return _apply_trivial(x, name, v, self.ctx)

    def __repr__(self) -> str:
        return f"TrivialAugmentWide(bins={len(self.table[1][1][0])})"


def build_auto_augment(name: str, ctx: OpContext = OpContext()):
    """``'rand-...'`` → ``RandAugment``; ``'trivial'`` → ``TrivialAugmentWide``; raises ``ValueError`` otherwise."""
    if name == "trivial":
        return TrivialAugmentWide(ctx)
    if name.startswith("rand"):
        return RandAugment(parse_rand_augment(name), ctx)
    raise ValueError(f"unknown auto_augment {name!r}: use 'rand-m9-mstd0.5-inc1'-style strings or 'trivial'")
