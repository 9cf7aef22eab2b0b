"""Swin Transformer v1 (its golden case runs in test_golden.py): parity with transformers'
SwinForImageClassification (4.x and 5.x layouts, padded and non-square geometry, feature pyramid), the official
release format against a reference case made with microsoft/Swin-Transformer itself (tests/families/swin/data), timm files
against timm's real key list, window and bias-table changes, the shared window-attention layer against brute-force
constructions, and layer ids against SimMIM's ``get_swin_layer``."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import vitkit
from vitkit.config import ConfigError
from vitkit.layers.pos_embed_rel import resize_rel_pos_bias_table
from vitkit.layers.window_attention import (WindowAttention, shifted_window_mask, window_attention_to_grid,
                                            window_partition, window_reverse)
from vitkit.families.swin.catalog import REFERENCES, VARIANTS, WEIGHTS, closed_form_size
from vitkit.families.swin.formats import OFFICIAL, TIMM, to_transformers
from vitkit.families.swin.model import SwinConfig, SwinTransformer, block_geometry, computed_buffers
from vitkit.weights import CheckpointError, CheckpointMismatchError

from conftest import max_diff, randomize_

NAME = "swin_tiny_patch4_window7_224"
OFFICIAL_CASE = Path(__file__).parent / "data" / "official_shrunk"
OFFICIAL_KW = dict(embed_dim=8, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), num_classes=10)
HF_TINY = dict(image_size=64, patch_size=4, embed_dim=16, depths=[2, 2, 2, 2], num_heads=[1, 2, 2, 4], window_size=2,
               num_labels=7)


def _tiny(**kw) -> SwinTransformer:
    return randomize_(vitkit.create_model(NAME, **{**vitkit.get_spec(NAME).tiny, **kw}), seed=3).eval()


def _input(model, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, *model.data_cfg.input_size, generator=torch.Generator().manual_seed(seed))


def _logits(model, x):
    with torch.no_grad():
        out = model.eval()(x)
    return out.logits if hasattr(out, "logits") else out


# ============================================================================================== transformers parity
def _hf(**kw):
    transformers = pytest.importorskip("transformers")
    config = transformers.SwinConfig(**{**HF_TINY, **kw})
    return randomize_(transformers.SwinForImageClassification(config), seed=7).eval()


def _hf_pyramid(hf, x) -> list[torch.Tensor]:
    """transformers' per-stage maps before the next merging (its backbone's view): vitkit's feature pyramid."""
    with torch.no_grad():
        out = hf.swin(pixel_values=x, output_hidden_states=True, output_hidden_states_before_downsampling=True)
    return list(out.reshaped_hidden_states[1:])


@pytest.mark.parametrize("geometry", [
    dict(),  # 16x16 tokens, 2x2 windows: shifted stages 0-2, one window in stage 3
    dict(image_size=(72, 56), window_size=4, depths=[2, 2, 2], num_heads=[1, 2, 2]),  # padded windows, odd merging
], ids=["tiny", "padded-non-square"])
def test_transformers_4x_folder_parity(tmp_path, geometry):
    """save_pretrained writes the 4.x (Hub) layout; logits, pooled features and the feature pyramid agree."""
    hf = _hf(**geometry)
    hf.save_pretrained(tmp_path / "hf")
    saved = load_file(tmp_path / "hf" / "model.safetensors")
    assert "swin.encoder.layers.0.blocks.0.attention.self.query.weight" in saved
    img = hf.config.image_size
    model = vitkit.create_model(NAME, pretrained=str(tmp_path / "hf"), img_size=img, window_size=hf.config.window_size)
    x = torch.randn(2, 3, *(img if isinstance(img, tuple) else (img, img)), generator=torch.Generator().manual_seed(2))
    assert model.load_report.format == "hf" and model.num_classes == 7
    assert "config depths=" in "\n".join(model.load_report.notes)
    assert max_diff(_logits(model, x), _logits(hf, x)) <= 1e-4
    with torch.no_grad():
        pooled = hf.swin(pixel_values=x).pooler_output
        assert max_diff(model.forward_head(model.forward_features(x), pre_logits=True), pooled) <= 1e-4
        ours = model.forward_intermediates(x)
    theirs = _hf_pyramid(hf, x)
    assert [t.shape for t in ours] == [t.shape for t in theirs]
    assert max(max_diff(a, b) for a, b in zip(ours, theirs)) <= 1e-4


