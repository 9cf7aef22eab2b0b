"""PVT v1 against its two sources: the official code's own logits (``tests/families/pvt/data``, made by running
whai362/PVT ``classification/pvt.py`` on random weights, see its README) at the native size and at two others, and
transformers' ``PvtForImageClassification`` on tiny configs built here; plus the official key list, the pyramid,
attention maps over the reduced keys, and config errors. Helpers for PVT v2's tests live here too."""
from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import vitkit
from vitkit.config import ConfigError
from vitkit.layers import PatchEmbed, record_attention
from vitkit.families.pvt import model as pvt_module
from vitkit.families.pvt.formats import OFFICIAL

from conftest import max_diff, randomize_

DATA = Path(__file__).resolve().parent / "data"
TINY = dict(embed_dims=(8, 16, 24, 32), num_heads=(1, 2, 3, 4), depths=(1, 1, 2, 1))


# ------------------------------------------------------------------------------------------ reference cases
def reference_case(case_id: str, data: Path = DATA) -> tuple[dict, dict[str, torch.Tensor], Path]:
    """A reference case of ``data`` (this family's folder by default; PVT v2's tests pass theirs)."""
    folder = data / case_id
    return json.loads((folder / "case.json").read_text()), load_file(str(folder / "io.safetensors")), folder


def load_reference(meta: dict, folder: Path, **overrides) -> torch.nn.Module:
    """The case's model exactly as ../shared/golden/check.py builds a golden case's."""
    kwargs = {**meta["kwargs"], **overrides}
    return vitkit.create_model(meta["vitkit_model"], pretrained=str(folder / meta["checkpoint"]),
                               num_classes=meta["num_classes"], **kwargs).eval()


def assert_reproduces(model, io, suffix: str, meta: dict) -> None:
    """logits and pre-logits of input ``pixel_values{suffix}`` within the case's atol + rtol·|ref|."""
    x = io[f"pixel_values{suffix}"].float()
    with torch.no_grad():
        out = model(x)
        pre = model.forward_head(model.forward_features(x), pre_logits=True)
    for got, ref in ((out, io[f"logits{suffix}"]), (pre, io[f"pre_logits{suffix}"])):
        assert got.shape == ref.shape
        ok = (got - ref).abs() <= meta["atol"] + meta["rtol"] * ref.abs()
        assert ok.all(), f"max |diff| {max_diff(got, ref):.3e}"


def eps_sensitive_(model: torch.nn.Module, parts: tuple[str, ...]) -> torch.nn.Module:
    """Scale the conv kernels whose names contain one of ``parts`` (the convs feeding the patch-embedding and
    spatial-reduction LayerNorms) by 0.005, as the reference cases do, so that those norms' eps shows in the logits."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 4 and any(s in name for s in parts):
                p.mul_(0.005)
    return model


def hf_model(config_name: str, model_name: str, parts: tuple[str, ...], seed: int = 7, **kw):
    transformers = pytest.importorskip("transformers")  # a test dependency (pyproject [test])
    config = getattr(transformers, config_name)(hidden_sizes=[8, 16, 24, 32], num_attention_heads=[1, 2, 3, 4],
                                                depths=[1, 1, 2, 1], num_labels=5, **kw)
    return eps_sensitive_(randomize_(getattr(transformers, model_name)(config), seed), parts).eval()


def hf_logits(hf, x):
    with torch.no_grad():
        return hf(pixel_values=x).logits


def logits(model, x):
    with torch.no_grad():
        return model.eval()(x)


X64 = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(11))
CASE = reference_case("official_pvt_tiny_shrunk")


# ----------------------------------------------------------------------------------------------- official code
@pytest.mark.parametrize("suffix", ["", "_32", "_48x80"])
def test_official_logits_at_the_native_size_and_resampled_at_forward_time(suffix):
    """A model built at 64 reproduces the official model at 64, and at 32×32 and 48×80, where every stage's position
    embedding is resampled while the forward runs (bilinear, as ``_get_pos_embed``)."""
    meta, io, folder = CASE
    model = load_reference(meta, folder)
    report = model.load_report
    assert report.format == "official" and report.upcast and not report.resized
    assert_reproduces(model, io, suffix, meta)


@pytest.mark.parametrize("size,suffix", [((32, 32), "_32"), ((48, 80), "_48x80")])
def test_loading_at_another_size_resamples_as_the_official_forward(size, suffix):
    """Built at another size, the model resamples the stored embeddings once, at load time, the way the official
    forward does on every call: the official 64 model's logits at that size come out, and the report says how."""
    meta, io, folder = CASE
    model = load_reference(meta, folder, img_size=size)
    resized = model.load_report.resized
    assert len(resized) == 4 and all("bilinear without antialiasing" in r for r in resized), resized
    assert [s.grid for s in model.stages] == pvt_module.stage_grids(size)  # no resampling left for the forward
    assert_reproduces(model, io, suffix, meta)


