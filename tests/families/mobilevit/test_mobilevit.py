"""MobileViT against its references: the official ml-cvnets code (tests/families/mobilevit/data: logits at five input
sizes, the key layout of the three release files; README there), timm's port (a shrunk timm file at five input sizes,
and the shared golden ``timm_mobilevit_xxs`` at two sizes other than its 256 px), transformers'
``MobileViTForImageClassification`` (parity in both directions, its file and live layouts, its config), transformers'
``MobileViTImageProcessor`` on real photos (BGR, [0, 1]) and ``vitkit predict`` end to end, the per-source data
configs, and the official unfolding written out as the official code writes it. The timm golden case at its own size
runs in tests/test_golden.py.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import vitkit
from vitkit.config import ConfigError
from vitkit.families.mobilevit import formats as mobilevit_formats
from vitkit.families.mobilevit import model as mobilevit_model
from vitkit.families.mobilevit.formats import OFFICIAL, OFFICIAL_DATA_CFG, TIMM_DATA_CFG, to_official, to_transformers
from vitkit.families.mobilevit.model import fold_patches, unfold_patches
from vitkit.weights import CheckpointError

from conftest import REPO, eval_forward, golden_close, max_diff, randomize_, skip_or_fail

DATA = Path(__file__).parent / "data"
OFFICIAL_FILE = DATA / "official_shrunk.pt"
# the shrunk official model of tests/families/mobilevit/data, as overrides of mobilevit_xxs
SHRUNK = dict(widths=(8, 16, 24, 32, 40), transformer_dims=(16, 24, 32))
SIZES = [(256, 256), (320, 320), (136, 136), (96, 160)]
SHARED = Path(os.environ.get("VITKIT_SHARED", REPO.parent / "shared"))
IMAGES = SHARED / "data" / "images"


@pytest.fixture(scope="module")
def official_io():
    return load_file(str(DATA / "official_shrunk_io.safetensors"))


# ------------------------------------------------------------------------------------------ official reference
@pytest.mark.parametrize("size", SIZES, ids=[f"{h}x{w}" for h, w in SIZES])
def test_official_logits_at_several_input_sizes(official_io, size):
    """The official release container (bare state dict, float16 here) at its native size, at 320 and at sizes whose
    feature maps are not multiples of the 2x2 patch (the official bilinear resize around unfolding)."""
    h, w = size
    model = vitkit.create_model("mobilevit_xxs", pretrained=str(OFFICIAL_FILE), img_size=size, **SHRUNK).eval()
    x = official_io[f"images_{h}x{w}"].float() / 255
    with torch.no_grad():
        feats = model.forward_features(x)
        logits, pre = model.forward_head(feats), model.forward_head(feats, pre_logits=True)
    assert golden_close(logits, official_io[f"logits_{h}x{w}"]), max_diff(logits, official_io[f"logits_{h}x{w}"])
    assert golden_close(pre, official_io[f"pre_logits_{h}x{w}"]), max_diff(pre, official_io[f"pre_logits_{h}x{w}"])
    report = model.load_report
    assert report.format == "official" and report.upcast == ["float16 → float32"]
    assert report.resized == [] and report.reinitialized == []
    resized_note = [n for n in report.notes if "nothing needed resizing" in n]
    assert bool(resized_note) == (size != (256, 256)), report.notes
    assert model.data_cfg.channel_order == "BGR" and model.data_cfg.input_size == (3, h, w)


def test_pinned_official_layernorm_differs_where_patches_equal_width(official_io):
    """At 64 px layer3 has 16 patches and d = 16: ml-cvnets' LayerNorm from v0.2 on then normalises over the
    patches. vitkit computes what v0.1 (which trained the weights), timm and transformers compute."""
    model = vitkit.create_model("mobilevit_xxs", pretrained=str(OFFICIAL_FILE), img_size=64, **SHRUNK)
    out = eval_forward(model, official_io["images_64x64"].float() / 255)
    assert golden_close(out, official_io["logits_64x64_plain_layernorm"])
    assert max_diff(out, official_io["logits_64x64"]) > 0.1


# ---------------------------------------------------------------------------------------------- timm reference
TIMM_FILE = DATA / "timm_shrunk.safetensors"
# the shrunk timm model of tests/families/mobilevit/data (make_timm_resize_case.py), as overrides of mobilevit_xxs
TIMM_SHRUNK = dict(stem_chs=8, widths=(8, 16, 24, 32, 40), mv2_depths=(1, 2), transformer_dims=(16, 24, 32),
                   transformer_depths=(2, 1, 1))
# layer3 / layer4 / layer5 maps: 8x8 4x4 2x2; 16x16 8x8 4x4; 12x12 6x6 3x3; 17x17 9x9 5x5; 8x17 4x9 2x5
TIMM_SIZES = [(64, 64), (128, 128), (96, 96), (136, 136), (64, 136)]
TIMM_CODE = "timm==1.0.31 timm/models/mobilevit.py (MobileVitBlock.forward)"
GOLDEN_CROPS = [(200, 200), (256, 160)]  # crops of the golden pixel_values: layer3-5 maps 25/13/7, and 32x20 … 8x5


def _resizes_patches(size) -> bool:
    """Whether some MobileViT block (strides 8, 16, 32) gets a map whose side is not a multiple of the 2x2 patch."""
    return any(-(-side // s) % 2 for s in (8, 16, 32) for side in size)


def _timm_shrunk(size, **kw):
    return vitkit.create_model("mobilevit_xxs", pretrained=str(TIMM_FILE), img_size=size, **TIMM_SHRUNK, **kw).eval()


@pytest.fixture(scope="module")
def timm_io():
    return load_file(str(DATA / "timm_shrunk_io.safetensors"))


@pytest.mark.parametrize("size", TIMM_SIZES, ids=[f"{h}x{w}" + ("-resized-patches" if _resizes_patches((h, w)) else "")
                                                 for h, w in TIMM_SIZES])
def test_timm_logits_at_several_input_sizes(timm_io, size):
    """A timm file (a shrunk timm 1.0.31 MobileViT-XXS, float16 safetensors) at sizes whose maps are multiples of the
    patch and at sizes where timm's ``MobileVitBlock.forward`` resizes them (bilinear, align_corners=False, to the
    next multiple and back), square and rectangular; the report names timm's code for that resize."""
    h, w = size
    model = _timm_shrunk(size)
    out, ref = eval_forward(model, timm_io[f"images_{h}x{w}"].float() / 255), timm_io[f"logits_{h}x{w}"]
    assert golden_close(out, ref), max_diff(out, ref)
    report = model.load_report
    assert report.format == "timm" and report.upcast == ["float16 → float32"]
    assert report.resized == [] and report.reinitialized == []
    assert any("nothing needed resizing" in n and f"as {TIMM_CODE} does" in n for n in report.notes), report.notes
    assert model.data_cfg.channel_order == "RGB" and model.data_cfg.input_size == (3, h, w)


