"""vitkit.data transforms: PIL parity of the ops, crops, RandAugment / TrivialAugment, random erasing, configs, and
determinism (explicit generators only; the same sample whatever the number of DataLoader workers)."""
import math
import pickle
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps
from torch.utils.data import DataLoader

import vitkit.data.functional as Fn
from vitkit.config import ConfigError, from_dict
from vitkit.data import (AugmentConfig, DataConfig, FakeData, RandAugment, RandomCropPad, RandomErasing,
                         RandomResizedCrop, ResizeCenterCrop, TransformDataset, TrivialAugmentWide,
                         build_eval_transform, build_train_transform, collate_skip_none, measure_loader_throughput,
                         parse_rand_augment, pil_to_tensor, sample_generator)
from vitkit.data.auto_augment import RAND_INCREASING_OPS, RAND_OPS, OpContext, _apply_trivial, _ta_table

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _image(h=17, w=23, seed=0):
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=_gen(seed))


def _pil(x):
    return Image.fromarray(x.permute(1, 2, 0).numpy())


# --- the ops match PIL (what timm's RandAugment runs on) -------------------------------------------------------------

EXACT = {
    "equalize": (Fn.equalize, ImageOps.equalize),
    "autocontrast": (Fn.autocontrast, ImageOps.autocontrast),
    "solarize": (lambda x: Fn.solarize(x, 100), lambda p: ImageOps.solarize(p, 100)),
    "posterize": (lambda x: Fn.posterize(x, 3), lambda p: ImageOps.posterize(p, 3)),
    "invert": (Fn.invert, ImageOps.invert),
    "color": (lambda x: Fn.adjust_color(x, 1.6), lambda p: ImageEnhance.Color(p).enhance(1.6)),
    "contrast": (lambda x: Fn.adjust_contrast(x, 0.3), lambda p: ImageEnhance.Contrast(p).enhance(0.3)),
    "brightness": (lambda x: Fn.adjust_brightness(x, 1.7), lambda p: ImageEnhance.Brightness(p).enhance(1.7)),
    "sharpness": (lambda x: Fn.adjust_sharpness(x, 0.2), lambda p: ImageEnhance.Sharpness(p).enhance(0.2)),
    "shear-nearest": (lambda x: Fn.affine(x, (1, 0.3, 0, 0, 1, 0), (10, 20, 30), "nearest"),
                      lambda p: p.transform(p.size, Image.AFFINE, (1, 0.3, 0, 0, 1, 0), Image.NEAREST,
                                            fillcolor=(10, 20, 30))),
    "rotate-nearest": (lambda x: Fn.affine(x, Fn.rotation_matrix(20, 17, 23), (10, 20, 30), "nearest"),
                       lambda p: p.rotate(20, Image.NEAREST, fillcolor=(10, 20, 30))),
    "translate": (lambda x: Fn.affine(x, (1, 0, 5, 0, 1, -3), (10, 20, 30)),
                  lambda p: p.transform(p.size, Image.AFFINE, (1, 0, 5, 0, 1, -3), Image.BILINEAR,
                                        fillcolor=(10, 20, 30))),
}


@pytest.mark.parametrize("name", sorted(EXACT))
def test_ops_match_pil(name):
    ours, theirs = EXACT[name]
    for x in (_image(), Fn.resize(_image(4, 5, seed=1), (17, 23))):  # noise and a smooth image
        assert torch.equal(ours(x), pil_to_tensor(theirs(_pil(x)))), name


def test_bilinear_warps_and_resize_are_within_one_level_of_pil():
    x, p = _image(), _pil(_image())
    ours = Fn.affine(x, Fn.rotation_matrix(-25, 17, 23), (0, 0, 0), "bilinear")
    theirs = pil_to_tensor(p.rotate(-25, Image.BILINEAR))
    assert (ours.int() - theirs.int()).abs().max() <= 1
    smooth = Fn.resize(_image(12, 16), (60, 80))
    ours = Fn.resize(smooth, (30, 40), "bilinear")
    theirs = pil_to_tensor(_pil(smooth).resize((40, 30), Image.BILINEAR))  # PIL antialiases when downscaling
    assert (ours.int() - theirs.int()).abs().max() <= 1


