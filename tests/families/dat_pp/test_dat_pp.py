"""DAT++ (its golden case runs in test_golden.py): reference cases made with the official LeapLabTHU/DAT code at
32173fc (tests/families/dat_pp/data: the switches and block types the released configs leave off, DAT++ run at another
size with its tables, the official ``load_pretrained`` resize), the official key list of DAT-B++, DAT++ told apart
from DAT v1, neighbourhood attention against a brute-force masked attention written from the definition, DAT++'s
point conventions and its inherited ``sampling_points``, configs."""
from __future__ import annotations

import functools
import json
import sys
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import vitkit
from vitkit.config import ConfigError
from vitkit.families.dat.formats import _to_dense, official_keymap
from vitkit.layers import NeighborhoodAttention
from vitkit.layers.deformable_attention import reference_points
from vitkit.layers.neighborhood_attention import (neighborhood_attention, neighborhood_attention_dense,
                                                  neighborhood_attention_to_grid)
from vitkit.weights import CheckpointMismatchError

from conftest import golden_close, max_diff, randomize_

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "dat"))  # DAT v1's test module holds the shared helpers
import test_dat as dat_tests  # noqa: E402

DATA = Path(__file__).parent / "data"
DAT_DATA = Path(__file__).parents[1] / "dat" / "data"  # DAT v1's reference cases
CASES = ("official_dat_pp_options", "official_dat_pp_runtime_size", "official_dat_pp_ablations")


_case = functools.partial(dat_tests._case, data=DATA)
_load = functools.partial(dat_tests._load, data=DATA)
_outputs, _same_points = dat_tests._outputs, dat_tests._same_points


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
    if name == "official_dat_pp_options":  # window blocks: their index and mask buffers are in the file
        assert any("checked equal to vitkit's" in n for n in report.notes)


@pytest.mark.parametrize("name, size, resized", [
    ("official_dat_pp_ablations", 160, [f"stages.3.blocks.{j}.attn.rpe_table (4, 16, 16) → (4, 25, 25) (bicubic)"
                                        for j in (0, 1)]),
])
def test_ablation_cases_at_a_second_size(name, size, resized):
    """The ablation case loaded by the official ``load_pretrained`` into a model of another size (``case.json``
    ``resized_constructor``): DAT++ with ``fixed_pes``, whose (heads, H·W, Hk·Wk) bias the official code interpolates
    bicubically like any rpe_table."""
    meta, io = _case(name)
    model = _load(name, img_size=size)
    logits, pre = _outputs(model, io[f"pixel_values_{size}"].float())
    assert golden_close(logits, io[f"logits_{size}"]) and golden_close(pre, io[f"pre_logits_{size}"]), \
        max_diff(logits, io[f"logits_{size}"])
    assert set(resized) <= set(model.load_report.resized)


def test_ablation_parts_are_built_and_loaded():
    """What the DAT++ ablation case exercises is really there: the fixed bias, a deformable layer without offsets (and
    without a position encoding), the dwc_pe conv, and DAT++'s 'X', 'P', 'E', 'Q' blocks; the layer scales the
    official stage builds for an 'X' block are dropped with a note."""
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
    assert golden_close(logits, io["logits_96"]) and golden_close(pre, io["pre_logits_96"])
    assert not model.load_report.resized
    # without table_img_size the tables are built for 96 and the official load_pretrained resize is applied
    resized = _load("official_dat_pp_runtime_size", img_size=96)
    assert any("rpe_table (1, 31, 31) → (1, 47, 47) (bicubic)" in r for r in resized.load_report.resized)
    assert max_diff(_outputs(resized, io["pixel_values_96"].float())[0], io["logits_96"]) > 1e-3  # another model


