"""CvT: the official reference case (microsoft/CvT's own code on random weights, tests/families/cvt/data),
transformers parity on tiny configurations built here, the numerics each source implies, the transformers twin, input
sizes and the stage pyramid."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import vitkit
from vitkit.config import ConfigError
from vitkit.families.cvt.formats import HF, to_transformers
from vitkit.families.cvt.model import ConvProjection
from vitkit.weights import CheckpointError

from conftest import max_diff, randomize_

CASE = Path(__file__).parent / "data" / "official_cvt_13_shrunk"
TINY = dict(embed_dim=(16, 32, 48), num_heads=(1, 2, 3), depth=(1, 2, 3))  # transformers needs depth[i] > i
X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
X_WIDE = torch.randn(1, 3, 32, 48, generator=torch.Generator().manual_seed(4))


def _logits(model, x=X):
    with torch.no_grad():
        out = model.eval()(x)
    return out.logits if hasattr(out, "logits") else out


def perturb_batchnorm_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Running statistics away from (0, 1), so that loading or folding them wrongly shows in the logits."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(0.2 * torch.randn(m.running_mean.shape, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
            m.num_batches_tracked.fill_(7)
    return model


def _tiny(**kw):
    model = vitkit.create_model("cvt_13", **{**TINY, "img_size": 32, "num_classes": 5, **kw})
    return perturb_batchnorm_(randomize_(model)).eval()


# ================================================================================ the official reference case
def _case():
    meta = json.loads((CASE / "case.json").read_text())
    model = vitkit.create_model(meta["vitkit_model"], pretrained=str(CASE / meta["checkpoint"]),
                                num_classes=meta["num_classes"], **meta["kwargs"]).eval()
    return meta, model, load_file(str(CASE / "io.safetensors"))


def _within(out, ref, meta):
    return bool(((out - ref).abs() <= meta["atol"] + meta["rtol"] * ref.abs()).all())


def test_official_case_logits_pre_logits_and_non_square_input():
    meta, model, io = _case()
    with torch.no_grad():
        assert _within(model(io["pixel_values"]), io["logits"], meta)
        assert _within(model(io["pixel_values_wide"]), io["logits_wide"], meta)  # token grids 12x20, 6x10, 3x5
        pre = model.forward_head(model.forward_features(io["pixel_values"]), pre_logits=True)
    assert _within(pre, io["pre_logits"], meta)
    report = model.load_report
    assert report.format == "official" and report.upcast == ["float16 → float32"]
    assert report.reinitialized == [] and report.resized == [] and report.ignored == []
    notes = "\n".join(report.notes)
    assert "QuickGELU, LayerNorm eps 1e-5, attention scale dim_out ** -0.5" in notes
    assert "config act_layer='quick_gelu' taken from the checkpoint" in notes
    assert "no position embedding" in notes


def test_official_options_case_per_stage_settings():
    """The SPEC settings no released CvT uses, against the official code
    (tests/families/cvt/data/official_cvt_options): a class token in stage 0 (used by its block, then dropped) and in
    the last, the 'avg' projection in stage 1 (q unprojected, k/v average-pooled with ceil_mode), per-stage MLP
    ratios, qkv biases and kv strides; 48x48 and the non-square 48x80. The class tokens come from the file itself."""
    folder = CASE.parent / "official_cvt_options"
    meta, io = json.loads((folder / "case.json").read_text()), load_file(folder / "io.safetensors")
    kwargs = {k: v for k, v in meta["kwargs"].items() if k != "class_token"}
    model = vitkit.create_model("cvt_13", pretrained=str(folder / "checkpoint.pth"), num_classes=10, **kwargs).eval()
    assert model.cfg.class_token == (True, False, True) and model.stages[1].blocks[0].attn.conv_proj_q is None
    for suffix in ("", "_wide"):
        x = io[f"pixel_values{suffix}"].float()
        with torch.no_grad():
            feats = model.forward_features(x)
            assert max_diff(model.forward_head(feats), io[f"logits{suffix}"]) <= 1e-4
            assert max_diff(model.forward_head(feats, pre_logits=True), io[f"pre_logits{suffix}"]) <= 1e-4


def test_official_settings_that_cannot_run_are_refused_with_the_reason():
    with pytest.raises(ConfigError, match="qkv_proj_method 'linear': the official code cannot run it"):
        vitkit.create_model("cvt_13", qkv_proj_method="linear")


def test_official_case_checks_the_files_buffers():
    """Every BatchNorm statistic of the file is loaded (not re-estimated): the running statistics are part of it."""
    _, model, _ = _case()
    state = torch.load(CASE / "checkpoint.pth", weights_only=True)
    assert sum(k.endswith("num_batches_tracked") for k in state) == 3 * sum(model.cfg.depth)
    ours = model.state_dict()
    for key, value in state.items():
        assert torch.equal(ours[key.replace("stage", "stages.", 1) if key.startswith("stage") else key],
                           value.float() if value.is_floating_point() else value), key


@pytest.mark.parametrize("override", [dict(act_layer="gelu"), dict(attn_scale="head_dim"), dict(norm_eps=1e-12)])
def test_official_case_tells_the_numerics_apart(override):
    """Exact GELU, the head-width scale or transformers' unused config eps (1e-12) do not reproduce the official
    logits: the case tells each convention apart, so the file's own numerics are what makes it pass."""
    meta = json.loads((CASE / "case.json").read_text())
    io = load_file(str(CASE / "io.safetensors"))
    model = vitkit.create_model(meta["vitkit_model"], pretrained=str(CASE / meta["checkpoint"]),
                                num_classes=meta["num_classes"], **meta["kwargs"], **override)
    assert all(f"{k}={v!r} taken" not in "\n".join(model.load_report.notes) for k, v in override.items())
    assert not _within(_logits(model, io["pixel_values"]), io["logits"], meta)