OPTIONS = reference_case("official_pvt_options")


@pytest.mark.parametrize("size,suffix", [(None, ""), ((96, 96), "_96x96"), ((80, 128), "_80x128")])
def test_official_options_patch_size_and_qk_scale(size, suffix):
    """``patch_size`` 8 and ``qk_scale`` against the official code (tests/families/pvt/data/official_pvt_options). The
    official position embeddings of stages 2-4 are sized for a 4-pixel patch and resampled on every call; vitkit
    resamples them once at load (the same bilinear interpolation), to the model's real grids, so a model built for
    each input size gives the official logits."""
    meta, io, folder = OPTIONS
    model = load_reference(meta, folder, **({"img_size": size} if size else {}))
    assert model.stages[0].blocks[0].attn.scale == 0.3 and model.patch_embed.proj.kernel_size == (8, 8)
    assert any("stages.1.pos_embed" in r for r in model.load_report.resized)
    assert_reproduces(model, io, suffix, meta)


@pytest.mark.parametrize("name, option, match", [
    ("pvt_tiny", dict(num_stages=3), "num_stages .*embed_dims"), ("pvt_v2_b0", dict(patch_size=4), "nothing reads it")])
def test_official_options_vitkit_does_not_take_name_the_reason(name, option, match):
    with pytest.raises(ConfigError, match=match):
        vitkit.create_model(name, **option)


def test_the_reference_case_pins_eps_and_interpolation(monkeypatch):
    """The case can fail: 1e-6 in either 1e-5 LayerNorm, or bicubic resampling, moves the logits far beyond 1e-4."""
    meta, io, folder = CASE
    for field in ("embed_norm_eps", "sr_norm_eps"):
        wrong = load_reference(meta, folder, **{field: 1e-6})
        assert max_diff(logits(wrong, io["pixel_values"].float()), io["logits"]) > 1e-2, field
    bicubic = partial(pvt_module.resample_pos_embed, antialias=True)
    monkeypatch.setattr(pvt_module, "resample_pos_embed",
                        lambda pos, new, old, prefix, mode, antialias: bicubic(pos, new, old, prefix, "bicubic"))
    model = load_reference(meta, folder)
    assert max_diff(logits(model, io["pixel_values_48x80"].float()), io["logits_48x80"]) > 1e-3


def test_where_the_official_forward_skips_or_fails_vitkit_resamples_every_stage(monkeypatch):
    """The official ``_get_pos_embed`` compares a stage's patch count with stage 1's: on the 64 model it leaves stage 1
    as it is for a 32×128 input (8×32 = 16×16 patches) and fails at 128×128 (stage 2's 16×16 grid; checked on the
    official code). vitkit resamples each stage whose grid differs from its own and runs at both sizes."""
    meta, _, folder = CASE
    model = load_reference(meta, folder)
    resampled = []
    real = pvt_module.resample_pos_embed
    monkeypatch.setattr(pvt_module, "resample_pos_embed", lambda pos, new, *a, **k: (resampled.append(new),
                                                                                      real(pos, new, *a, **k))[1])
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 128))
        assert resampled == [(8, 32), (4, 16), (2, 8), (1, 4)]
        assert torch.isfinite(model(torch.randn(1, 3, 128, 128))).all()


def test_official_key_list():
    """vitkit's weights written back through the inverse official table give exactly the 161 keys of the official
    PVT-Tiny (the state dict of whai362/PVT@57e2dfa classification/pvt.py, counted): stage 4 has no reduction conv or
    norm."""
    with torch.device("meta"):
        model = vitkit.create_model("pvt_tiny")
    keys = OFFICIAL.inverse(model.state_dict())
    assert len(keys) == 161
    assert {"pos_embed1", "pos_embed4", "cls_token", "patch_embed1.norm.bias", "block1.0.attn.kv.weight",
            "block1.0.attn.sr.weight", "block1.0.attn.norm.weight", "block4.1.mlp.fc2.bias", "norm.weight",
            "head.bias"} <= set(keys)
    assert not any(k.startswith("block4.") and ".attn.sr." in k for k in keys)
    assert keys["pos_embed4"].shape == (1, 50, 512)  # 7×7 + the class token


# ------------------------------------------------------------------------------------------------- transformers
PVT_HF_PARTS = ("projection", "sequence_reduction")