def test_solarize_add_and_posterize_edges():
    x = torch.tensor([0, 100, 127, 128, 250], dtype=torch.uint8).view(1, 1, 5)
    assert Fn.solarize_add(x, 110).flatten().tolist() == [110, 210, 237, 128, 250]
    assert Fn.posterize(x, 0).sum() == 0 and torch.equal(Fn.posterize(x, 8), x)
    assert torch.equal(Fn.solarize(x, 256), x)


# --- crops ---------------------------------------------------------------------------------------------------------------

def test_random_resized_crop_params_are_inception_like():
    rrc = RandomResizedCrop(32, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3))
    g = _gen()
    for _ in range(200):
        top, left, h, w = rrc.params(40, 60, g)
        assert 0 <= top <= 40 - h and 0 <= left <= 60 - w and h > 0 and w > 0
        assert 0.08 * 2400 * 0.8 <= h * w <= 2400
    assert RandomResizedCrop(8, scale=(1.0, 1.0), ratio=(1.0, 1.0)).params(10, 40, g) == (0, 15, 10, 10)  # fallback
    assert rrc(_image(40, 60), g).shape == (3, 32, 32)


def test_random_crop_with_zero_padding_is_a_window_of_the_padded_image():
    x = _image(32, 32)
    out = RandomCropPad(32, 4)(x, _gen(5))
    g = _gen(5)
    top, left = int(torch.randint(0, 9, (), generator=g)), int(torch.randint(0, 9, (), generator=g))
    padded = torch.zeros(3, 40, 40, dtype=torch.uint8)
    padded[:, 4:36, 4:36] = x
    assert torch.equal(out, padded[:, top:top + 32, left:left + 32])
    reflect = RandomCropPad(32, 4, "reflect")(x, _gen(5))
    assert reflect.shape == (3, 32, 32)


def test_eval_resize_center_crop_follows_crop_pct():
    t = ResizeCenterCrop(224, crop_pct=0.875, interpolation="bicubic")
    assert t.scale_size == 256
    x = _image(300, 400)
    expected = Fn.center_crop(Fn.resize(x, (256, 341), "bicubic"), 224, 224)
    assert torch.equal(t(x), expected)
    data = DataConfig(name="fake", img_size=32, crop_pct=1.0)
    out = build_eval_transform(data, MEAN, STD)(torch.full((3, 32, 32), 255, dtype=torch.uint8))
    assert torch.allclose(out[:, 0, 0], (1 - torch.tensor(MEAN)) / torch.tensor(STD))


# --- RandAugment / TrivialAugment ------------------------------------------------------------------------------------

def test_parse_rand_augment():
    spec = parse_rand_augment("rand-m9-mstd0.5-inc1")
    assert (spec.num_ops, spec.magnitude, spec.magnitude_std, spec.increasing, spec.prob) == (2, 9, 0.5, True, 0.5)
    spec = parse_rand_augment("rand-m7-n3-mstd101-inc0-mmax15-p1")
    assert (spec.num_ops, spec.magnitude_std, spec.increasing, spec.magnitude_max, spec.prob) == \
        (3, float("inf"), False, 15, 1.0)
    for bad in ("rand-q9", "rand-m", "augmix-m3", "rand-m9-"):
        with pytest.raises(ValueError):
            parse_rand_augment(bad)


@pytest.mark.parametrize("table", [RAND_OPS, RAND_INCREASING_OPS], ids=["plain", "increasing"])
@pytest.mark.parametrize("m", [0.0, 5.0, 10.0])
def test_every_rand_op_runs_on_non_square_images(table, m):
    x = _image(12, 20)
    for name, op in table.items():
        out = op(x, m, OpContext(), _gen())
        assert out.dtype == torch.uint8 and out.shape == x.shape, name


