"""RandAugment against timm's ``rand-m9-mstd0.5-inc1`` (DeiT's default), from timm's source: the op list, the
magnitude → argument mapping of every op, and the magnitude noise. timm cannot be imported here (it needs
torchvision), so the expected values are written out below from

    huggingface/pytorch-image-models @ aa4b5850c1543fa488abf260f18390eda46cf85d, timm/data/auto_augment.py:
    _RAND_TRANSFORMS / _RAND_INCREASING_TRANSFORMS (op lists), LEVEL_TO_ARG and the *_level_to_arg functions
    (mapping, _LEVEL_DENOM = 10), AugmentOp.__call__ (p, magnitude noise and clipping), RandAugment.__call__
    (np.random.choice of num_layers ops, with replacement), rand_augment_transform (config parsing);
    timm/data/transforms_factory.py: img_mean = round(255 * mean) as the fill colour of the geometric ops.
"""
from __future__ import annotations

import statistics
from collections import Counter

import pytest
import torch

import vitkit.data.auto_augment as aa
import vitkit.data.functional as Fn
from vitkit.data import AugmentConfig, DataConfig, RandAugment, build_train_transform, parse_rand_augment

# timm's op lists, in timm's order (RandAugment draws an index into this list)
TIMM_RAND_TRANSFORMS = ["AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd",
                        "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel",
                        "TranslateYRel"]
TIMM_RAND_INCREASING_TRANSFORMS = ["AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing",
                                   "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing",
                                   "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY",
                                   "TranslateXRel", "TranslateYRel"]


def timm_level_to_arg(name: str, m: float) -> tuple[float | int | None, bool]:
    """timm's LEVEL_TO_ARG: (argument before the random sign, whether _randomly_negate applies)."""
    level = m / 10.0
    table = {
        "AutoContrast": (None, False), "Equalize": (None, False), "Invert": (None, False),
        "Rotate": (level * 30.0, True),
        "Posterize": (int(level * 4), False),
        "PosterizeIncreasing": (4 - int(level * 4), False),
        "Solarize": (min(256, int(level * 256)), False),
        "SolarizeIncreasing": (256 - min(256, int(level * 256)), False),
        "SolarizeAdd": (min(128, int(level * 110)), False),
        "ShearX": (level * 0.3, True), "ShearY": (level * 0.3, True),
        "TranslateXRel": (level * 0.45, True), "TranslateYRel": (level * 0.45, True),
    }
    for enhance in ("Color", "Contrast", "Brightness", "Sharpness"):
        table[enhance] = (level * 1.8 + 0.1, False)
        table[enhance + "Increasing"] = (level * 0.9, True)  # then max(0.1, 1.0 + signed value)
    return table[name]


ENHANCE = {"Color": Fn.adjust_color, "Contrast": Fn.adjust_contrast, "Brightness": Fn.adjust_brightness,
           "Sharpness": Fn.adjust_sharpness}


def timm_apply(name: str, x: torch.Tensor, arg, fill) -> torch.Tensor:
    """timm's op ``name`` with its argument, on vitkit's PIL-equivalent primitives (tests/test_data_transforms.py
    checks those against PIL)."""
    base = name.replace("Increasing", "")
    H, W = x.shape[-2:]
    warp = {"Rotate": lambda: Fn.rotation_matrix(arg, H, W),
            "ShearX": lambda: (1.0, arg, 0.0, 0.0, 1.0, 0.0), "ShearY": lambda: (1.0, 0.0, 0.0, arg, 1.0, 0.0),
            "TranslateXRel": lambda: (1.0, 0.0, arg * W, 0.0, 1.0, 0.0),
            "TranslateYRel": lambda: (1.0, 0.0, 0.0, 0.0, 1.0, arg * H)}
    if base in warp:
        return Fn.affine(x, warp[base](), fill, "bilinear")
    if base in ENHANCE:
        factor = max(0.1, 1.0 + arg) if name.endswith("Increasing") else arg
        return ENHANCE[base](x, factor)
    other = {"AutoContrast": lambda: Fn.autocontrast(x), "Equalize": lambda: Fn.equalize(x),
             "Invert": lambda: Fn.invert(x), "Posterize": lambda: Fn.posterize(x, arg),
             "Solarize": lambda: Fn.solarize(x, arg), "SolarizeAdd": lambda: Fn.solarize_add(x, arg, threshold=128)}
    return other[base]()


