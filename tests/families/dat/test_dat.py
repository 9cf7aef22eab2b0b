"""DAT (CVPR 2022; its golden case runs in test_golden.py): reference cases made with the official LeapLabTHU/DAT code
at 566a593 (tests/families/dat/data: the switches the released configs leave off, the official ``load_pretrained``
resize, the official forward's sampling points), the official key list of DAT-B@384, checkpoint buffers checked rather
than trusted, the deformable layer's point conventions and the contract's ``sampling_points``, configs. DAT++, built on
DAT, is tested in tests/families/dat_pp."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import vitkit
from vitkit.config import ConfigError
from vitkit.families.dat.formats import _to_dense, official_keymap
from vitkit.layers import DWConvMlp
from vitkit.layers.deformable_attention import points_to_pixels, reference_points
from vitkit.weights import CheckpointMismatchError

from conftest import golden_close, max_diff, randomize_

DATA = Path(__file__).parent / "data"
CASES = ("official_dat_v1_options", "official_dat_v1_dwc_pes")


def _case(name: str, data: Path = DATA) -> tuple[dict, dict]:
    return json.loads((data / name / "case.json").read_text()), load_file(str(data / name / "io.safetensors"))


def _load(name: str, data: Path = DATA, **overrides):
    meta, _ = _case(name, data)
    return vitkit.create_model(meta["vitkit_model"], pretrained=str(data / name / "checkpoint.pth"),
                               num_classes=meta["num_classes"], **{**meta["kwargs"], **overrides}).eval()


def _outputs(model, x):
    with torch.no_grad():
        feats = model.forward_features(x)
        return model.forward_head(feats), model.forward_head(feats, pre_logits=True)


def _same_points(got: dict, expected: dict) -> None:
    """Two ``{layer: points}`` dicts hold the same layers, keys, grids and (bit for bit) the same tensors."""
    assert sorted(got) == sorted(expected)
    for layer, points in expected.items():
        assert sorted(got[layer]) == sorted(points) and got[layer]["grid"] == points["grid"]
        for key in ("positions", "references", "pixels", "reference_pixels"):
            torch.testing.assert_close(got[layer][key], points[key], atol=0, rtol=0)


# ============================================================================================ official reference
@pytest.mark.parametrize("name", CASES)
def test_official_reference_cases(name):
    """Logits and the classifier's input of the official code, from its own release container (buffers included,
    checked equal to vitkit's)."""
    meta, io = _case(name)
    model = _load(name)
    logits, pre = _outputs(model, io["pixel_values"].float())
    assert golden_close(logits, io["logits"]) and golden_close(pre, io["pre_logits"]), max_diff(logits, io["logits"])
    report = model.load_report
    assert report.format == "official" and report.upcast and not report.resized and not report.reinitialized
    assert any("checked equal to vitkit's" in n for n in report.notes)  # window blocks: their buffers are in the file


def test_official_load_pretrained_resize_v1():
    """The official ``DAT.load_pretrained`` into a 192×192 model with windows (6, 6, 6, 3): bias tables resized
    bicubically (window tables 7×7 → 11×11, the deformable rpe_table 7×7 → 11×11), buffers recomputed: vitkit's
    loader at img_size=192 gives the official logits and says what it did."""
    _, io = _case("official_dat_v1_options")
    model = _load("official_dat_v1_options", img_size=192, window_sizes=(6, 6, 6, 3))
    logits, pre = _outputs(model, io["pixel_values_192"].float())
    assert golden_close(logits, io["logits_192"]) and golden_close(pre, io["pre_logits_192"]), max_diff(logits, io["logits_192"])
    resized = " ".join(model.load_report.resized)
    assert "relative_position_bias_table (49, 1) → (121, 1)" in resized and "rpe_table (4, 7, 7) → (4, 11, 11)" in resized
    assert any("recomputed" in n for n in model.load_report.notes)


@pytest.mark.parametrize("name, size, resized", [
    ("official_dat_v1_dwc_pes", 96, ["stages.2.blocks.0.attn.rpe_table (2, 7, 7) → (2, 11, 11) (bicubic)"]),
])
def test_ablation_cases_at_a_second_size(name, size, resized):
    """The ablation case loaded by the official ``load_pretrained`` into a model of another size (``case.json``
    ``resized_constructor``): v1 with ``dwc_pes`` (its conv has nothing to resize) next to a bias table."""
    meta, io = _case(name)
    model = _load(name, img_size=size, window_sizes=(6, 6, 3, 3))
    logits, pre = _outputs(model, io[f"pixel_values_{size}"].float())
    assert golden_close(logits, io[f"logits_{size}"]) and golden_close(pre, io[f"pre_logits_{size}"]), \
        max_diff(logits, io[f"logits_{size}"])
    assert set(resized) <= set(model.load_report.resized)