def test_official_file_of_another_depth_names_the_keys():
    with pytest.raises(CheckpointError, match="stages.2.blocks.1"):
        vitkit.create_model("cvt_13", pretrained=str(CASE / "checkpoint.pth"), num_classes=10,
                            embed_dim=(16, 32, 48), num_heads=(1, 2, 3), depth=(1, 2, 1))


# ======================================================================================= transformers parity
def _hf(**kw):
    transformers = pytest.importorskip("transformers")
    config = transformers.CvtConfig(**{**{k: list(v) for k, v in TINY.items()}, "num_labels": 5, **kw})
    return perturb_batchnorm_(randomize_(transformers.CvtForImageClassification(config), seed=7), seed=8).eval()


def _hf_mean_pooled(hf, x):
    """CvtForImageClassification's branch without a class token (layernorm over the tokens, mean, classifier), run by
    hand: its forward reads ``outputs[1]``, which does not exist then (an IndexError in transformers 5.24)."""
    with torch.no_grad():
        tokens = hf.cvt(x).last_hidden_state.flatten(2).transpose(1, 2)  # (B, H·W, C)
        return hf.classifier(hf.layernorm(tokens).mean(dim=1))


@pytest.mark.parametrize("cls_token", [[False, False, True], [False, False, False]])
def test_transformers_folder_parity(tmp_path, cls_token):
    hf = _hf(cls_token=cls_token)
    hf.save_pretrained(tmp_path / "hf")
    saved = load_file(str(tmp_path / "hf" / "model.safetensors")).keys()
    assert set(saved) == set(hf.state_dict())  # 5.x keeps the 4.x module names: one layout
    model = vitkit.create_model("cvt_13", pretrained=str(tmp_path / "hf"))
    for x in (X, X_WIDE):
        ref = _logits(hf, x) if cls_token[-1] else _hf_mean_pooled(hf, x)
        assert ref.std() > 0.1
        assert max_diff(_logits(model, x), ref) <= 1e-4
    assert model.cfg.class_token == cls_token[-1] and model.cfg.act_layer == "gelu"
    notes = "\n".join(model.load_report.notes)
    for key, value in dict(act_layer="gelu", norm_eps=1e-5, attn_scale="dim", depth=(1, 2, 3),
                           embed_dim=(16, 32, 48), num_classes=5).items():
        assert f"config {key}={value!r} taken from the checkpoint" in notes, key
    assert "exact GELU" in notes and "ignore config.layer_norm_eps" in notes