@pytest.mark.parametrize("size", [s for s in TIMM_SIZES if _resizes_patches(s)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_timm_references_tell_the_patch_resize_apart(timm_io, size, monkeypatch):
    """The non-multiple sizes check the resize itself: with align_corners=True the logits miss the reference."""
    h, w = size
    x, ref = timm_io[f"images_{h}x{w}"].float() / 255, timm_io[f"logits_{h}x{w}"]
    model = _timm_shrunk(size)
    interpolate = torch.nn.functional.interpolate
    monkeypatch.setattr(mobilevit_model.F, "interpolate",
                        lambda t, size, mode, align_corners: interpolate(t, size=size, mode=mode, align_corners=True))
    assert max_diff(eval_forward(model, x), ref) > 1e-3


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("size", GOLDEN_CROPS, ids=[f"{h}x{w}" for h, w in GOLDEN_CROPS])
def test_timm_golden_xxs_at_other_input_sizes(golden_root, size):
    """The shared golden timm_mobilevit_xxs (full size, 256 px) at two other sizes, on crops of its own pixel_values;
    the reference logits were computed here by timm 1.0.31 (make_timm_resize_case.py) from the golden files whose
    SHA-256 the reference file records."""
    folder = golden_root / "timm_mobilevit_xxs"
    if not (folder / "model.safetensors").is_file():
        skip_or_fail(f"{folder / 'model.safetensors'} not found")
    from safetensors import safe_open
    with safe_open(str(DATA / "timm_golden_xxs_resize_logits.safetensors"), "pt") as f:
        meta, ref = f.metadata(), f.get_tensor(f"logits_{size[0]}x{size[1]}")
    for name in ("model.safetensors", "io.safetensors"):
        assert _sha256(folder / name) == meta[f"{name} sha256"], f"{folder / name} is not the file the reference " \
            f"logits were made from: run tests/families/mobilevit/data/make_timm_resize_case.py again"
    h, w = size
    x = load_file(str(folder / "io.safetensors"))["pixel_values"][:, :, :h, :w]
    model = vitkit.create_model("mobilevit_xxs", pretrained=str(folder / "model.safetensors"), img_size=size).eval()
    out = eval_forward(model, x)
    assert golden_close(out, ref), max_diff(out, ref)
    assert model.load_report.format == "timm"
    assert any(f"as {TIMM_CODE} does" in n for n in model.load_report.notes), model.load_report.notes


@pytest.mark.parametrize("name", ["mobilevit_xxs", "mobilevit_xs", "mobilevit_s"])
def test_inverse_table_writes_the_official_keys_and_shapes(name):
    """Every variant's layout equals the official model's (keys_*.json, from the official code): the variant table
    and the rename table both, in both directions."""
    expected = json.loads((DATA / f"keys_{name}.json").read_text())
    with torch.device("meta"):
        state = vitkit.create_model(name).state_dict()
    official = to_official(state)
    assert {k: list(v.shape) for k, v in official.items()} == expected
    assert set(OFFICIAL.forward(official)) == set(state)


def test_release_layout_names_its_variant_and_converts_without_model(tmp_path):
    from vitkit.cli.main import main
    model = randomize_(vitkit.create_model("mobilevit_xxs")).eval()
    torch.save(to_official(model.state_dict()), tmp_path / "mobilevit_xxs.pt")
    assert vitkit.registry.infer_variant(tmp_path / "mobilevit_xxs.pt") == ("mobilevit_xxs", {})
    assert main(["convert", str(tmp_path / "mobilevit_xxs.pt"), str(tmp_path / "out")]) == 0
    back = vitkit.load_model(tmp_path / "out")
    x = torch.rand(1, 3, 256, 256)
    assert torch.equal(eval_forward(back, x), eval_forward(model, x))
    assert back.data_cfg.channel_order == "BGR"  # saved with the official weights' preprocessing


def test_timm_golden_file_names_its_variant_and_sets_timms_preprocessing(golden_root):
    path = golden_root / "timm_mobilevit_xxs" / "model.safetensors"
    if not path.is_file():
        skip_or_fail(f"{path} not found")
    assert vitkit.registry.infer_variant(path) == ("mobilevit_xxs", {})
    model = vitkit.create_model("mobilevit_xxs", pretrained=str(path))
    cfg = model.data_cfg
    assert (cfg.channel_order, cfg.mean, cfg.std, cfg.interpolation, cfg.crop_pct) == \
        ("RGB", (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "bicubic", 0.9) == tuple(TIMM_DATA_CFG[k] for k in (
            "channel_order", "mean", "std", "interpolation", "crop_pct"))
    assert any("preprocessing set for timm weights: channel_order='RGB'" in n for n in model.load_report.notes)


def test_the_variants_default_is_the_official_evaluation():
    cfg = vitkit.get_spec("mobilevit_s").data_cfg
    assert cfg.input_size == (3, 256, 256)
    assert {k: getattr(cfg, k) for k in OFFICIAL_DATA_CFG} == OFFICIAL_DATA_CFG
    from vitkit.evaluate.preprocess import resize_size
    assert resize_size(640, 480, (256, 256), cfg.crop_pct) == (384, 288)  # short side 288 = 256 + 32


# ------------------------------------------------------------------------------------------------ transformers
# transformers builds layer1 / layer2 with 1 / 3 inverted residuals and 2 / 4 / 3 transformer layers; narrow widths
HF_TINY = dict(img_size=64, **SHRUNK, num_classes=10)


def _hf_pair(**overrides):
    model = randomize_(vitkit.create_model("mobilevit_xxs", **{**HF_TINY, **overrides})).eval()
    _randomize_bn_stats_(model)
    return model, to_transformers(model)


def _randomize_bn_stats_(model, seed=3):
    """Running statistics away from (0, 1), so that a BatchNorm mapped to the wrong place shows in the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(1 + 0.2 * torch.rand(m.running_var.shape, generator=g))


@pytest.mark.parametrize("size", [(64, 64), (100, 72)], ids=["64x64", "100x72-resized-patches"])
def test_transformers_twin_computes_the_same_function(size):
    model, hf = _hf_pair()
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(pixel_values=x).logits
    assert max_diff(eval_forward(model, x), ref) < 1e-4


def test_transformers_folder_and_live_state_dict_load(tmp_path):
    """A save_pretrained folder (the Hub layout, read with its config.json) and a bare live state_dict load and
    reproduce transformers' logits. MobileViT's names are the same in transformers 4.x and 5.x (5.x has no
    conversion_mapping entry for it), so the two are one layout."""
    model, hf = _hf_pair()
    hf.save_pretrained(tmp_path / "hf")
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, tmp_path / "live.safetensors")
    assert set(load_file(str(tmp_path / "hf" / "model.safetensors"))) == set(hf.state_dict())
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(pixel_values=x).logits
    from_folder = vitkit.create_model("mobilevit_xxs", pretrained=str(tmp_path / "hf"))  # architecture from config
    assert from_folder.cfg.widths == SHRUNK["widths"] and from_folder.cfg.img_size == 64
    live = vitkit.create_model("mobilevit_xxs", pretrained=str(tmp_path / "live.safetensors"), **HF_TINY)
    for loaded in (from_folder, live):
        assert loaded.load_report.format == "hf" and loaded.data_cfg.channel_order == "BGR"
        assert max_diff(eval_forward(loaded, x), ref) < 1e-4


def test_transformers_full_size_folder_names_its_variant(tmp_path):
    from transformers import MobileViTForImageClassification
    hf = MobileViTForImageClassification(
        mobilevit_formats.transformers_config(vitkit.create_model("mobilevit_xs")))
    hf.save_pretrained(tmp_path / "hf")
    assert vitkit.registry.infer_variant(tmp_path / "hf") == ("mobilevit_xs", {})


def test_transformers_config_it_cannot_build_is_refused(tmp_path):
    model, hf = _hf_pair()
    hf.config.hidden_act = "gelu"
    hf.save_pretrained(tmp_path / "hf")
    with pytest.raises(CheckpointError, match="hidden_act"):
        vitkit.create_model("mobilevit_xxs", pretrained=str(tmp_path / "hf"))


def test_twin_refuses_depths_transformers_cannot_build():
    model = vitkit.create_model("mobilevit_xxs", **vitkit.get_spec("mobilevit_xxs").tiny)
    with pytest.raises(ValueError, match="fixed depths"):
        to_transformers(model)


# ------------------------------------------------------------------------------------------ preprocessing
def _photos() -> list[Path]:
    photos = sorted(IMAGES.glob("*.png")) if IMAGES.is_dir() else []
    if not photos:
        skip_or_fail(f"shared photos not found under {IMAGES}; set VITKIT_SHARED to the shared folder")
    return photos


def _same_crop_offsets(path: Path) -> bool:
    """transformers floors an odd centre-crop offset, vitkit (like torchvision and timm) rounds it: keep the photos
    whose resized side minus 256 is even (most of them)."""
    from PIL import Image
    from vitkit.evaluate.preprocess import resize_size
    w, h = Image.open(path).size
    return all((s - 256) % 2 == 0 for s in resize_size(w, h, (256, 256), 256 / 288))


@pytest.fixture(scope="module")
def processor():
    module = pytest.importorskip("transformers.models.mobilevit.image_processing_pil_mobilevit")
    from transformers.image_utils import PILImageResampling
    # what transformers' converter writes for the ml-cvnets weights (size = 256 + 32, crop 256) with the official
    # bilinear resize (transformers 4.x's default; 5.x's class default is bicubic); flip to BGR, pixels / 255
    return module.MobileViTImageProcessorPil(size={"shortest_edge": 288}, crop_size={"height": 256, "width": 256},
                                             resample=PILImageResampling.BILINEAR, do_flip_channel_order=True)


def test_official_preprocessing_is_transformers_image_processor(processor):
    from vitkit.data import load_image
    from vitkit.evaluate import eval_transform
    photos = [p for p in _photos() if _same_crop_offsets(p)]
    assert len(photos) >= 10
    images = [load_image(p) for p in photos]
    ours = torch.stack([eval_transform(vitkit.get_spec("mobilevit_xxs").data_cfg)(im) for im in images])
    ref = processor(images, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    assert ours.min() >= 0 and ours.max() <= 1
    import dataclasses
    rgb = torch.stack([eval_transform(dataclasses.replace(vitkit.get_spec("mobilevit_xxs").data_cfg,
                                                          channel_order="RGB"))(im) for im in images])
    assert torch.equal(rgb, ours.flip(1)) and max_diff(rgb, ref) > 0.1  # the flip is what makes them equal


def test_predict_applies_the_weights_preprocessing(processor, tmp_path, capsys):
    """``vitkit predict`` on real photos with a transformers folder = transformers' processor + model."""
    from vitkit.cli.main import main
    photos = [p for p in _photos() if _same_crop_offsets(p)][:4]
    model, hf = _hf_pair(img_size=256)
    hf.save_pretrained(tmp_path / "hf")
    from vitkit.data import load_image
    with torch.no_grad():
        probs = hf(pixel_values=processor([load_image(p) for p in photos], return_tensors="pt")["pixel_values"]
                   ).logits.softmax(-1)
    rc = main(["predict", *map(str, photos), "--model", "mobilevit_xxs", "--pretrained", str(tmp_path / "hf"),
               "--format", "json", "--topk", "3", "--device", "cpu"])
    assert rc == 0
    rows = {Path(r["path"]).name: r["topk"] for r in json.loads(capsys.readouterr().out)}
    for photo, p in zip(photos, probs):
        values, indices = p.topk(3)
        assert [t["index"] for t in rows[photo.name]] == indices.tolist()
        assert [t["prob"] for t in rows[photo.name]] == pytest.approx(values.tolist(), abs=1e-5)


# ------------------------------------------------------------------------------------------ unfold and fold
def _official_unfold(x: torch.Tensor, p: int) -> torch.Tensor:
    """ml-cvnets ``MobileViTBlock.unfolding``, step by step (after its resize)."""
    B, C, H, W = x.shape
    n_h, n_w = H // p, W // p
    x = x.reshape(B * C * n_h, p, n_w, p).transpose(1, 2)  # [B·C·n_h, n_w, p_h, p_w]
    x = x.reshape(B, C, n_h * n_w, p * p).transpose(1, 3)  # [B, P, N, C]
    return x.reshape(B * p * p, n_h * n_w, C)


@pytest.mark.parametrize("shape", [(2, 5, 8, 12), (1, 3, 7, 9), (2, 4, 3, 3)])
def test_unfold_is_the_official_unfolding_and_fold_inverts_it(shape):
    x = torch.randn(shape)
    patches, grid = unfold_patches(x, 2)
    H, W = 2 * grid[0], 2 * grid[1]
    resized = torch.nn.functional.interpolate(x, size=(H, W), mode="bilinear", align_corners=False) \
        if (H, W) != shape[-2:] else x
    assert torch.equal(patches, _official_unfold(resized, 2))
    back = fold_patches(patches, grid, 2, shape[-2:])
    if (H, W) == shape[-2:]:
        assert torch.equal(back, x)
    else:  # folded at the resized size, then resized back (official folding)
        expected = torch.nn.functional.interpolate(resized, size=shape[-2:], mode="bilinear", align_corners=False)
        assert torch.equal(back, expected)


def test_recorded_attention_runs_across_patches_per_pixel_position():
    model = randomize_(vitkit.create_model("mobilevit_xxs", **HF_TINY)).eval()
    with torch.no_grad(), vitkit.record_attention(model) as maps:
        model(torch.randn(2, 3, 64, 64))
    attn = maps["stages.2.1.transformer.0.attn"]  # layer3 at 64 px: 8x8 map → 4x4 = 16 patches, P = 4
    assert attn.shape == (2 * 4, 4, 16, 16)
    assert "B·P" in maps.layouts["stages.2.1.transformer.0.attn"]


def test_intermediates_are_the_five_stage_maps():
    model = vitkit.create_model("mobilevit_xxs", **HF_TINY).eval()
    with torch.no_grad():
        outs = model.forward_intermediates(torch.randn(1, 3, 64, 64))
    assert [tuple(t.shape[1:]) for t in outs] == [(8, 32, 32), (16, 16, 16), (24, 8, 8), (32, 4, 4), (40, 2, 2)]


def test_config_errors_name_the_field():
    for bad, field in [(dict(widths=(8, 16)), "widths"), (dict(transformer_dims=(16, 24, 30)), "num_heads"),
                       (dict(kernel_size=4), "kernel_size"), (dict(drop_rate=1.0), "drop_rate"),
                       (dict(expand_ratio=0.5), "expand_ratio")]:
        with pytest.raises(ConfigError, match=field):
            vitkit.create_model("mobilevit_xxs", **bad)


def test_official_dropout_placement():
    """FFN: dropout(ffn_dropout) between the dense layers, dropout(dropout) after the second; attention: dropout
    after the projection, attn_dropout on the probabilities; classifier dropout before the head."""
    model = vitkit.create_model("mobilevit_xxs", proj_drop_rate=0.1, mlp_drop_rate=0.05, attn_drop_rate=0.02,
                                drop_rate=0.2)
    blk = model.stages[2][1].transformer[0]
    assert (blk.mlp.drop1.p, blk.mlp.drop2.p, blk.attn.proj_drop.p, blk.attn.attn_drop) == (0.05, 0.1, 0.1, 0.02)
    assert model.head_drop.p == 0.2 and blk.norm1.eps == 1e-5 and isinstance(blk.mlp.act, torch.nn.SiLU)


# ------------------------------------------------------------------------------------------ ConvNormAct
def _conv_norm_act(groups=1):
    from vitkit.layers import ConvNormAct
    layer = randomize_(ConvNormAct(8, 8, 3, stride=2, groups=groups))
    _randomize_bn_stats_(layer)
    return layer


@pytest.mark.parametrize("groups", [1, 8])
def test_eval_folds_batchnorm_into_the_conv_without_changing_the_function(groups):
    layer = _conv_norm_act(groups).eval()
    x = torch.randn(2, 8, 9, 9)
    unfolded = layer.act(layer.bn(layer.conv(x)))
    with torch.no_grad():
        assert max_diff(layer(x), unfolded) < 1e-5  # folded (and activated in place)
    x.requires_grad_(True)  # in eval mode with autograd (e.g. saliency): folded, differentiable
    (g1,) = torch.autograd.grad(layer(x).sum(), x)
    (g2,) = torch.autograd.grad(layer.act(layer.bn(layer.conv(x))).sum(), x)
    assert max_diff(g1, g2) < 1e-5
    assert set(layer.state_dict()) == {"conv.weight", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var",
                                       "bn.num_batches_tracked"}


def test_training_and_hooks_keep_the_unfolded_batchnorm():
    layer = _conv_norm_act().train()
    x = torch.randn(4, 8, 9, 9)
    before = layer.bn.running_mean.clone()
    layer(x)
    assert not torch.equal(layer.bn.running_mean, before)  # batch statistics used and tracked
    layer.eval()
    seen = []
    layer.bn.register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        out = layer(x)
    assert len(seen) == 1 and torch.equal(out, layer.act(seen[0]))


# ------------------------------------------------------------------------------------------ training data
def test_training_and_dataset_eval_feed_bgr_weights_bgr(tmp_path):
    """``vitkit train`` from BGR weights (the official MobileViT files) swaps the channels in its train and eval
    transforms, so training, ``vitkit eval`` and ``predict`` all see what the weights expect."""
    import yaml
    from vitkit.data import build_splits
    from vitkit.evaluate.eval_data import dataset_transform
    from vitkit.train.build import build_data, build_model
    from vitkit.train.config import load_recipe
    from vitkit.train.distributed import DistInfo
    tiny = {k: v for k, v in vitkit.get_spec("mobilevit_xxs").tiny.items() if k != "img_size"}
    recipe = {"model": {"name": "mobilevit_xxs", "overrides": tiny},
              "data": {"name": "fake", "img_size": 32, "train_limit": 8, "test_limit": 8, "num_workers": 0,
                       "mean": [0.3, 0.2, 0.1], "std": [0.5, 0.5, 0.25]},
              "augment": {"random_resized_crop": False, "crop_padding": 0, "hflip": 0.0, "auto_augment": None,
                          "random_erasing": 0.0, "mixup": 0.0, "cutmix": 0.0},
              "train": {"steps": 1, "batch_size": 4}, "log": {"progress": False, "plots": False, "tensorboard": False}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    cfg = load_recipe(tmp_path / "r.yaml")
    model = build_model(cfg, 10)
    assert model.data_cfg.channel_order == "BGR"
    splits = build_splits(cfg.data)
    data = build_data(cfg, splits, model, DistInfo(rank=0, world_size=1, local_rank=0))
    image = splits.train[0][0]  # (3, 32, 32) uint8, R G B
    expected = (image.flip(0).float() / 255 - torch.tensor([0.3, 0.2, 0.1])[:, None, None]) \
        / torch.tensor([0.5, 0.5, 0.25])[:, None, None]  # B G R, normalised with the model-order statistics
    torch.testing.assert_close(data.train.transform(image), expected)
    torch.testing.assert_close(data.test.transform(splits.test[0][0]),
                               dataset_transform(cfg.data, model)(splits.test[0][0]))


# ============================================================================================ official options
OPTIONS_KW = dict(widths=(8, 16, 24, 32, 40), transformer_dims=(16, 24, 32), head_dim=8, no_fusion=True,
                  global_pool="abs", num_classes=10)


@pytest.mark.parametrize("size, pool, key", [(256, "abs", "logits_256x256"), (160, "abs", "logits_160x160"),
                                             (256, "rms", "logits_256x256_rms")])
def test_official_options_head_dim_no_fusion_global_pool(size, pool, key):
    """``mit.head_dim`` 8 (2, 3, 4 heads by width), ``mit.no_fuse_local_global_features`` and the ``abs`` / ``rms``
    global pools against ml-cvnets itself (tests/families/mobilevit/data/official_options*, make_options_case.py), at
    256 and 160 pixels."""
    folder = Path(__file__).parent / "data"
    io = load_file(folder / "official_options_io.safetensors")
    model = vitkit.create_model("mobilevit_xxs", pretrained=str(folder / "official_options.pt"), img_size=size,
                                **{**OPTIONS_KW, "global_pool": pool}).eval()
    assert [s[1].transformer[0].attn.num_heads for s in model.stages[2:]] == [2, 3, 4]
    assert all(s[1].conv_fusion is None for s in model.stages[2:])
    with torch.no_grad():
        out = model(io[f"images_{size}x{size}"].float() / 255)
    assert (out - io[key]).abs().max() <= 1e-4 + 1e-4 * io[key].abs().max()


def test_ml_cvnets_options_that_build_nothing_are_refused_with_the_reason():
    with pytest.raises(ConfigError, match="transformer_norm_layer .*never passes it"):
        vitkit.create_model("mobilevit_xxs", transformer_norm_layer="batch_norm")