def test_transformers_parity(tmp_path):
    """A tiny PvtForImageClassification (eps-sensitive weights) saved with save_pretrained loads with its own
    architecture and transformers' single layer_norm_eps, and gives transformers' logits."""
    hf = hf_model("PvtConfig", "PvtForImageClassification", PVT_HF_PARTS, image_size=64)
    hf.save_pretrained(tmp_path / "hf")
    saved = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert set(saved) == set(hf.state_dict())  # 4.x files and 5.x modules share one layout: one table reads both
    model = vitkit.create_model("pvt_tiny", pretrained=str(tmp_path / "hf"))
    ref = hf_logits(hf, X64)
    assert ref.std() > 0.1
    assert max_diff(logits(model, X64), ref) <= 1e-5
    notes = "\n".join(model.load_report.notes)
    for key, value in dict(embed_norm_eps=1e-6, sr_norm_eps=1e-6, depths=(1, 1, 2, 1), img_size=64,
                           num_classes=5).items():
        assert f"config {key}={value!r} taken from the checkpoint" in notes, key
    official_eps = vitkit.create_model("pvt_tiny", pretrained=str(tmp_path / "hf"), embed_norm_eps=1e-5,
                                       sr_norm_eps=1e-5)
    assert max_diff(logits(official_eps, X64), ref) > 1e-3  # the eps really is the checkpoint's to decide


def test_transformers_cannot_run_a_second_resolution_so_the_official_scheme_applies(tmp_path):
    """transformers' PVT cannot run another input size (``PvtPatchEmbeddings.interpolate_pos_encoding`` reshapes the
    stored table to the new grid before interpolating: a RuntimeError in transformers 5.x), so there is no
    transformers reference there; vitkit loads its files at another size with the official bilinear resampling."""
    hf = hf_model("PvtConfig", "PvtForImageClassification", PVT_HF_PARTS, image_size=64)
    hf.save_pretrained(tmp_path / "hf")
    x = torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(13))
    with pytest.raises(RuntimeError):
        hf_logits(hf, x)
    model = vitkit.create_model("pvt_tiny", pretrained=str(tmp_path / "hf"), img_size=96)
    resized = model.load_report.resized
    assert len(resized) == 4 and all("bilinear without antialiasing" in r for r in resized)
    assert torch.isfinite(logits(model, x)).all()


def test_transformers_weights_without_config(tmp_path):
    """A bare transformers state dict (a Hub repository's model.safetensors alone) still reads with transformers'
    default eps."""
    hf = hf_model("PvtConfig", "PvtForImageClassification", PVT_HF_PARTS, image_size=64)
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(tmp_path / "model.safetensors"))
    model = vitkit.create_model("pvt_tiny", pretrained=str(tmp_path / "model.safetensors"), img_size=64, **TINY)
    assert model.load_report.format == "hf"
    assert max_diff(logits(model, X64), hf_logits(hf, X64)) <= 1e-5


def test_transformers_twin_computes_the_official_function():
    """The twin (bench --compare) holds vitkit's weights through the inverse table, with the official 1e-5 norms
    set on transformers' modules, and gives vitkit's logits."""
    from vitkit.bench.compare import to_transformers
    model = vitkit.create_model("pvt_tiny", img_size=64, num_classes=5, **TINY)
    eps_sensitive_(randomize_(model, 3), ("patch_embed", "downsample", "attn.sr")).eval()
    twin = to_transformers(model)
    assert max_diff(logits(model, X64), hf_logits(twin, X64)) <= 1e-5
    assert twin.pvt.encoder.patch_embeddings[1].layer_norm.eps == 1e-5
    assert twin.pvt.encoder.block[0][0].layer_norm_1.eps == 1e-6


def test_convert_infers_the_variant_of_a_transformers_folder(tmp_path):
    from vitkit.cli.main import main
    hf = hf_model("PvtConfig", "PvtForImageClassification", PVT_HF_PARTS, image_size=64)
    hf.save_pretrained(tmp_path / "hf")
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "out")]) == 0
    model = vitkit.load_model(tmp_path / "out")
    assert model.variant_name == "pvt_tiny" and model.cfg.depths == (1, 1, 2, 1)
    assert max_diff(logits(model, X64), hf_logits(hf, X64)) <= 1e-5


