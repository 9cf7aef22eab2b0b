"""PVT v2 against its three sources: the official code's own logits (``tests/families/pvt_v2/data``: whai362/PVT
``classification/pvt_v2.py`` run on random weights, B0 and the linear B2-Li layouts), timm's layout (the golden case
``timm_pvt_v2_b0`` runs in test_golden.py; here its key list), and transformers' ``PvtV2ForImageClassification`` on tiny
configs built here; plus the official key list, input sizes (nothing to resize) and the pyramid. The helpers are PVT
v1's (tests/families/pvt/test_pvt.py)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import vitkit
from vitkit.families.pvt_v2.formats import OFFICIAL
from vitkit.layers import DWConvMlp

from conftest import golden_root_path, max_diff, randomize_, skip_or_fail

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pvt"))  # PVT v1's test module holds the shared helpers
from test_pvt import (TINY, X64, assert_reproduces, eps_sensitive_, hf_logits, hf_model,  # noqa: E402
                      load_reference, logits, reference_case)

DATA = Path(__file__).resolve().parent / "data"

CASES = ["official_pvt_v2_b0_shrunk", "official_pvt_v2_b2_li_shrunk"]
HF_PARTS = ("patch_embedding.proj", "spatial_reduction")


# ----------------------------------------------------------------------------------------------- official code
@pytest.mark.parametrize("suffix", ["", "_48x80"])
@pytest.mark.parametrize("case_id", CASES)
def test_official_logits(case_id, suffix):
    """Both layouts reproduce the official model at 64×64 and at 48×80 (odd grids, padded overlapping convs; B2-Li
    pools a 2×1 last-stage map up to 7×7). The linear flag is read from the checkpoint's 1×1 reduction convs."""
    meta, io, folder = reference_case(case_id, DATA)
    model = load_reference(meta, folder)
    assert model.load_report.format == "official"
    assert model.cfg.linear == case_id.endswith("_li_shrunk")
    assert_reproduces(model, io, suffix, meta)


@pytest.mark.parametrize("case_id", CASES)
def test_the_reference_cases_pin_the_layer_norm_eps(case_id):
    meta, io, folder = reference_case(case_id, DATA)
    for field in ("embed_norm_eps", "sr_norm_eps"):
        wrong = load_reference(meta, folder, **{field: 1e-6})
        assert max_diff(logits(wrong, io["pixel_values"].float()), io["logits"]) > 1e-2, field


def test_official_key_list():
    """Written back through the inverse official table, pvt_v2_b0 has the 178 keys of the official file (the state
    dict of whai362/PVT@57e2dfa classification/pvt_v2.py, counted), with the official DWConv wrapper's
    ``dwconv.dwconv``."""
    with torch.device("meta"):
        model = vitkit.create_model("pvt_v2_b0")
    keys = OFFICIAL.inverse(model.state_dict())
    assert len(keys) == 178
    assert {"patch_embed1.proj.weight", "patch_embed4.norm.bias", "block1.0.mlp.dwconv.dwconv.weight",
            "block1.1.attn.sr.weight", "norm1.weight", "norm4.bias", "head.weight"} <= set(keys)


def test_vitkit_layout_is_timms():
    """The golden timm case's key list (keys.json, written by timm 1.0.31) is vitkit's state dict, shapes included."""
    root = golden_root_path()
    keys_file = root / "timm_pvt_v2_b0" / "keys.json"
    if not keys_file.is_file():
        skip_or_fail(f"golden case timm_pvt_v2_b0 not found under {root}")
    timm_keys = json.loads(keys_file.read_text())
    with torch.device("meta"):
        model = vitkit.create_model("pvt_v2_b0", depths=(1, 1, 1, 1))
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == timm_keys


# ------------------------------------------------------------------------------------------------- transformers
@pytest.mark.parametrize("linear,name", [(False, "pvt_v2_b0"), (True, "pvt_v2_b2_li")])
def test_transformers_parity(tmp_path, linear, name):
    """A tiny PvtV2ForImageClassification (eps-sensitive weights) loads with its own architecture and eps, the
    variant is inferred from config.json (the linear one for ``linear_attention``), and the logits agree."""
    from vitkit.registry import infer_variant
    hf = hf_model("PvtV2Config", "PvtV2ForImageClassification", HF_PARTS, linear_attention=linear)
    hf.save_pretrained(tmp_path / "hf")
    assert infer_variant(tmp_path / "hf")[0] == name
    model = vitkit.create_model("pvt_v2_b0", pretrained=str(tmp_path / "hf"))
    assert model.cfg.linear == linear and model.cfg.sr_norm_eps == 1e-6
    ref = hf_logits(hf, X64)
    assert ref.std() > 0.1
    assert max_diff(logits(model, X64), ref) <= 1e-5


@pytest.mark.parametrize("linear", [False, True])
def test_transformers_twin_computes_the_official_function(linear):
    from vitkit.bench.compare import to_transformers
    model = vitkit.create_model("pvt_v2_b0", img_size=64, num_classes=5, linear=linear, **TINY)
    eps_sensitive_(randomize_(model, 5), ("patch_embed", "downsample", "attn.sr")).eval()
    twin = to_transformers(model)
    assert max_diff(logits(model, X64), hf_logits(twin, X64)) <= 1e-5