def test_rand_augment_magnitude_conventions():
    x, ctx = _image(), OpContext()
    for name in ("Color", "Contrast", "Brightness", "Sharpness"):  # 'increasing' ops: m=0 is the identity
        assert torch.equal(RAND_INCREASING_OPS[name](x, 0.0, ctx, _gen()), x), name
    assert torch.equal(RAND_OPS["Solarize"](x, 10.0, ctx, _gen()), x)  # threshold 256: nothing inverted
    assert torch.equal(RAND_INCREASING_OPS["Solarize"](x, 0.0, ctx, _gen()), x)
    assert torch.equal(RAND_INCREASING_OPS["Posterize"](x, 0.0, ctx, _gen()), Fn.posterize(x, 4))
    shifted = RAND_OPS["TranslateXRel"](x, 10.0, OpContext(fill=(1, 2, 3)), _gen())
    assert (shifted[:, :, :10] == torch.tensor([1, 2, 3], dtype=torch.uint8).view(3, 1, 1)).all() or \
        (shifted[:, :, -10:] == torch.tensor([1, 2, 3], dtype=torch.uint8).view(3, 1, 1)).all()  # 0.45 × 23 px


def test_rand_augment_uses_only_its_generator():
    ra = RandAugment(parse_rand_augment("rand-m9-mstd0.5-inc1"))
    x = _image(32, 32)
    torch.manual_seed(1)
    a = ra(x, _gen(7))
    torch.manual_seed(2)
    b = ra(x, _gen(7))
    assert torch.equal(a, b)
    outs = {ra(x, _gen(s)).sum().item() for s in range(20)}
    assert len(outs) > 10  # different generators give different augmentations


def test_trivial_augment_table_and_ops():
    table = _ta_table(31)
    assert len(table) == 14 and table["Posterize"][0][0] == 8 and table["Posterize"][0][-1] == 2
    assert table["Rotate"][0][-1] == 135.0 and table["Solarize"][0][0] == 255.0
    x = _image(12, 20)
    for name, (values, _) in table.items():
        out = _apply_trivial(x, name, values[-1], OpContext())
        assert out.dtype == torch.uint8 and out.shape == x.shape, name
    ta = TrivialAugmentWide()
    assert torch.equal(ta(x, _gen(3)), ta(x, _gen(3)))


# --- random erasing ---------------------------------------------------------------------------------------------------

def test_random_erasing():
    x = torch.zeros(3, 32, 32)
    assert RandomErasing(prob=0.0)(x, _gen()) is x
    out = RandomErasing(prob=1.0)(x, _gen(1))
    erased = (out != 0).any(0)  # (H, W)
    rows, cols = erased.any(1).nonzero(), erased.any(0).nonzero()
    h, w = len(rows), len(cols)
    assert x.abs().sum() == 0  # input untouched
    assert 0.02 * 1024 * 0.7 <= erased.sum() <= 1024 / 3 * 1.3 and erased.sum() == h * w  # one rectangle
    assert 0.3 * 0.7 <= h / w <= 1 / 0.3 * 1.3
    assert torch.equal(out, RandomErasing(prob=1.0)(x, _gen(1)))


# --- configs and pipelines --------------------------------------------------------------------------------------------

def test_augment_config_validation():
    aug = from_dict(AugmentConfig, {"auto_augment": "rand-m9-mstd0.5-inc1", "mixup": 0.8, "cutmix": 1.0,
                                    "scale": [0.08, 1], "random_erasing": 0.25})
    assert aug.scale == (0.08, 1.0) and aug.mixup_active
    bad = [{"auto_augment": "rand-z9"}, {"hflip": 1.5}, {"scale": [0.5, 0.1]}, {"label_smoothing": 1.0},
           {"random_resized_crop": True}, {"mixup": -1.0}, {"crop_padding": -2}, {"mixup_prob": 2.0}]
    for entry in bad:
        with pytest.raises(ConfigError):
            from_dict(AugmentConfig, entry)
    with pytest.raises(ConfigError, match="hflp"):
        from_dict(AugmentConfig, {"hflp": 0.5})