def test_sampling_points_are_the_points_of_deformable_points():
    """DAT++'s deformable layers: ``sampling_points`` (inherited from DAT) is the points part of
    ``deformable_points``, for every 'D' block of the tiny configuration and its strided key grids."""
    model = randomize_(vitkit.create_model("dat_pp_tiny", **vitkit.get_spec("dat_pp_tiny").tiny)).eval()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, points = model.deformable_points(x)
        got = model.sampling_points(x)
    assert sorted(got) == sorted([f"stages.{i}.blocks.1.attn" for i in range(4)] + ["stages.3.blocks.0.attn"])
    _same_points(got, points)


# ================================================================================================ official keys
def test_official_key_list_converts_to_the_full_variant():
    """Every key of the official state_dict of DAT-B++, with its shape, converts to exactly the model's keys and
    shapes (1×1 convs become dense layers)."""
    official = json.loads((DATA / "official_keys.json").read_text())["dat_pp_base"]
    state = {k: torch.empty(shape, device="meta") for k, shape in official.items()}
    converted = _to_dense(official_keymap("patch_proj.3.weight" in state).forward(state))
    with torch.device("meta"):
        model = vitkit.create_model("dat_pp_base")
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in converted.items()} == ours


def test_the_two_versions_are_told_apart():
    """A DAT v1 file does not load into a DAT++ model (nor the reverse): the error names the family it is."""
    with pytest.raises(CheckpointMismatchError, match="looks like a official dat checkpoint"):
        vitkit.create_model("dat_pp_tiny", pretrained=str(DAT_DATA / "official_dat_v1_options" / "checkpoint.pth"))
    with pytest.raises(CheckpointMismatchError, match="looks like a official dat_pp checkpoint"):
        vitkit.create_model("dat_tiny", pretrained=str(DATA / "official_dat_pp_options" / "checkpoint.pth"))


# ================================================================================================ configuration
@pytest.mark.parametrize("overrides, match", [
    (dict(no_offs=(True, False, False, False), dwc_pes=(True, False, False, False)),
     r"dwc_pes\[0\] with no_offs\[0\] .*UnboundLocalError"),
    (dict(no_offs=(True, False, False, False), ksizes=(10, 7, 5, 3)),
     r"no_offs\[0\]: .*samples 8x8 keys but the official average pooling has 7x7"),
    (dict(stage_spec=(("N", "Q"), ("N", "D") * 2, ("N", "D") * 9, ("D", "D"))),
     r"ksize_qnas\[0\] = 3: the official code cannot run it"),
    (dict(stage_spec=(("X", "D"), ("N", "D") * 2, ("N", "D") * 9, ("D", "D")), window_sizes=(4, 7, 7, 7)),
     r"window_sizes\[0\] = 4: an 'X' block"),
    (dict(lower_lr_kvs={"offset": 0.1}), r"lower_lr_kvs .*: a training setting"),
    (dict(img_size=32), r"stage 0.s 8x8 map samples a 1x1 key grid with ksizes\[0\] = 9 and strides\[0\] = 8"),
    (dict(nat_ksizes=(7, 6, 7, 7)), r"nat_ksizes\[1\] = 6"),
])
def test_bad_configs_name_the_field(overrides, match):
    with pytest.raises(ConfigError, match=match):
        vitkit.create_model("dat_pp_tiny", **overrides)


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
def test_reference_point_conventions():
    """DAT++: (i + 0.5) / (n − 1) · 2 − 1 for reference points, i / (n − 1) · 2 − 1 for queries (official
    ``_get_ref_points`` / ``_get_q_grid`` at 32173fc); DAT v1's is tested in tests/families/dat."""
    n = 4
    pp = reference_points((n, n), "over_n_minus_1")[:, 0, 0]
    pq = reference_points((n, n), "over_n_minus_1", queries=True)[0, :, 1]
    torch.testing.assert_close(pp, (torch.arange(n) + 0.5) / 3 * 2 - 1)
    torch.testing.assert_close(pq, torch.tensor([-1.0, -1 / 3, 1 / 3, 1.0]))