def test_transformers_5x_in_memory_layout(tmp_path):
    """A live 5.x model's state_dict() (q_proj/k_proj/v_proj/o_proj, relative_position_bias.*, mlp.fc1/fc2)."""
    hf = _hf()
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert "swin.encoder.layers.0.blocks.0.attention.q_proj.weight" in state
    assert "swin.encoder.layers.0.blocks.0.attention.relative_position_bias.relative_position_bias_table" in state
    (tmp_path / "v5").mkdir()
    save_file(state, str(tmp_path / "v5" / "model.safetensors"))
    hf.config.to_json_file(str(tmp_path / "v5" / "config.json"))
    model = vitkit.create_model(NAME, pretrained=str(tmp_path / "v5"), img_size=64, window_size=2)
    x = _input(model)
    assert max_diff(_logits(model, x), _logits(hf, x)) <= 1e-4


def test_transformers_hub_file_with_index_buffers_is_checked(tmp_path):
    """Older Hub files hold every relative_position_index: loaded, checked equal to vitkit's; a wrong one is refused."""
    hf = _hf()
    hf.save_pretrained(tmp_path / "hf")
    weights = tmp_path / "hf" / "model.safetensors"
    state = load_file(weights)
    for name, module in hf.named_modules():
        if type(module).__name__ == "SwinRelativePositionBias":  # transformers' own index construction
            key = name.replace("attention.relative_position_bias", "attention.self") + ".relative_position_index"
            state[key] = module._create_relative_position_index()
    save_file(state, str(weights))
    model = vitkit.create_model(NAME, pretrained=str(tmp_path / "hf"), img_size=64, window_size=2)
    assert "8 computed buffer(s) in the checkpoint checked equal to vitkit's" in model.load_report.notes
    x = _input(model)
    assert max_diff(_logits(model, x), _logits(hf, x)) <= 1e-4
    key = "swin.encoder.layers.1.blocks.0.attention.self.relative_position_index"
    state[key] = state[key].flip(0)
    save_file(state, str(weights))
    with pytest.raises(CheckpointMismatchError, match=r"not the relative-position index .* layers\.1\.blocks\.0"):
        vitkit.create_model(NAME, pretrained=str(tmp_path / "hf"), img_size=64, window_size=2)


def test_transformers_twin_is_built_from_the_inverse_table():
    """The twin `vitkit bench --compare transformers` runs: same weights through the inverse of the reading table."""
    model = _tiny()
    hf = to_transformers(model)
    x = _input(model)
    assert max_diff(_logits(model, x), _logits(hf, x)) <= 1e-4


def test_twin_refuses_stages_smaller_than_the_window():
    """transformers 5.x builds every bias table for the configured window and fails on a stage smaller than it (the
    official code and vitkit build the clamped table); the twin says so instead of crashing inside transformers."""
    model = _tiny(img_size=32)  # token grids 8, 4, 2, 1: the last stage is smaller than the 2x2 window
    with pytest.raises(ValueError, match=r"stages \[3\] are smaller than the window"):
        to_transformers(model)
    hf = _hf(image_size=32)
    with pytest.raises(RuntimeError):  # the behaviour the refusal documents (drop it once transformers runs this)
        hf(pixel_values=torch.zeros(1, 3, 32, 32))


