"""DAT (CVPR 2022) and DAT++ (their golden cases run in test_golden.py): reference cases made with the official
LeapLabTHU/DAT code (tests/data/dat: the switches the released configs leave off, the official ``load_pretrained``
resize, DAT++ run at another size, the official forward's sampling points), the official key lists of DAT-B@384 and
DAT-B++, checkpoint buffers checked rather than trusted, the two versions told apart, neighbourhood attention against
a brute-force masked attention written from the definition, the deformable layer's point conventions, configs."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import vitkit
from vitkit.config import ConfigError
from vitkit.layers import DWConvMlp, NeighborhoodAttention
from vitkit.layers.deformable_attention import points_to_pixels, reference_points
from vitkit.layers.neighborhood_attention import (neighborhood_attention, neighborhood_attention_dense,
                                                  neighborhood_attention_to_grid)
from vitkit.models.dat_formats import _to_dense, official_keymap
from vitkit.weights import CheckpointMismatchError

from conftest import max_diff, randomize_

DATA = Path(__file__).parent / "data" / "dat"
CASES = ("official_dat_v1_options", "official_dat_pp_options", "official_dat_pp_runtime_size",
         "official_dat_v1_dwc_pes", "official_dat_pp_ablations")


def _case(name: str) -> tuple[dict, dict]:
    return json.loads((DATA / name / "case.json").read_text()), load_file(str(DATA / name / "io.safetensors"))


def _load(name: str, **overrides):
    meta, _ = _case(name)
    return vitkit.create_model(meta["vitkit_model"], pretrained=str(DATA / name / "checkpoint.pth"),
                               num_classes=meta["num_classes"], **{**meta["kwargs"], **overrides}).eval()


def _close(out: torch.Tensor, ref: torch.Tensor) -> bool:
    return bool(((out - ref).abs() <= 1e-4 + 1e-4 * ref.abs()).all())


def _outputs(model, x):
    with torch.no_grad():
        feats = model.forward_features(x)
        return model.forward_head(feats), model.forward_head(feats, pre_logits=True)


# ============================================================================================ official reference
@pytest.mark.parametrize("name", CASES)
def test_official_reference_cases(name):
    """Logits and the classifier's input of the official code, from its own release container (buffers included,
    checked equal to vitkit's)."""
    meta, io = _case(name)
    model = _load(name)
    logits, pre = _outputs(model, io["pixel_values"].float())
    assert _close(logits, io["logits"]) and _close(pre, io["pre_logits"]), max_diff(logits, io["logits"])
    report = model.load_report
    assert report.format == "official" and report.upcast and not report.resized and not report.reinitialized
    if "v1" in name or "pp_options" in name:  # window blocks: their index and mask buffers are in the file
        assert any("checked equal to vitkit's" in n for n in report.notes)


def test_official_load_pretrained_resize_v1():
    """The official ``DAT.load_pretrained`` into a 192×192 model with windows (6, 6, 6, 3): bias tables resized
    bicubically (window tables 7×7 → 11×11, the deformable rpe_table 7×7 → 11×11), buffers recomputed: vitkit's
    loader at img_size=192 gives the official logits and says what it did."""
    _, io = _case("official_dat_v1_options")
    model = _load("official_dat_v1_options", img_size=192, window_sizes=(6, 6, 6, 3))
    logits, pre = _outputs(model, io["pixel_values_192"].float())
    assert _close(logits, io["logits_192"]) and _close(pre, io["pre_logits_192"]), max_diff(logits, io["logits_192"])
    resized = " ".join(model.load_report.resized)
    assert "relative_position_bias_table (49, 1) → (121, 1)" in resized and "rpe_table (4, 7, 7) → (4, 11, 11)" in resized
    assert any("recomputed" in n for n in model.load_report.notes)