def _image(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (3, 20, 24), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_op_lists_are_timms():
    inc, plain = RandAugment(parse_rand_augment("rand-m9-mstd0.5-inc1")), RandAugment(parse_rand_augment("rand-m9"))
    assert inc.names == [n.replace("Increasing", "") for n in TIMM_RAND_INCREASING_TRANSFORMS]
    assert plain.names == TIMM_RAND_TRANSFORMS
    increasing = {n.replace("Increasing", "") for n in TIMM_RAND_INCREASING_TRANSFORMS if n.endswith("Increasing")}
    assert {n for n in aa.RAND_OPS if aa.RAND_INCREASING_OPS[n] is not aa.RAND_OPS[n]} == increasing
    spec = parse_rand_augment("rand-m9-mstd0.5-inc1")  # timm: magnitude 9, 2 layers, p 0.5, mstd 0.5, mmax 10
    assert (spec.magnitude, spec.num_ops, spec.prob, spec.magnitude_std, spec.magnitude_max, spec.increasing) == \
        (9, 2, 0.5, 0.5, 10, True)


@pytest.mark.parametrize("increasing", [True, False], ids=["inc1", "inc0"])
@pytest.mark.parametrize("m", [0.0, 2.5, 5.0, 7.3, 9.0, 9.6, 10.0, 13.0, 15.0])
def test_every_op_maps_the_magnitude_as_timm_does(increasing, m):
    """Magnitudes above 10 occur with mmax > 10 (e.g. rand-m9-mmax15): timm clips SolarizeAdd to 128 and Solarize
    to 256 there."""
    ctx = aa.OpContext(fill=(124.0, 116.0, 104.0))
    table = aa.RAND_INCREASING_OPS if increasing else aa.RAND_OPS
    names = TIMM_RAND_INCREASING_TRANSFORMS if increasing else TIMM_RAND_TRANSFORMS
    x = _image()
    for timm_name in names:
        ours = table[timm_name.replace("Increasing", "")]
        arg, signed = timm_level_to_arg(timm_name, m)
        if timm_name == "PosterizeIncreasing" and arg < 0:
            continue  # m > 10: timm passes PIL a negative bit count (undefined there)
        signs = set()
        for seed in range(8):
            out = ours(x, m, ctx, torch.Generator().manual_seed(seed))
            candidates = {1: timm_apply(timm_name, x, arg, ctx.fill)}
            if signed:
                candidates[-1] = timm_apply(timm_name, x, -arg, ctx.fill)
            matched = [s for s, ref in candidates.items() if torch.equal(out, ref)]
            assert matched, f"{timm_name} at m={m}: not timm's argument {arg} (either sign)"
            signs.update(matched)
        if signed and arg:
            assert signs == {1, -1}, f"{timm_name}: the sign is not random"


def test_magnitude_noise_and_op_choice_of_rand_m9_mstd05_inc1(monkeypatch):
    """Every op replaced by a recorder: per image, 2 ops drawn uniformly with replacement, each applied with p 0.5,
    each applied op with its own magnitude ~ N(9, 0.5) clipped to [0, 10] (timm's AugmentOp.__call__)."""
    applied: list[list[tuple[str, float]]] = []

    def recorder(name):
        def op(x, m, ctx, g):
            applied[-1].append((name, m))
            return x
        return op

    monkeypatch.setattr(aa, "RAND_INCREASING_OPS", {n: recorder(n) for n in aa.RAND_OPS})
    ra = RandAugment(parse_rand_augment("rand-m9-mstd0.5-inc1"))
    x, n = _image(), 4000
    for seed in range(n):
        applied.append([])
        ra(x, torch.Generator().manual_seed(seed))
    per_image = Counter(len(a) for a in applied)
    for k, p in ((0, 0.25), (1, 0.5), (2, 0.25)):  # Binomial(2, 0.5); 3 sigma is about 0.02
        assert abs(per_image[k] / n - p) < 0.03, per_image
    names = Counter(name for a in applied for name, _ in a)
    total = sum(names.values())
    assert set(names) == set(aa.RAND_OPS) and max(abs(c / total - 1 / 15) for c in names.values()) < 0.02, names
    pairs = [a for a in applied if len(a) == 2]
    repeats = sum(a[0][0] == a[1][0] for a in pairs) / len(pairs)
    assert 0.03 < repeats < 0.11, repeats  # drawn with replacement: the same op twice in 1/15 of the images
    mags = [m for a in applied for _, m in a]
    assert min(mags) >= 0.0 and max(mags) == 10.0  # clipped at mmax 10
    assert abs(sum(m == 10.0 for m in mags) / len(mags) - 0.0228) < 0.01  # P(N(9, 0.5) > 10) = P(Z > 2)
    unclipped = [m for m in mags if m < 10.0]
    assert abs(statistics.mean(mags) - 8.996) < 0.03 and 0.44 < statistics.pstdev(unclipped) < 0.52
    distinct = len({round(m, 9) for m in mags})
    assert distinct > 0.95 * len(mags), f"{distinct} distinct magnitudes for {len(mags)} applied ops"
    same = sum(a[0][1] == a[1][1] for a in pairs)
    assert same == 0, f"{same} of {len(pairs)} images gave both ops the same magnitude (timm draws one per op)"


def test_deit_pipeline_fills_with_the_dataset_mean_as_timm():
    mean = (0.485, 0.456, 0.406)
    tf = build_train_transform(AugmentConfig(auto_augment="rand-m9-mstd0.5-inc1"),
                               DataConfig(name="fake", img_size=32), mean, (0.229, 0.224, 0.225))
    ra = [op for op in tf.transforms if isinstance(op, RandAugment)]
    assert len(ra) == 1 and ra[0].ctx.fill == tuple(min(255, round(255 * v)) for v in mean) == (124, 116, 104)
    assert ra[0].ctx.translate_pct == 0.45