def test_ablation_parts_are_built_and_loaded():
    """What the v1 ablation case exercises is really there: the dwc_pe conv (official ``rpe_table`` Conv2d) as
    ``lepe``, no bias table."""
    v1 = _load("official_dat_v1_dwc_pes")
    attn = v1.stages[3].blocks[1].attn
    assert attn.position_encoding == "dwc" and attn.lepe.weight.shape == (64, 1, 3, 3) and attn.rpe_table is None


def test_deformable_points_are_the_official_forward_outputs():
    """``deformable_points`` gives what the official forward returns besides the logits: per deformable block the
    sampled positions and the reference points, (B, groups, Hk, Wk, 2) in normalised (y, x)."""
    _, io = _case("official_dat_v1_options")
    model = _load("official_dat_v1_options")
    with torch.no_grad():
        logits, points = model.deformable_points(io["pixel_values"].float())
    assert golden_close(logits, io["logits"])
    assert sorted(points) == ["stages.2.blocks.0.attn", "stages.3.blocks.1.attn"]
    for name, got in points.items():
        i, j = name.split(".")[1], name.split(".")[3]
        torch.testing.assert_close(got["positions"], io[f"positions.{i}.{j}"], atol=1e-5, rtol=0)
        torch.testing.assert_close(got["references"], io[f"references.{i}.{j}"], atol=0, rtol=0)
        assert got["pixels"].shape == got["positions"].shape
        assert got["pixels"].min() >= 0 and got["pixels"].max() <= 128  # offsets are bounded in the image
    assert points["stages.2.blocks.0.attn"]["positions"].shape == (2, 2, 4, 4, 2)  # stride 2 on an 8×8 map


def test_sampling_points_are_the_points_of_deformable_points():
    """The family contract's optional ``sampling_points`` is the points part of ``deformable_points``: the same
    deformable layers, and per layer the same pixels, reference pixels, normalised points and grid; on the official
    case too, where those are the official forward's."""
    model = randomize_(vitkit.create_model("dat_tiny", **vitkit.get_spec("dat_tiny").tiny)).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, points = model.deformable_points(x)
        got = model.sampling_points(x)
    assert sorted(got) == ["stages.2.blocks.1.attn", "stages.3.blocks.1.attn"]
    _same_points(got, points)
    assert got["stages.2.blocks.1.attn"]["pixels"].shape == (2, 1, 4, 4, 2)  # groups 1, stride 1 on a 4×4 map
    _, io = _case("official_dat_v1_options")
    official = _load("official_dat_v1_options")
    with torch.no_grad():
        _same_points(official.sampling_points(io["pixel_values"].float()),
                     official.deformable_points(io["pixel_values"].float())[1])


# ================================================================================================ official keys
def test_official_key_list_converts_to_the_full_variant():
    """Every key of the official state_dict of DAT-B@384 (v1), with its shape, converts to exactly the model's keys
    and shapes (1×1 convs become dense layers)."""
    official = json.loads((DATA / "official_keys.json").read_text())["dat_base_384"]
    state = {k: torch.empty(shape, device="meta") for k, shape in official.items()}
    converted = _to_dense(official_keymap("patch_proj.3.weight" in state).forward(state))
    with torch.device("meta"):
        model = vitkit.create_model("dat_base_384")
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in converted.items()} == ours


def test_official_buffers_are_checked_not_trusted(tmp_path):
    """A shifted-window mask that is not the one the official code computes (shift ⌈w / 2⌉, −100) is refused; a file
    without the buffers loads with the model's own."""
    ckpt = torch.load(DATA / "official_dat_v1_options" / "checkpoint.pth", weights_only=True)
    meta, io = _case("official_dat_v1_options")
    bad = {k: v.clone() for k, v in ckpt["model"].items()}
    bad["stages.0.attns.1.attn_mask"][0, 0, 1] = -50.0
    torch.save({"model": bad}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointMismatchError, match=r"shifted-window mask DAT computes .* stages\.0\.blocks\.1"):
        vitkit.create_model("dat_tiny", pretrained=str(tmp_path / "bad.pth"), num_classes=10, **meta["kwargs"])
    bare = {k: v for k, v in ckpt["model"].items() if not k.endswith(("attn_mask", "relative_position_index"))}
    torch.save({"model": bare}, tmp_path / "bare.pth")
    model = vitkit.create_model("dat_tiny", pretrained=str(tmp_path / "bare.pth"), num_classes=10,
                                **meta["kwargs"]).eval()
    assert golden_close(_outputs(model, io["pixel_values"].float())[0], io["logits"])