@pytest.mark.parametrize("name, size, resized", [
    ("official_dat_v1_dwc_pes", 96, ["stages.2.blocks.0.attn.rpe_table (2, 7, 7) → (2, 11, 11) (bicubic)"]),
    ("official_dat_pp_ablations", 160, [f"stages.3.blocks.{j}.attn.rpe_table (4, 16, 16) → (4, 25, 25) (bicubic)"
                                        for j in (0, 1)]),
])
def test_ablation_cases_at_a_second_size(name, size, resized):
    """The ablation cases loaded by the official ``load_pretrained`` into a model of another size (``case.json``
    ``resized_constructor``): v1 with ``dwc_pes`` (its conv has nothing to resize) next to a bias table; DAT++ with
    ``fixed_pes``, whose (heads, H·W, Hk·Wk) bias the official code interpolates bicubically like any rpe_table."""
    meta, io = _case(name)
    windows = {"official_dat_v1_dwc_pes": dict(window_sizes=(6, 6, 3, 3))}.get(name, {})
    model = _load(name, img_size=size, **windows)
    logits, pre = _outputs(model, io[f"pixel_values_{size}"].float())
    assert _close(logits, io[f"logits_{size}"]) and _close(pre, io[f"pre_logits_{size}"]), \
        max_diff(logits, io[f"logits_{size}"])
    assert set(resized) <= set(model.load_report.resized)


def test_ablation_parts_are_built_and_loaded():
    """What the two ablation cases exercise is really there: the dwc_pe conv (official ``rpe_table`` Conv2d) as
    ``lepe``, the fixed bias, a deformable layer without offsets (and without a position encoding), and DAT++'s 'X',
    'P', 'E', 'Q' blocks; the layer scales the official stage builds for an 'X' block are dropped with a note."""
    v1 = _load("official_dat_v1_dwc_pes")
    attn = v1.stages[3].blocks[1].attn
    assert attn.position_encoding == "dwc" and attn.lepe.weight.shape == (64, 1, 3, 3) and attn.rpe_table is None
    pp = _load("official_dat_pp_ablations")
    kinds = [[type(b.attn).__name__ if hasattr(b, "attn") else type(b).__name__ for b in stage.blocks]
             for stage in pp.stages]
    assert kinds == [["ConvBlock", "PyramidAttention"], ["SlideAttention", "LearnedQueries1x1", "DeformableAttention"],
                     ["DeformableAttention", "WindowAttention"], ["DeformableAttention", "DeformableAttention"]]
    no_off, dwc, fixed = pp.stages[1].blocks[2].attn, pp.stages[2].blocks[0].attn, pp.stages[3].blocks[0].attn
    assert not no_off.use_offsets and no_off.position_encoding is None and no_off.rpe_table is None
    assert not any(p.requires_grad for p in no_off.offsets.parameters())  # frozen, as officially
    assert dwc.position_encoding == "dwc" and fixed.rpe_table.shape == (4, 16, 16)
    assert any("ls1/ls2 dropped" in n for n in pp.load_report.notes)


def test_dat_pp_runs_at_another_size_with_its_tables():
    """DAT++'s 384 recipe: a model built for one size (its rpe_tables) evaluated at another; ``table_img_size`` keeps
    the tables, nothing is resized, and the official logits come out."""
    _, io = _case("official_dat_pp_runtime_size")
    model = _load("official_dat_pp_runtime_size", img_size=96, table_img_size=64)
    logits, pre = _outputs(model, io["pixel_values_96"].float())
    assert _close(logits, io["logits_96"]) and _close(pre, io["pre_logits_96"])
    assert not model.load_report.resized
    # without table_img_size the tables are built for 96 and the official load_pretrained resize is applied
    resized = _load("official_dat_pp_runtime_size", img_size=96)
    assert any("rpe_table (1, 31, 31) → (1, 47, 47) (bicubic)" in r for r in resized.load_report.resized)
    assert max_diff(_outputs(resized, io["pixel_values_96"].float())[0], io["logits_96"]) > 1e-3  # another model