def test_transformers_absolute_embeddings(tmp_path):
    """``use_absolute_embeddings`` (the official ``ape``) loads as ``absolute_pos_embed``; the twin writes it back."""
    hf = _hf(use_absolute_embeddings=True)
    hf.save_pretrained(tmp_path / "hf")
    model = vitkit.create_model(NAME, pretrained=str(tmp_path / "hf"), img_size=64, window_size=2)
    x = _input(model)
    assert model.cfg.ape and max_diff(_logits(model, x), _logits(hf, x)) <= 1e-4
    assert max_diff(_logits(to_transformers(model), x), _logits(hf, x)) <= 1e-4


def test_transformers_absolute_embeddings_at_a_second_resolution(tmp_path):
    """A 64-pixel ``use_absolute_embeddings`` folder loaded at 96 (same window): the table is resized at load the
    way transformers' ``interpolate_pos_encoding=True`` forward resizes it (bicubic, align_corners False, no
    antialiasing), and the logits are transformers' on 96-pixel inputs."""
    hf = _hf(use_absolute_embeddings=True)
    hf.save_pretrained(tmp_path / "hf")
    model = vitkit.create_model(NAME, pretrained=str(tmp_path / "hf"), img_size=96, window_size=2)
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = hf.eval()(pixel_values=x, interpolate_pos_encoding=True).logits
    assert "absolute_pos_embed (1, 256, 16) → (1, 576, 16)" in model.load_report.resized[0]
    assert max_diff(_logits(model, x), ref) <= 1e-4


@pytest.mark.parametrize("setting,match", [(dict(layer_norm_eps=1e-6), "layer_norm_eps"),
                                           (dict(hidden_act="relu"), "hidden_act")])
def test_transformers_settings_vitkit_cannot_express_are_refused(tmp_path, setting, match):
    _hf(**setting).save_pretrained(tmp_path / "hf")
    with pytest.raises(CheckpointError, match=match):
        vitkit.create_model(NAME, pretrained=str(tmp_path / "hf"), img_size=64, window_size=2)


def test_convert_transformers_folder_infers_the_variant(tmp_path, capsys):
    from vitkit.cli.main import main
    hf = _hf(embed_dim=128, depths=[1, 1], num_heads=[4, 8], window_size=3, image_size=48, num_labels=4)
    hf.save_pretrained(tmp_path / "hf")
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "out")]) == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model"].startswith("swin_base_") and config["config"]["window_size"] == 3
    converted = vitkit.load_model(tmp_path / "out")
    x = _input(converted)
    assert max_diff(_logits(converted, x), _logits(hf, x)) <= 1e-4


# ================================================================================================ official format
def _official(**kw):
    return vitkit.create_model(NAME, pretrained=str(OFFICIAL_CASE / "checkpoint.pth"), **{**OFFICIAL_KW, **kw})


def test_official_release_file_matches_the_official_code():
    io = load_file(OFFICIAL_CASE / "io.safetensors")
    model = _official(img_size=128, window_size=4)
    report = model.load_report
    assert (report.format, report.container) == ("official", "{'model': state_dict}")
    assert "11 computed buffer(s) in the checkpoint checked equal to vitkit's" in report.notes  # 8 indices, 3 masks
    assert report.resized == [] and report.reinitialized == []
    out = _logits(model, io["pixel_values"].float())
    assert max_diff(out, io["logits"]) <= 1e-4


def test_another_window_resizes_tables_as_official_load_pretrained():
    """The 128/window-4 file fine-tuned at 160/window 5: bicubic tables (Swin's utils.load_pretrained) give the
    official logits; the report names the method and says the buffers were recomputed."""
    io = load_file(OFFICIAL_CASE / "io.safetensors")
    model = _official(img_size=160, window_size=5)
    report = model.load_report
    assert len(report.resized) == 8 and all("window 4x4 → 5x5, bicubic" in r for r in report.resized)
    assert any("recomputed: this model's input size or window differs" in n for n in report.notes)
    x = io["pixel_values_160"].float()
    bicubic = _logits(model, x)
    assert max_diff(bicubic, io["logits_160_window5"]) <= 1e-4

    geometric = _official(img_size=160, window_size=5, rel_pos_resize="geometric")
    assert all("geometric" in r for r in geometric.load_report.resized)
    table = load_file_official()["layers.2.blocks.1.attn.relative_position_bias_table"]
    expected = resize_rel_pos_bias_table(table, (4, 4), (5, 5), method="geometric")
    assert torch.equal(geometric.layers[2].blocks[1].attn.relative_position_bias_table.detach(), expected)
    assert 1e-4 < max_diff(_logits(geometric, x), bicubic) < 1.0  # the two methods differ