def test_transformers_numerics_differ_from_the_official_ones(tmp_path):
    hf = _hf()
    hf.save_pretrained(tmp_path / "hf")
    quick = vitkit.create_model("cvt_13", pretrained=str(tmp_path / "hf"), act_layer="quick_gelu")
    assert quick.cfg.act_layer == "quick_gelu"  # an explicit override wins over the format's numerics
    assert max_diff(_logits(quick), _logits(hf)) > 1e-3


def test_transformers_hub_file_without_config(tmp_path):
    """What the catalog downloads: a bare pytorch_model.bin with the Hub keys; the variant (here with the tiny
    overrides) gives the architecture, the file its head and transformers' numerics."""
    hf = _hf()
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    model = vitkit.create_model("cvt_13", pretrained=str(tmp_path / "pytorch_model.bin"), **TINY)
    assert model.load_report.format == "hf" and model.num_classes == 5 and model.cfg.act_layer == "gelu"
    assert max_diff(_logits(model), _logits(hf)) <= 1e-4


def test_transformers_per_stage_settings_load_and_the_twin_writes_them_back(tmp_path):
    """Per-stage SPEC lists that differ between stages (MLP ratio, qkv bias, kv kernel/stride/padding) load with
    transformers' logits; the twin rebuilds them. (A class token in an earlier stage: the official case.)"""
    hf = _hf(mlp_ratio=[4.0, 2.0, 3.0], qkv_bias=[True, False, True], kernel_qkv=[3, 5, 3], padding_q=[1, 2, 1],
             padding_kv=[1, 2, 1], stride_kv=[2, 1, 1])
    hf.save_pretrained(tmp_path / "mixed")
    model = vitkit.create_model("cvt_13", pretrained=str(tmp_path / "mixed"))
    assert model.cfg.mlp_ratio == (4.0, 2.0, 3.0) and model.cfg.kernel_qkv == (3, 5, 3)
    for x in (X, X_WIDE):
        assert max_diff(_logits(model, x), _logits(hf, x)) <= 1e-4
        assert max_diff(_logits(to_transformers(model), x), _logits(hf, x)) <= 1e-4


@pytest.mark.parametrize("key, value, match", [("qkv_projection_method", ["avg"] * 3, "for 'avg' it builds no"),
                                               ("cls_token", [True, False, True], "sizes every class token")])
def test_transformers_settings_transformers_cannot_run_are_refused_with_the_reason(tmp_path, key, value, match):
    hf = _hf()
    hf.save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, key: value}))
    with pytest.raises(CheckpointError, match=match):
        vitkit.create_model("cvt_13", pretrained=str(tmp_path / "hf"))


def test_transformers_folder_infers_the_variant(tmp_path, capsys):
    from vitkit.cli.main import main
    from vitkit.families.cvt.formats import hf_infer
    from vitkit.specs import CheckpointView
    for name, dims, depth in (("cvt_13", [64, 192, 384], [1, 2, 10]), ("cvt_21", [64, 192, 384], [1, 4, 16]),
                              ("cvt_w24", [192, 768, 1024], [2, 2, 20]), ("cvt_13", [16, 32, 48], [1, 2, 3])):
        view = CheckpointView(frozenset(), {}, "folder", config=dict(model_type="cvt", embed_dim=dims, depth=depth))
        assert hf_infer(view) == (name, {})
    hf = _hf()
    hf.save_pretrained(tmp_path / "hf")
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "out")]) == 0
    assert "config depth=(1, 2, 3) taken from the checkpoint" in capsys.readouterr().out
    converted = vitkit.load_model(tmp_path / "out")
    assert converted.variant_name == "cvt_13" and converted.cfg.act_layer == "gelu"
    assert max_diff(_logits(converted), _logits(hf)) <= 1e-4