def test_deformable_points_are_the_official_forward_outputs():
    """``deformable_points`` gives what the official forward returns besides the logits: per deformable block the
    sampled positions and the reference points, (B, groups, Hk, Wk, 2) in normalised (y, x)."""
    _, io = _case("official_dat_v1_options")
    model = _load("official_dat_v1_options")
    with torch.no_grad():
        logits, points = model.deformable_points(io["pixel_values"].float())
    assert _close(logits, io["logits"])
    assert sorted(points) == ["stages.2.blocks.0.attn", "stages.3.blocks.1.attn"]
    for name, got in points.items():
        i, j = name.split(".")[1], name.split(".")[3]
        torch.testing.assert_close(got["positions"], io[f"positions.{i}.{j}"], atol=1e-5, rtol=0)
        torch.testing.assert_close(got["references"], io[f"references.{i}.{j}"], atol=0, rtol=0)
        assert got["pixels"].shape == got["positions"].shape
        assert got["pixels"].min() >= 0 and got["pixels"].max() <= 128  # offsets are bounded in the image
    assert points["stages.2.blocks.0.attn"]["positions"].shape == (2, 2, 4, 4, 2)  # stride 2 on an 8×8 map


# ================================================================================================ official keys
@pytest.mark.parametrize("name, variant", [("dat_base_384", "dat_base_384"), ("dat_pp_base", "dat_pp_base")])
def test_official_key_list_converts_to_the_full_variant(name, variant):
    """Every key of the official state_dict of DAT-B@384 (v1) and DAT-B++, with its shape, converts to exactly the
    model's keys and shapes (1×1 convs become dense layers)."""
    official = json.loads((DATA / "official_keys.json").read_text())[name]
    state = {k: torch.empty(shape, device="meta") for k, shape in official.items()}
    converted = _to_dense(official_keymap("patch_proj.3.weight" in state).forward(state))
    with torch.device("meta"):
        model = vitkit.create_model(variant)
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
    assert _close(_outputs(model, io["pixel_values"].float())[0], io["logits"])


def test_the_two_versions_are_told_apart():
    """A DAT v1 file does not load into a DAT++ model (nor the reverse): the error names the family it is."""
    with pytest.raises(CheckpointMismatchError, match="looks like a official dat checkpoint"):
        vitkit.create_model("dat_pp_tiny", pretrained=str(DATA / "official_dat_v1_options" / "checkpoint.pth"))
    with pytest.raises(CheckpointMismatchError, match="looks like a official dat_pp checkpoint"):
        vitkit.create_model("dat_tiny", pretrained=str(DATA / "official_dat_pp_options" / "checkpoint.pth"))


# ================================================================================================ configuration
@pytest.mark.parametrize("name, overrides, match", [
    ("dat_tiny", dict(stage_spec=(("L", "S"), ("L", "S"), ("N", "D") * 3, ("L", "D"))), r"stage_spec\[2\]\[0\]"),
    ("dat_tiny", dict(fixed_pes=(False, False, True, True)), r"fixed_pes\[2\]: the official code cannot run it: "
                                                             r".*self.n_sample"),
    ("dat_tiny", dict(no_offs=(False, False, False, True)), r"no_offs\[3\]: .*Tensor.fill does not exist"),
    ("dat_pp_tiny", dict(no_offs=(True, False, False, False), dwc_pes=(True, False, False, False)),
     r"dwc_pes\[0\] with no_offs\[0\] .*UnboundLocalError"),
    ("dat_pp_tiny", dict(no_offs=(True, False, False, False), ksizes=(10, 7, 5, 3)),
     r"no_offs\[0\]: .*samples 8x8 keys but the official average pooling has 7x7"),
    ("dat_pp_tiny", dict(stage_spec=(("N", "Q"), ("N", "D") * 2, ("N", "D") * 9, ("D", "D"))),
     r"ksize_qnas\[0\] = 3: the official code cannot run it"),
    ("dat_pp_tiny", dict(stage_spec=(("X", "D"), ("N", "D") * 2, ("N", "D") * 9, ("D", "D")), window_sizes=(4, 7, 7, 7)),
     r"window_sizes\[0\] = 4: an 'X' block"),
    ("dat_pp_tiny", dict(lower_lr_kvs={"offset": 0.1}), r"lower_lr_kvs .*: a training setting"),
    ("dat_tiny", dict(groups=(-1, -1, 5, 6)), r"groups\[2\] = 5"),
    ("dat_tiny", dict(img_size=200), "multiple of 32"),
    ("dat_tiny", dict(dims=(96, 192, 384, 720)), r"dims\[3\] = 720 must be 2 x dims\[2\]"),
    ("dat_tiny", dict(depths=(2, 2, 4, 2)), r"stage_spec\[2\]"),
    ("dat_tiny", dict(sr_ratios=(8, 4, 2, 1)), r"sr_ratios \(an argument of the official dat constructor\): no "
                                                r"block of DAT v1"),
    ("dat_pp_tiny", dict(img_size=32), r"stage 0.s 8x8 map samples a 1x1 key grid with ksizes\[0\] = 9 and strides\[0\] = 8"),
    ("dat_pp_tiny", dict(nat_ksizes=(7, 6, 7, 7)), r"nat_ksizes\[1\] = 6"),
])
def test_bad_configs_name_the_field(name, overrides, match):
    with pytest.raises(ConfigError, match=match):
        vitkit.create_model(name, **overrides)