def test_timm_file_at_a_second_resolution_resizes_as_timm():
    """A timm file of a 64-pixel / window-2 model loaded at 96 / window 3 (tests/families/swin/data/timm_second_size, timm
    itself): the tables are resized as timm's checkpoint_filter_fn does (geometric progression, linear), not with the
    official bicubic, and the logits are timm's."""
    folder = OFFICIAL_CASE.parent / "timm_second_size"
    meta, io = json.loads((folder / "case.json").read_text()), load_file(folder / "io.safetensors")
    kw = dict(pretrained=str(folder / "model.safetensors"), num_classes=10, **meta["kwargs"])
    model = vitkit.create_model(meta["vitkit_model"], **kw).eval()
    assert max_diff(_logits(model, io["pixel_values"].float()), io["logits"]) <= 1e-4
    model = vitkit.create_model(meta["vitkit_model"], **{**kw, "img_size": 96, "window_size": 3}).eval()
    assert all("geometric_linear" in r and "checkpoint_filter_fn" in r for r in model.load_report.resized)
    assert max_diff(_logits(model, io["pixel_values_96"].float()), io["logits_96"]) <= 1e-4
    bicubic = vitkit.create_model(meta["vitkit_model"], **{**kw, "img_size": 96, "window_size": 3,
                                                           "rel_pos_resize": "bicubic"}).eval()
    assert max_diff(_logits(bicubic, io["pixel_values_96"].float()), io["logits_96"]) > 1e-3  # the scheme matters


def test_official_options_case():
    """``ape``, ``patch_norm=False`` and ``qk_scale`` against the official code (tests/families/swin/data/official_options),
    at its size and loaded into a 96-px / window-3 model as ``utils.load_pretrained`` does (the absolute position
    embedding bicubically, without antialiasing)."""
    folder = OFFICIAL_CASE.parent / "official_options"
    meta, io = json.loads((folder / "case.json").read_text()), load_file(folder / "io.safetensors")
    for size, window, suffix in ((64, 2, ""), (96, 3, "_96")):
        model = vitkit.create_model(meta["vitkit_model"], pretrained=str(folder / "checkpoint.pth"), num_classes=10,
                                    **{**meta["kwargs"], "img_size": size, "window_size": window}).eval()
        with torch.no_grad():
            feats = model.forward_features(io[f"pixel_values{suffix}"].float())
            assert max_diff(model.forward_head(feats), io[f"logits{suffix}"]) <= 1e-4
            assert max_diff(model.forward_head(feats, pre_logits=True), io[f"pre_logits{suffix}"]) <= 1e-4
    assert "absolute_pos_embed (1, 256, 8) → (1, 576, 8)" in model.load_report.resized[0]
    assert not any("norm" in n for n, _ in model.patch_embed.named_parameters())  # patch_norm=False


@pytest.mark.parametrize("option", ["use_checkpoint", "fused_window_process"])
def test_official_options_that_change_nothing_are_refused_with_the_reason(option):
    with pytest.raises(ConfigError, match=f"{option} .*changes no output"):
        vitkit.create_model(NAME, **{option: True})


def load_file_official() -> dict[str, torch.Tensor]:
    return torch.load(OFFICIAL_CASE / "checkpoint.pth", map_location="cpu", weights_only=True)["model"]