def test_timm_file_at_a_second_resolution():
    """tests/families/pvt_v2/data/timm_second_size (timm itself): the 64-pixel file at 96 pixels, nothing resized."""
    from safetensors.torch import load_file
    folder = Path(__file__).parent / "data" / "timm_second_size"
    meta, io = json.loads((folder / "case.json").read_text()), load_file(folder / "io.safetensors")
    for size, suffix in ((64, ""), (96, "_96")):
        model = vitkit.create_model(meta["vitkit_model"], pretrained=str(folder / "model.safetensors"),
                                    num_classes=10, **{**meta["kwargs"], "img_size": size})
        assert model.load_report.format == "timm" and not model.load_report.resized
        assert max_diff(logits(model, io[f"pixel_values{suffix}"].float()), io[f"logits{suffix}"]) <= 1e-4


def test_transformers_folder_at_a_second_resolution(tmp_path):
    """A transformers folder of a 64-pixel model loaded at img_size 96 x 160 (nothing to resize: no position
    embedding) computes what transformers computes on those inputs."""
    hf = hf_model("PvtV2Config", "PvtV2ForImageClassification", HF_PARTS, image_size=64)
    hf.save_pretrained(tmp_path / "hf")
    model = vitkit.create_model("pvt_v2_b0", pretrained=str(tmp_path / "hf"), img_size=(96, 160))
    x = torch.randn(2, 3, 96, 160, generator=torch.Generator().manual_seed(12))
    assert not model.load_report.resized and max_diff(logits(model, x), hf_logits(hf, x)) <= 1e-5


# ------------------------------------------------------------------------------------------ input size, pyramid
def test_another_input_size_needs_nothing_resized(tmp_path):
    """No position embedding or bias table: the 64 model's weights load unchanged at 128 (the report says so), and
    the 128 model computes what the 64 model computes on 128 inputs."""
    small = randomize_(vitkit.create_model("pvt_v2_b0", img_size=64, **TINY)).eval()
    vitkit.save_pretrained(small, tmp_path / "small")
    big = vitkit.create_model("pvt_v2_b0", pretrained=str(tmp_path / "small"), img_size=128)
    report = big.load_report
    assert not report.resized and any("nothing to resize" in n for n in report.notes), report.summary()
    x = torch.randn(2, 3, 128, 128)
    assert torch.equal(logits(big, x), logits(small, x))


def test_forward_intermediates_is_the_four_stage_pyramid():
    model = randomize_(vitkit.create_model("pvt_v2_b0", img_size=64, **TINY)).eval()
    with torch.no_grad():
        maps = model.forward_intermediates(X64)
        pre = model.forward_head(model.forward_features(X64), pre_logits=True)
    assert [tuple(m.shape) for m in maps] == [(2, 8, 16, 16), (2, 16, 8, 8), (2, 24, 4, 4), (2, 32, 2, 2)]
    torch.testing.assert_close(maps[-1].mean(dim=(-2, -1)), pre)  # the classifier reads the mean of the last map


def test_dwconv_mlp_is_fc1_depthwise_conv_act_fc2():
    """The convolutional feed-forward written out: a 3×3 depth-wise conv over the token grid between the two dense
    layers, ReLU after fc1 in the linear variant."""
    torch.manual_seed(0)
    mlp = DWConvMlp(4, 8, extra_relu=True).eval()
    x = torch.randn(2, 6, 4)  # a 2×3 grid
    h = torch.relu(mlp.fc1(x)).transpose(1, 2).reshape(2, 8, 2, 3)
    h = torch.nn.functional.conv2d(h, mlp.dwconv.weight, mlp.dwconv.bias, padding=1, groups=8)
    expected = mlp.fc2(torch.nn.functional.gelu(h.flatten(2).transpose(1, 2)))
    torch.testing.assert_close(mlp(x, 2, 3), expected)


def test_catalog_names_timm_hub_repositories(tmp_path, monkeypatch):
    """Every variant's named weights are timm's Hub port (timm/<name>.in1k, timm's layout = vitkit's); a file placed
    where the catalog looks for it loads with pretrained=True as the timm format."""
    from safetensors.torch import save_file
    from vitkit.weights.hub import cached_path
    for name in vitkit.list_models("pvt_v2_*"):
        w = vitkit.get_spec(name).weights
        assert (w.url, w.source_format, w.filename) == (f"hf-hub:timm/{name}.in1k", "timm", "model.safetensors")
    monkeypatch.setenv("VITKIT_HOME", str(tmp_path))
    source = randomize_(vitkit.create_model("pvt_v2_b2_li", img_size=64, **TINY)).eval()
    dest = cached_path(vitkit.get_spec("pvt_v2_b2_li").weights)
    dest.parent.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(dest))
    model = vitkit.create_model("pvt_v2_b2_li", pretrained=True, img_size=64, **TINY)
    assert model.load_report.format == "timm"
    assert torch.equal(logits(model, X64), logits(source, X64))