def test_input_of_another_size_is_a_clear_error():
    model = vitkit.create_model("dat_tiny", **vitkit.get_spec("dat_tiny").tiny)
    with pytest.raises(ValueError, match=r"built for 64x64 .* img_size=\(96, 96\)"):
        model(torch.randn(1, 3, 96, 96))


def test_pyramid_and_weight_decay_names():
    model = randomize_(vitkit.create_model("dat_pp_tiny", **vitkit.get_spec("dat_pp_tiny").tiny)).eval()
    with torch.no_grad():
        maps = model.forward_intermediates(torch.randn(2, 3, 64, 64))
    assert [tuple(m.shape) for m in maps] == [(2, 16, 16, 16), (2, 32, 8, 8), (2, 64, 4, 4), (2, 128, 2, 2)]
    names = model.no_weight_decay()
    assert "rpe_table" in names and "stages.3.blocks.1.attn.rpe_mlp.0.weight" in names  # the tiny log-CPB stage


# ======================================================================================= neighbourhood attention
def _qkv(B, h, H, W, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, H, W, d, generator=g) for _ in range(3)]


@pytest.mark.parametrize("H, W, k, tile", [(9, 11, 3, None), (7, 7, 7, None), (13, 10, 5, 4), (14, 14, 7, 7),
                                           (8, 12, 5, 3), (16, 9, 7, 5)])
def test_neighborhood_attention_is_the_brute_force(H, W, k, tile):
    """Tiled (default) and explicit (recording) paths equal dense masked attention built from the definition, for
    non-square maps, maps equal to the window and tiles that do not divide the map, with and without the bias."""
    q, kk, v = _qkv(2, 3, H, W, 8)
    rpb = torch.randn(3, 2 * k - 1, 2 * k - 1, generator=torch.Generator().manual_seed(1))
    for bias in (rpb, None):
        ref = neighborhood_attention_dense(q, kk, v, bias, k, scale=0.3)
        assert max_diff(neighborhood_attention(q, kk, v, bias, k, scale=0.3, tile=tile), ref) < 1e-5
        seen = {}
        out = neighborhood_attention(q, kk, v, bias, k, scale=0.3, record=lambda a, **i: seen.update(attn=a, **i))
        assert max_diff(out, ref) < 1e-5 and seen["attn"].shape == (2, 3, H * W, k * k)


def test_neighborhood_attention_gradients_match_the_brute_force():
    q, kk, v = (t.requires_grad_() for t in _qkv(1, 2, 9, 8, 4))
    rpb = torch.randn(2, 9, 9, requires_grad=True)
    grads = []
    for fn in (lambda: neighborhood_attention(q, kk, v, rpb, 5, scale=0.5),
               lambda: neighborhood_attention_dense(q, kk, v, rpb, 5, scale=0.5)):
        (fn() ** 2).sum().backward()
        grads.append([t.grad.clone() for t in (q, kk, v, rpb)])
        for t in (q, kk, v, rpb):
            t.grad = None
    for a, b in zip(*grads):
        assert max_diff(a, b) < 1e-5