def test_official_keys_are_the_official_codes_keys(tmp_path):
    """vitkit's state dict written through the inverse of the official table has exactly the official file's keys
    and shapes (buffers included), and loads back to the same function."""
    model = vitkit.create_model(NAME, img_size=128, window_size=4, **OFFICIAL_KW)
    randomize_(model, seed=5)
    official = OFFICIAL.inverse(model.state_dict())
    reference = load_file_official()
    assert {k: tuple(v.shape) for k, v in official.items()} == {k: tuple(v.shape) for k, v in reference.items()}
    torch.save({"model": official}, tmp_path / "official.pth")
    back = vitkit.create_model(NAME, pretrained=str(tmp_path / "official.pth"), img_size=128, window_size=4,
                               **OFFICIAL_KW)
    x = torch.randn(1, 3, 128, 128)
    assert torch.equal(_logits(back, x), _logits(model, x))


@pytest.mark.parametrize("key,change", [
    ("layers.1.blocks.1.attn_mask", lambda t: t.masked_fill(t == -100.0, float("-inf"))),  # -inf is not Swin's fill
    ("layers.0.blocks.1.attn_mask", lambda t: t[:, :-1, :-1]),
    ("layers.3.blocks.0.attn.relative_position_index", lambda t: t.t()),
])
def test_official_buffers_are_checked_not_trusted(tmp_path, key, change):
    state = load_file_official()
    state[key] = change(state[key]).contiguous()
    torch.save({"model": state}, tmp_path / "bad.pth")
    named = key.replace("attn_mask", "attn.attn_mask") if key.endswith(".1.attn_mask") else key  # vitkit's name
    with pytest.raises(CheckpointMismatchError, match=r"\(vitkit names\).*" + named.replace(".", r"\.")):
        vitkit.create_model(NAME, pretrained=str(tmp_path / "bad.pth"), img_size=128, window_size=4, **OFFICIAL_KW)


def test_official_file_without_buffers_loads(tmp_path):
    state = {k: v for k, v in load_file_official().items() if not k.endswith(("attn_mask", "relative_position_index"))}
    torch.save({"model": state}, tmp_path / "stripped.pth")
    model = vitkit.create_model(NAME, pretrained=str(tmp_path / "stripped.pth"), img_size=128, window_size=4,
                                **OFFICIAL_KW)
    assert model.load_report.format == "official"
    io = load_file(OFFICIAL_CASE / "io.safetensors")
    assert max_diff(_logits(model, io["pixel_values"].float()), io["logits"]) <= 1e-4


# ==================================================================================================== timm format
def test_timm_keys_are_timms_keys(golden_root, tmp_path):
    """The inverse of the timm table applied to the golden case's architecture gives timm's own key list
    (keys.json, measured on timm 1.0.31; timm does not save the buffers), and such a file loads back."""
    case = golden_root / "timm_swin_tiny_patch4_window7_224"
    meta = json.loads((case / "case.json").read_text())
    model = vitkit.create_model(meta["vitkit_model"], **meta["kwargs"])
    timm_state = TIMM.inverse(model.state_dict(), skip=(r"relative_position_index$", r"attn_mask$"))
    assert {k: list(v.shape) for k, v in timm_state.items()} == json.loads((case / "keys.json").read_text())
    randomize_(model, seed=9)
    timm_state = TIMM.inverse(model.state_dict(), skip=(r"relative_position_index$", r"attn_mask$"))
    save_file({k: v.contiguous() for k, v in timm_state.items()}, str(tmp_path / "model.safetensors"))
    back = vitkit.create_model(meta["vitkit_model"], pretrained=str(tmp_path / "model.safetensors"), **meta["kwargs"])
    assert back.load_report.format == "timm"
    x = torch.randn(1, 3, 224, 224)
    assert torch.equal(_logits(back, x), _logits(model, x))


# ============================================================================================ the window layer
def _official_mask(H: int, W: int, ws: int, s: int) -> torch.Tensor:
    """microsoft/Swin-Transformer SwinTransformerBlock.__init__, transcribed (square windows)."""
    img_mask = torch.zeros((1, H, W, 1))
    slices = (slice(0, -ws), slice(-ws, -s), slice(-s, None))
    cnt = 0
    for h in slices:
        for w in slices:
            img_mask[:, h, w, :] = cnt
            cnt += 1
    x = img_mask.view(1, H // ws, ws, W // ws, ws, 1).permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, ws * ws)
    mask = x.unsqueeze(1) - x.unsqueeze(2)
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)