# ================================================================================================ the twin
@pytest.mark.parametrize("kw", [{}, dict(attn_scale="head_dim", norm_eps=1e-6)])
def test_transformers_twin_computes_the_same_function(kw):
    """The twin of ``bench --compare`` is written through the inverse of the reading table; transformers hard-codes
    GELU, so the official QuickGELU (and other numerics) are set on it."""
    pytest.importorskip("transformers")
    model = _tiny(**kw)
    hf = to_transformers(model)
    assert max_diff(_logits(hf), _logits(model)) <= 1e-4
    assert max_diff(_logits(hf, X_WIDE), _logits(model, X_WIDE)) <= 1e-4


def test_inverse_table_round_trips_and_the_twin_refuses_what_transformers_cannot_build():
    pytest.importorskip("transformers")
    state = _tiny().state_dict()
    back = HF.forward(HF.inverse(state))
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    with pytest.raises(ValueError, match=r"depth=\[1, 1, 2\].*stage\(s\) \[1, 2\]"):
        to_transformers(_tiny(depth=(1, 1, 2)))
    with pytest.raises(ValueError, match="class token"):
        to_transformers(_tiny(class_token=False))


# ============================================================================================ model details
def test_batchnorm_is_folded_only_in_eval_mode():
    proj = ConvProjection(8, 3, 2, 1)
    perturb_batchnorm_(randomize_(proj))
    x = torch.randn(2, 8, 7, 9)
    proj.eval()
    bn = proj.bn
    expected = F.batch_norm(proj.conv(x), bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    assert max_diff(proj(x), expected.flatten(2).transpose(1, 2)) < 1e-5  # (2, 4·5, 8)
    before = bn.running_mean.clone()
    proj.train()(x)
    assert not torch.equal(bn.running_mean, before)  # training still updates the statistics


def test_any_input_size_runs_the_same_weights(tmp_path):
    """No position embedding: a checkpoint built at 32 loaded for 64 is the same function, and the report says that
    nothing needed resizing."""
    small = _tiny()
    vitkit.save_pretrained(small, tmp_path / "small")
    big = vitkit.create_model("cvt_13", pretrained=str(tmp_path / "small"), img_size=64)
    x64 = torch.randn(2, 3, 64, 64)
    assert torch.equal(_logits(big, x64), _logits(small, x64))
    assert big.load_report.resized == []
    assert any("nothing to resize for 64x64" in n for n in big.load_report.notes)
    assert big.data_cfg.input_size == (3, 64, 64)


def test_forward_intermediates_is_the_three_stage_pyramid():
    model = _tiny()
    maps = model.forward_intermediates(X)
    assert [tuple(m.shape) for m in maps] == [(2, 16, 8, 8), (2, 32, 4, 4), (2, 48, 2, 2)]
    with torch.no_grad():
        tokens = model.forward_features(X)  # (B, 1 + 4, 48), normalised
        last = model.forward_intermediates(X, indices=[-1], norm=True)[0]
    assert torch.allclose(last.flatten(2).transpose(1, 2), tokens[:, 1:], atol=1e-6)
    assert max_diff(model.forward_intermediates(X_WIDE)[1], torch.zeros(1, 32, 4, 6)) > 0  # non-square grid


def test_record_attention_reports_the_grids():
    model = _tiny()
    with torch.no_grad(), vitkit.record_attention(model) as maps:
        model(X_WIDE)
    first, last = maps["stages.0.blocks.0.attn"], maps["stages.2.blocks.2.attn"]
    assert first.shape == (1, 1, 8 * 12, 4 * 6) and last.shape == (1, 3, 1 + 2 * 3, 1 + 1 * 2)
    assert maps.info["stages.2.blocks.2.attn"] == dict(grid=(2, 3), kv_grid=(1, 2), class_token=True)


def test_drop_path_follows_the_official_per_stage_rule():
    with torch.device("meta"):
        model = vitkit.create_model("cvt_21")
    rates = [[getattr(b.drop_path1, "p", 0.0) for b in s.blocks] for s in model.stages]
    assert rates[0] == [0.0] and rates[1] == [0.0] * 4
    assert rates[2] == pytest.approx(torch.linspace(0, 0.1, 16).tolist())  # official linspace over the stage


@pytest.mark.parametrize("override,match", [
    (dict(embed_dim=(64, 192)), "embed_dim has 2 entries but depth has 3"),
    (dict(num_heads=(1, 3, 5)), "384/5"),
    (dict(drop_path_rate=(0.0, 0.0, 1.0)), r"drop_path_rate\[2\]"),
    (dict(act_layer="relu"), "act_layer"),
])
def test_config_errors_name_the_field(override, match):
    with pytest.raises(ConfigError, match=match):
        vitkit.create_model("cvt_13", **override)


def test_catalog_names_hub_releases_only():
    for name in ("cvt_13", "cvt_21", "cvt_w24"):
        weights = vitkit.get_spec(name).weights
        assert weights.url.startswith("hf-hub:microsoft/cvt-") and weights.source_format == "hf"
        assert vitkit.get_spec(name).format(weights.source_format) is not None


# ====================================================================================== evaluation preprocessing
TRANSFORM_CASE = Path(__file__).parent / "data" / "official_eval_transform.safetensors"
# the official TEST settings of each reference (make_eval_transform_case.py): (H, W), crop_pct, crop_mode
EVAL_SETTINGS = {"squash_64": ((64, 64), 1.0, "squash"), "squash_80x48": ((48, 80), 1.0, "squash"),
                 "center_56": ((56, 56), 0.875, "center")}


@pytest.mark.parametrize("key", list(EVAL_SETTINGS))
@pytest.mark.parametrize("image", [0, 1])
def test_eval_transform_is_the_official_cvt_transform(key, image):
    """``predict``'s PIL transform with the data_cfg of each official TEST setting equals CvT's own
    ``build_transforms(cfg, is_train=False)`` run with torchvision
    (tests/families/cvt/data/make_eval_transform_case.py): CENTER_CROP False squashes the image to the size (crop_mode
    'squash'), True resizes the short side and crops."""
    from PIL import Image

    from vitkit.evaluate.preprocess import eval_transform
    from vitkit.specs import PreprocessConfig
    ref = load_file(TRANSFORM_CASE)
    (h, w), crop_pct, mode = EVAL_SETTINGS[key]
    img = Image.fromarray(ref[f"image_{image}"].numpy())
    cfg = PreprocessConfig(input_size=(3, h, w), crop_pct=crop_pct, crop_mode=mode)
    assert max_diff(eval_transform(cfg)(img), ref[f"{key}_{image}"]) <= 1e-5
    other = PreprocessConfig(input_size=(3, h, w), crop_pct=crop_pct, crop_mode="center" if mode == "squash" else
                             "squash")
    assert max_diff(eval_transform(other)(img), ref[f"{key}_{image}"]) > 0.5  # the other mode is another image


def test_the_384_weights_squash_in_predict_and_eval():
    """The 384 variants (official configs with TEST.CENTER_CROP False) carry crop_mode 'squash'; the 224 ones keep the
    aspect ratio. ``vitkit eval``'s dataset transform (uint8 tensors, antialiased ``F.interpolate``) takes the mode
    from the model and comes within resampling rounding of the official PIL transform."""
    from vitkit.evaluate.eval_data import dataset_transform, resolve_data_config
    for name in ("cvt_13_384", "cvt_21_384", "cvt_w24"):
        cfg = vitkit.get_spec(name).data_cfg
        assert (cfg.crop_mode, cfg.crop_pct, cfg.input_size) == ("squash", 1.0, (3, 384, 384)), name
    assert vitkit.get_spec("cvt_13").data_cfg.crop_mode == "center"
    model = vitkit.create_model("cvt_13_384", **TINY, img_size=64)
    data = resolve_data_config(model, {"name": "fake"})
    assert data.crop_mode == "squash" and data.img_size == 64
    ref = load_file(TRANSFORM_CASE)
    image = ref["image_0"].permute(2, 0, 1).contiguous()  # (3, 100, 150) uint8
    out = dataset_transform(data, model)(image)
    assert out.shape == (3, 64, 64) and (out - ref["squash_64_0"]).abs().mean() < 0.05
    centre = dataset_transform(resolve_data_config(model, {"name": "fake", "crop_mode": "center"}), model)(image)
    assert (centre - ref["squash_64_0"]).abs().mean() > 0.2