def test_neighborhood_windows_are_clamped_inside_the_map():
    """NATTEN's rule, read off the recorded maps: on a 5×6 map with k = 3 the window of query (0, 0) is rows 0-2 /
    columns 0-2, of (2, 5) rows 1-3 / columns 3-5; and with zero queries the bias alone decides: an rpb peaked at
    offset (+1, +1), rpb[h, 1 + k − 1, 1 + k − 1], sends query (2, 3) to key (3, 4)."""
    H, W, k = 5, 6, 3
    q, kk, v = _qkv(1, 1, H, W, 4)
    seen = {}
    neighborhood_attention(q, kk, v, None, k, scale=1.0, record=lambda a, **i: seen.update(attn=a, info=i))
    for (i, j), rows, cols in (((0, 0), (0, 3), (0, 3)), ((2, 5), (1, 4), (3, 6))):
        grid = neighborhood_attention_to_grid(seen["attn"], seen["info"], query=(i, j))[0, 0]
        support = torch.zeros(H, W, dtype=torch.bool)
        support[rows[0]:rows[1], cols[0]:cols[1]] = True
        assert torch.equal(grid > 0, support) and abs(grid.sum().item() - 1) < 1e-6
    rpb = torch.zeros(1, 5, 5)
    rpb[0, 1 + k - 1, 1 + k - 1] = 50.0  # offset (+1, +1): inside every window of an interior query
    neighborhood_attention(torch.zeros_like(q), kk, v, rpb, k, scale=1.0,
                           record=lambda a, **i: seen.update(attn=a, info=i))
    dense = neighborhood_attention_to_grid(seen["attn"], seen["info"])[0, 0]  # (H·W, H, W)
    assert dense[2 * W + 3].argmax().item() == 3 * W + 4  # (2, 3) → (3, 4)


def test_neighborhood_layer_pads_small_maps_like_the_official_module():
    """A map smaller than the window: zero-padded at the bottom/right before the projections, attended on the padded
    map (padding tokens are keys), cropped."""
    layer = randomize_(NeighborhoodAttention(16, 2, 5)).eval()
    x = torch.randn(2, 3, 4, 16)
    with torch.no_grad():
        out = layer(x)
        xp = F.pad(x, (0, 0, 0, 1, 0, 2))  # (2, 5, 5, 16)
        q, k, v = layer.qkv(xp).view(2, 5, 5, 3, 2, 8).permute(3, 0, 4, 1, 2, 5)
        ref = neighborhood_attention_dense(q, k, v, layer.rpb, 5, scale=8 ** -0.5)
        ref = layer.proj(ref.permute(0, 2, 3, 1, 4).reshape(2, 5, 5, 16))[:, :3, :4]
    assert out.shape == x.shape and max_diff(out, ref) < 1e-5


@pytest.mark.slow
def test_natten_memory_command_grows_linearly():
    """``python -m vitkit.bench.natten_memory``: from a 28×28 to a 56×56 map (4× the tokens) the tiled path's peak
    grows about 4×, the brute force's with the written-out softmax about 16×; all paths agree."""
    out = subprocess.run([sys.executable, "-m", "vitkit.bench.natten_memory", "--batch-size", "1", "--repeats", "1",
                          "--threads", "1"], capture_output=True, text=True, check=True).stdout
    rows = {(line.split()[0], line.split()[1]): line.split() for line in out.splitlines() if "x" in line.split()[0]}
    tiled = float(rows[("56x56", "tiled")][-3]) / float(rows[("28x28", "tiled")][-3])
    dense = float(rows[("56x56", "dense")][-3]) / float(rows[("28x28", "dense")][-3])
    assert tiled < 6 < 10 < dense, out


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
    """v1: (i + 0.5) / n · 2 − 1 for reference points and queries; DAT++: (i + 0.5) / (n − 1) · 2 − 1 for reference
    points, i / (n − 1) · 2 − 1 for queries (official ``_get_ref_points`` / ``_get_q_grid``)."""
    n = 4
    v1 = reference_points((n, n), "dat")[:, 0, 0]
    pp = reference_points((n, n), "dat_pp")[:, 0, 0]
    pq = reference_points((n, n), "dat_pp", queries=True)[0, :, 1]
    torch.testing.assert_close(v1, torch.tensor([-0.75, -0.25, 0.25, 0.75]))
    torch.testing.assert_close(pp, (torch.arange(n) + 0.5) / 3 * 2 - 1)
    torch.testing.assert_close(pq, torch.tensor([-1.0, -1 / 3, 1 / 3, 1.0]))


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