@pytest.mark.parametrize("H,W,ws", [(56, 56, 7), (14, 21, 7), (8, 8, 4), (24, 12, 12)])
def test_shifted_window_mask_is_the_official_one(H, W, ws):
    assert torch.equal(shifted_window_mask((H, W), (ws, ws), (ws // 2, ws // 2)), _official_mask(H, W, ws, ws // 2))


def test_window_partition_order_and_round_trip():
    x = torch.arange(2 * 6 * 4 * 3, dtype=torch.float32).view(2, 6, 4, 3)
    windows = window_partition(x, (3, 2))  # (2·4, 6, 3)
    assert windows.shape == (8, 6, 3)
    assert torch.equal(windows[5], x[1, 0:3, 2:4].reshape(6, 3))  # image 1, window (row 0, col 1), row-major tokens
    assert torch.equal(window_reverse(windows, (3, 2), (6, 4)), x)


def _brute_force_grid(attn, grid, padded, window, shift):
    """Per window, per token: where it sits on the image, found by rolling a coordinate array with numpy and reading
    the windows with explicit loops; then every recorded probability is written at (query, key)."""
    (H, W), (Hp, Wp), (wh, ww) = grid, padded, window
    coords = np.stack(np.meshgrid(np.arange(Hp), np.arange(Wp), indexing="ij"), -1)  # (Hp, Wp, 2)
    rolled = np.roll(coords, (-shift[0], -shift[1]), axis=(0, 1))
    tokens = [rolled[r:r + wh, c:c + ww].reshape(-1, 2) for r in range(0, Hp, wh) for c in range(0, Wp, ww)]
    nW = len(tokens)
    B, h = attn.shape[0] // nW, attn.shape[1]
    out = torch.zeros(B, h, H, W, H, W)
    for b in range(B):
        for w, pos in enumerate(tokens):
            for i, (qy, qx) in enumerate(pos):
                for j, (ky, kx) in enumerate(pos):
                    if qy < H and qx < W and ky < H and kx < W:
                        out[b, :, qy, qx, ky, kx] = attn[b * nW + w, :, i, j]
    return out.reshape(B, h, H * W, H, W)


@pytest.mark.parametrize("grid,window,shift", [((6, 6), (3, 3), (1, 1)), ((5, 7), (3, 3), (1, 1)),
                                               ((4, 6), (2, 3), (0, 0)), ((8, 4), (4, 2), (2, 1))])
def test_window_maps_on_the_grid_match_a_brute_force_placement(grid, window, shift):
    padded = tuple(-(-g // w) * w for g, w in zip(grid, window))
    nW = (padded[0] // window[0]) * (padded[1] // window[1])
    N = window[0] * window[1]
    attn = torch.rand(2 * nW, 3, N, N, generator=torch.Generator().manual_seed(4))
    info = dict(grid=grid, padded_grid=padded, window=window, shift=shift)
    placed = window_attention_to_grid(attn, info)
    assert torch.equal(placed, _brute_force_grid(attn, grid, padded, window, shift))
    query = (grid[0] - 1, 1)
    assert torch.equal(window_attention_to_grid(attn, info, query=query),
                       placed[:, :, query[0] * grid[1] + query[1]])


def test_grid_maps_reproduce_the_layer_output():
    """Each query's map over the image, applied to the layer's values, gives the layer's output: the maps sit where
    the shifted windows really took their keys."""
    torch.manual_seed(0)
    layer = WindowAttention(12, 3, grid=(8, 8), window=4, shift=2).eval()
    with torch.no_grad():
        layer.relative_position_bias_table.normal_(0, 1)
        x = torch.randn(2, 8, 8, 12)
        with vitkit.record_attention(layer) as maps:
            out = layer(x)
        assert maps.layouts[""] == WindowAttention.attn_layout
        grid_maps = window_attention_to_grid(maps[""], maps.info[""])  # (B, h, 64, 8, 8)
        v = layer.qkv(x)[..., 24:].reshape(2, 64, 3, 4).transpose(1, 2)  # (B, h, 64, d) in image order
        heads = grid_maps.flatten(-2) @ v  # (B, h, 64, d)
        rebuilt = layer.proj(heads.transpose(1, 2).reshape(2, 8, 8, 12))
    assert maps.info[""] == dict(grid=(8, 8), padded_grid=(8, 8), window=(4, 4), shift=(2, 2))
    assert max_diff(rebuilt, out) <= 1e-5
    assert torch.allclose(grid_maps.sum((-2, -1)), torch.ones(2, 3, 64), atol=1e-5)


def test_bias_cache_follows_the_table_and_gradients_reach_it():
    layer = WindowAttention(8, 2, grid=(4, 4), window=2, shift=1).eval()
    x = torch.randn(1, 4, 4, 8)
    with torch.no_grad():
        first = layer(x)
        layer.relative_position_bias_table.add_(1.0)  # in place, as load_state_dict and optimisers do
        cached = layer(x)
        layer._bias_cache = None
        fresh = layer(x)
    assert not torch.equal(first, cached) and torch.equal(cached, fresh)
    layer.train()
    layer(x).sum().backward()
    assert layer.relative_position_bias_table.grad is not None and layer.relative_position_bias_table.grad.any()


def test_mask_fill_is_minus_100_and_every_shifted_block_records_its_geometry():
    model = _tiny()
    with torch.no_grad(), vitkit.record_attention(model) as maps:
        model(_input(model, batch=1))
    info = maps.info["layers.0.blocks.1.attn"]
    assert info == dict(grid=(16, 16), padded_grid=(16, 16), window=(2, 2), shift=(1, 1))
    assert maps["layers.0.blocks.1.attn"].shape == (64, 1, 4, 4)  # (B·nW, heads, N, N)
    assert maps.info["layers.3.blocks.1.attn"]["shift"] == (0, 0)  # 2x2 tokens = one window, no shift
    mask = model.layers[0].blocks[1].attn.attn_mask
    assert set(mask.unique().tolist()) == {0.0, -100.0}


# ================================================================================================= the model
def test_window_geometry_follows_the_official_rule():
    def geometry(name, **kw):
        cfg = SwinConfig(**{**VARIANTS[name], **kw})
        return [[(g.grid[0], g.window[0], g.shift[0]) for g in stage] for stage in block_geometry(cfg)]
    assert geometry(NAME) == [[(56, 7, 0), (56, 7, 3)], [(28, 7, 0), (28, 7, 3)],
                              [(14, 7, 0), (14, 7, 3)] * 3, [(7, 7, 0), (7, 7, 0)]]
    assert geometry("swin_base_patch4_window12_384")[3] == [(12, 12, 0)] * 2
    assert geometry("swin_base_patch4_window12_384", img_size=224)[3] == [(7, 7, 0)] * 2  # clamped to the stage
    assert geometry(NAME, img_size=256)[3] == [(8, 7, 0), (8, 7, 3)]  # 8 > 7: padded to 14 and shifted


def test_computed_buffers_are_the_models():
    model = _tiny(img_size=200, window_size=7)  # padded and odd grids
    buffers = {k: v for k, v in model.state_dict().items() if k.endswith(("relative_position_index", "attn_mask"))}
    expected = computed_buffers(model.cfg)
    assert buffers.keys() == expected.keys() and all(torch.equal(buffers[k], expected[k]) for k in buffers)


def test_input_size_errors_name_valid_sizes():
    model = _tiny()
    with pytest.raises(ValueError, match=r"input is 96x96 but the model was built for 64x64.*img_size=\(96, 96\)"):
        model(torch.zeros(1, 3, 96, 96))
    with pytest.raises(ConfigError, match=r"img_size 226 is not a multiple of patch_size 4 \(e\.g\. 224 or 228\)"):
        vitkit.create_model(NAME, img_size=226)
    with pytest.raises(ConfigError, match=r"num_heads\[1\] = 5 does not divide"):
        vitkit.create_model(NAME, num_heads=(3, 5, 12, 24))


def test_a_non_square_padded_model_reloads_from_its_own_folder(tmp_path):
    """vitkit's folders state their geometry: their masks (here of padded, non-square grids) are checked against it."""
    model = _tiny(img_size=(72, 56), window_size=4)
    vitkit.save_pretrained(model, tmp_path / "saved")
    back = vitkit.load_model(tmp_path / "saved")
    assert any("checked equal to vitkit's" in n for n in back.load_report.notes)
    x = _input(model)
    assert torch.equal(_logits(back, x), _logits(model, x))
    state = load_file(tmp_path / "saved" / "model.safetensors")
    state["layers.0.blocks.1.attn.attn_mask"] = state["layers.0.blocks.1.attn.attn_mask"].roll(1, 0).contiguous()
    save_file(state, str(tmp_path / "saved" / "model.safetensors"))
    with pytest.raises(CheckpointMismatchError, match=r"layers\.0\.blocks\.1\.attn\.attn_mask"):
        vitkit.load_model(tmp_path / "saved")


def test_non_divisible_sizes_are_padded_not_refused():
    """200x200 → token grids 50, 25, 13, 7: padded windows (50 → 56) and odd merging (25 → 13) run; the pyramid
    keeps the true sizes."""
    model = _tiny(img_size=200, window_size=7)
    maps = model.forward_intermediates(_input(model, batch=1))
    assert [tuple(m.shape[-2:]) for m in maps] == [(50, 50), (25, 25), (13, 13), (7, 7)]
    assert model.layers[0].blocks[1].attn.attn_mask.shape == (64, 49, 49)  # (56 / 7)² windows of the padded grid


def get_swin_layer(name, num_layers, depths):
    """microsoft/SimMIM optimizer.py ``get_swin_layer``, transcribed (layer-wise lr decay for Swin fine-tuning)."""
    if name in ("mask_token"):
        return 0
    elif name.startswith("patch_embed"):
        return 0
    elif name.startswith("layers"):
        layer_id = int(name.split('.')[1])
        block_id = name.split('.')[3]
        if block_id == 'reduction' or block_id == 'norm':
            return sum(depths[:layer_id + 1])
        layer_id = sum(depths[:layer_id]) + int(block_id)
        return layer_id + 1
    else:
        return num_layers - 1


def test_layer_ids_are_simmims_through_the_official_names():
    with torch.device("meta"):
        model = vitkit.create_model(NAME, depths=(2, 1, 3, 2), img_size=128, window_size=4)
    depths = list(model.cfg.depths)
    for name, p in model.named_parameters():
        (official,) = OFFICIAL.inverse({name: p})
        assert model.layer_id(name) == get_swin_layer(official, sum(depths) + 2, depths), (name, official)
    assert model.num_layer_ids == sum(depths) + 2
    assert model.no_weight_decay() == {"relative_position_bias_table"}


def test_references_closed_form_reproduces_the_published_sizes():
    for name, cfg in VARIANTS.items():
        params, gmacs = closed_form_size(cfg)
        ref = REFERENCES[name]
        assert abs(params - ref.params_m) <= max(ref.params_tol, 1e-6) and math.isclose(gmacs, ref.gmacs,
                                                                                         rel_tol=ref.macs_rtol), name
    assert abs(closed_form_size(VARIANTS["swin_large_patch4_window12_384"])[1] - 103.9) < 0.05  # MODELHUB.md


def test_catalog_names_timm_hub_repositories_without_invented_hashes():
    assert set(WEIGHTS) == set(VARIANTS)
    for name, spec in WEIGHTS.items():
        assert spec.url.startswith(f"hf-hub:timm/{name}.ms_") and spec.source_format == "timm"
        assert spec.sha256 is None  # huggingface_hub verifies Hub files