# ================================================================================================ configuration
@pytest.mark.parametrize("overrides, match", [
    (dict(stage_spec=(("L", "S"), ("L", "S"), ("N", "D") * 3, ("L", "D"))), r"stage_spec\[2\]\[0\]"),
    (dict(fixed_pes=(False, False, True, True)), r"fixed_pes\[2\]: the official code cannot run it: .*self.n_sample"),
    (dict(no_offs=(False, False, False, True)), r"no_offs\[3\]: .*Tensor.fill does not exist"),
    (dict(groups=(-1, -1, 5, 6)), r"groups\[2\] = 5"),
    (dict(img_size=200), "multiple of 32"),
    (dict(dims=(96, 192, 384, 720)), r"dims\[3\] = 720 must be 2 x dims\[2\]"),
    (dict(depths=(2, 2, 4, 2)), r"stage_spec\[2\]"),
    (dict(sr_ratios=(8, 4, 2, 1)), r"sr_ratios \(an argument of the official dat constructor\): no block of DAT v1"),
])
def test_bad_configs_name_the_field(overrides, match):
    with pytest.raises(ConfigError, match=match):
        vitkit.create_model("dat_tiny", **overrides)


def test_input_of_another_size_is_a_clear_error():
    model = vitkit.create_model("dat_tiny", **vitkit.get_spec("dat_tiny").tiny)
    with pytest.raises(ValueError, match=r"built for 64x64 .* img_size=\(96, 96\)"):
        model(torch.randn(1, 3, 96, 96))


# ========================================================================================== deformable attention
def test_points_to_pixels_is_where_grid_sample_reads():
    """Sample a map whose values are the image coordinates of its feature pixels' centres (bilinear,
    align_corners=True, as the deformable layer samples): the result is ``points_to_pixels`` of the points."""
    H, W, img = 7, 5, (56, 40)
    ys = (torch.arange(H) + 0.5) * img[0] / H
    xs = (torch.arange(W) + 0.5) * img[1] / W
    coords = torch.stack(torch.meshgrid(xs, ys, indexing="xy"))[None]  # (1, 2, H, W): x, y of each centre
    points = torch.rand(1, 3, 4, 2) * 2 - 1  # normalised (y, x)
    sampled = F.grid_sample(coords, points.flip(-1), mode="bilinear", align_corners=True)  # (1, 2, 3, 4)
    torch.testing.assert_close(points_to_pixels(points, (H, W), img)[0], sampled[0].permute(1, 2, 0))


def test_reference_point_conventions():
    """v1: (i + 0.5) / n · 2 − 1 for reference points and queries (official ``_get_ref_points`` at 566a593); DAT++'s
    convention is tested in tests/families/dat_pp."""
    n = 4
    v1 = reference_points((n, n), "over_n")[:, 0, 0]
    torch.testing.assert_close(v1, torch.tensor([-0.75, -0.25, 0.25, 0.75]))


# ============================================================================================ shared MLP variant
def test_dwconv_mlp_maps_and_tokens_agree():
    """The conv-MLP takes (B, N, C) tokens with the grid, or (B, H, W, C) maps; ``dw_residual`` adds the conv's
    input back (DAT++), which the plain one (PVT v2, DAT v1) does not."""
    for residual in (False, True):
        mlp = randomize_(DWConvMlp(8, 32, dw_residual=residual)).eval()
        x = torch.randn(2, 5, 6, 8)
        with torch.no_grad():
            assert max_diff(mlp(x), mlp(x.flatten(1, 2), 5, 6).view(2, 5, 6, 8)) == 0
            h = mlp.fc1(x).permute(0, 3, 1, 2)
            h = mlp.dwconv(h) + (h if residual else 0)
            ref = mlp.fc2(F.gelu(h.permute(0, 2, 3, 1)))
        assert max_diff(mlp(x), ref) < 1e-5