# ------------------------------------------------------------------------------------- pyramid and attention
def test_forward_intermediates_is_the_four_stage_pyramid():
    model = randomize_(vitkit.create_model("pvt_tiny", img_size=64, **TINY)).eval()
    with torch.no_grad():
        maps = model.forward_intermediates(X64)
        last = model.forward_intermediates(X64, indices=[-1], norm=True)[0]
        tokens = model.forward_features(X64)  # (B, 1 + 2·2, C) after the final norm
    assert [tuple(m.shape) for m in maps] == [(2, 8, 16, 16), (2, 16, 8, 8), (2, 24, 4, 4), (2, 32, 2, 2)]
    torch.testing.assert_close(last, tokens[:, 1:].transpose(1, 2).reshape(2, 32, 2, 2))
    assert not torch.allclose(maps[-1], last)  # norm=False leaves the last stage un-normalised


def test_attention_maps_read_the_spatially_reduced_keys():
    model = randomize_(vitkit.create_model("pvt_tiny", img_size=64, **TINY)).eval()
    with torch.no_grad(), record_attention(model) as maps:
        model(X64)
    first, last = maps["stages.0.blocks.0.attn"], maps["stages.3.blocks.0.attn"]
    assert first.shape == (2, 1, 256, 4)  # 16×16 queries, keys from the 8×8-reduced 2×2 map
    assert maps.info["stages.0.blocks.0.attn"] == dict(grid=(16, 16), kv_grid=(2, 2), class_token=False)
    assert last.shape == (2, 4, 5, 5)  # no reduction in the last stage: the class token is the first key
    assert maps.info["stages.3.blocks.0.attn"] == dict(grid=(2, 2), kv_grid=(2, 2), class_token=True)


# --------------------------------------------------------------------------------------------- configuration
@pytest.mark.parametrize("override,message", [
    (dict(sr_ratios=(8, 4, 2, 2)), "sr_ratios\\[-1\\] must be 1"),
    (dict(depths=(2, 2, 2)), "depths must have 4 entries"),
    (dict(embed_dims=(64, 128, 320, 510)), "embed_dims\\[3\\] = 510 is not divisible by num_heads\\[3\\] = 8"),
    (dict(embed_norm_eps=0.0), "embed_norm_eps must be positive"),
])
def test_bad_config_is_an_error_naming_the_field(override, message):
    with pytest.raises(ConfigError, match=message):
        vitkit.create_model("pvt_tiny", **override)


def test_an_input_below_32_pixels_is_a_value_error():
    model = vitkit.create_model("pvt_tiny", img_size=64, **TINY)
    for run in (model, model.forward_intermediates):
        with pytest.raises(ValueError, match="smaller than 32x32"):
            run(torch.randn(1, 3, 28, 64))


def test_patch_embedding_floors_like_the_official_conv_only_when_asked():
    embed = PatchEmbed(5, 2, 3, 4, strict_img_size=False, drop_remainder=True, output_fmt="NHWC")
    assert embed(torch.randn(1, 3, 5, 7)).shape == (1, 2, 3, 4)
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        PatchEmbed(4, 2, 3, 4, strict_img_size=False)(torch.randn(1, 3, 5, 7))


def test_stage_grids_follow_the_official_patch_embeddings():
    """The official stage i embeds an image of img_size // 2^(i+1) with patch 2 (4 for stage 1): H//4, H//8, …"""
    assert pvt_module.stage_grids(224) == [(56, 56), (28, 28), (14, 14), (7, 7)]
    assert pvt_module.stage_grids((200, 100)) == [(50, 25), (25, 12), (12, 6), (6, 3)]
    assert all(math.prod(g) > 0 for g in pvt_module.stage_grids(32))


def test_catalog_names_hub_repositories_that_load_through_their_format(tmp_path, monkeypatch):
    """Named weights are transformers' Hub copies (no hash-less release URL); a file of that format placed where the
    catalog looks for it loads with pretrained=True and gives transformers' logits."""
    from vitkit.weights.hub import cached_path
    named = {n: vitkit.get_spec(n).weights for n in vitkit.list_models("pvt_[tsml]*")}
    assert {n: w.url for n, w in named.items() if w} == {"pvt_tiny": "hf-hub:Zetatech/pvt-tiny-224",
                                                          "pvt_medium": "hf-hub:Zetatech/pvt-medium-224",
                                                          "pvt_large": "hf-hub:Zetatech/pvt-large-224"}
    assert all(w.source_format == "hf" and w.filename == "model.safetensors" for w in named.values() if w)
    monkeypatch.setenv("VITKIT_HOME", str(tmp_path))
    hf = hf_model("PvtConfig", "PvtForImageClassification", PVT_HF_PARTS, image_size=64)
    dest = cached_path(named["pvt_tiny"])
    dest.parent.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(dest))
    model = vitkit.create_model("pvt_tiny", pretrained=True, img_size=64, **TINY)
    assert model.load_report.format == "hf"
    assert max_diff(logits(model, X64), hf_logits(hf, X64)) <= 1e-5