@pytest.mark.parametrize("aug", [
    AugmentConfig(auto_augment="rand-m9-mstd0.5-inc1", random_erasing=0.25),
    AugmentConfig(random_resized_crop=True, crop_padding=0, auto_augment="trivial"),
    AugmentConfig(crop_padding=0, hflip=0.0),
])
@pytest.mark.parametrize("img_size", [32, 48])
def test_train_transform_shapes(aug, img_size):
    t = build_train_transform(aug, DataConfig(name="fake", img_size=img_size), MEAN, STD)
    out = t(_image(32, 32), _gen())
    assert out.dtype == torch.float32 and out.shape == (3, img_size, img_size)
    assert torch.equal(out, t(_image(32, 32), _gen()))


def test_train_transform_pickles_for_spawned_workers():
    aug = AugmentConfig(auto_augment="rand-m9-mstd0.5-inc1", random_erasing=0.25)
    t = build_train_transform(aug, DataConfig(name="fake", img_size=32), MEAN, STD)
    clone = pickle.loads(pickle.dumps(t))
    assert torch.equal(clone(_image(32, 32), _gen(2)), t(_image(32, 32), _gen(2)))
    assert pickle.loads(pickle.dumps(TrivialAugmentWide()))(_image(), _gen(1)).shape == (3, 17, 23)


def test_pipeline_leaves_global_rngs_alone():
    aug = AugmentConfig(random_resized_crop=True, crop_padding=0, auto_augment="rand-m9-mstd0.5-inc1",
                        random_erasing=1.0)
    t = build_train_transform(aug, DataConfig(name="fake", img_size=32), MEAN, STD)
    torch_state, np_state, py_state = torch.get_rng_state(), np.random.get_state(), random.getstate()
    for i in range(20):
        t(_image(40, 48), sample_generator(0, 0, i))
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], np_state[1]) and random.getstate() == py_state


def test_sample_generator_is_a_stable_function_of_seed_epoch_index():
    draw = lambda *k: torch.rand(4, generator=sample_generator(*k))  # noqa: E731
    assert torch.equal(draw(1, 2, 3), draw(1, 2, 3))
    assert not torch.equal(draw(1, 2, 3), draw(1, 3, 2)) and not torch.equal(draw(1, 2, 3), draw(2, 2, 3))


def _loader_outputs(ds, workers):
    loader = DataLoader(ds, batch_size=4, num_workers=workers, collate_fn=collate_skip_none)
    return torch.cat([images for images, _ in loader])


def test_transform_dataset_is_independent_of_worker_count():
    aug = AugmentConfig(auto_augment="rand-m9-mstd0.5-inc1", random_erasing=0.5)
    ds = TransformDataset(FakeData(16, 10, 32, seed=0),
                          build_train_transform(aug, DataConfig(name="fake", img_size=32), MEAN, STD), seed=11)
    ds.set_epoch(3)
    single = _loader_outputs(ds, 0)
    assert torch.equal(single, _loader_outputs(ds, 2))
    assert torch.equal(ds[(5, 3)][0], single[5])  # (index, epoch) keys give the same sample
    ds.set_epoch(4)
    assert not torch.equal(ds[5][0], single[5])  # a new epoch, new augmentations


def test_transform_dataset_passes_none_through():
    class Holey(FakeData):
        def __getitem__(self, i):
            return None if i == 1 else super().__getitem__(i)
    ds = TransformDataset(Holey(3, 2, 8), lambda x, g: x.float(), seed=0)
    assert ds[1] is None and ds[0][0].dtype == torch.float32 and ds.classes == ["class_0", "class_1"]


def test_measure_loader_throughput():
    ds = TransformDataset(FakeData(64, 10, 32), build_eval_transform(DataConfig(name="fake", img_size=32), MEAN, STD))
    rate = measure_loader_throughput(DataLoader(ds, batch_size=16), batches=3)
    assert rate > 0 and math.isfinite(rate)
