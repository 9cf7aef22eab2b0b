"""CCT (Hassani et al. 2021): the golden cases, reference cases made with the official code (tests/families/cct/data,
see its README), the sinusoidal table, the block order, the tokenizer geometry, the official key table in both
directions, input-size changes and the variant table against the official factory functions."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import vitkit
from vitkit.config import ConfigError
from vitkit.layers import Attention, Block, Mlp, sinusoid_table
from vitkit.families.cct.formats import OFFICIAL, official_hints
from vitkit.families.cct.model import CCTConfig, token_grid

from conftest import max_diff, randomize_
# The golden tests of tests/test_golden.py, parametrised here with the CCT cases (conftest reads GOLDEN_FAMILIES from
# the module that collects them).
from test_golden import test_golden_load_report, test_golden_logits, test_golden_pre_logits  # noqa: F401

GOLDEN_FAMILIES = {"cct"}
DATA = Path(__file__).parent / "data"
CASES = ["official_cct_2_3x2_32_shrunk", "official_cct_2_3x2_32_shrunk_sine"]


def _case(case_id: str) -> tuple[dict, dict, str]:
    folder = DATA / case_id
    meta = json.loads((folder / "case.json").read_text())
    return meta, load_file(str(folder / "io.safetensors")), str(folder / meta["checkpoint"])


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def _within(out: torch.Tensor, ref: torch.Tensor, meta: dict) -> bool:
    return bool(((out - ref).abs() <= meta["atol"] + meta["rtol"] * ref.abs()).all())


# --------------------------------------------------------------------------------- official reference cases
@pytest.mark.parametrize("case_id", CASES)
def test_official_reference_logits(case_id):
    meta, io, ckpt = _case(case_id)
    model = vitkit.create_model(meta["vitkit_model"], pretrained=ckpt, **meta["kwargs"])
    assert model.load_report.format == "official" and model.cfg.num_classes == meta["num_classes"]
    out = _logits(model, io["pixel_values"])
    assert _within(out, io["logits"], meta), max_diff(out, io["logits"])


@pytest.mark.parametrize("case_id", CASES)
def test_official_reference_at_another_size(case_id):
    """48 px instead of 32 (12x12 tokens instead of 8x8): what the official _cct does with a pretrained file at
    another size. Learnable: the table is resampled bilinearly (pe_check); sine: the 48-px model's own table."""
    meta, io, ckpt = _case(case_id)
    model = vitkit.create_model(meta["vitkit_model"], pretrained=ckpt, img_size=48, **meta["kwargs"])
    out = _logits(model, io["pixel_values_48"])
    assert _within(out, io["logits_48"], meta), max_diff(out, io["logits_48"])
    (resized,) = model.load_report.resized
    assert resized.startswith("pos_embed (1, 64, 64) → (1, 144, 64)")
    if model.cfg.positional_embedding == "sine":
        assert "regenerated" in resized
        assert torch.equal(model.pos_embed, sinusoid_table(144, 64, angle_dtype=torch.float32))
    else:
        assert "bilinear without antialiasing" in resized


@pytest.mark.parametrize("case_id", CASES)
def test_dynamic_img_size_matches_loading_at_that_size(case_id):
    """``dynamic_img_size=True`` does at forward time what loading at 48 px does at load time."""
    meta, io, ckpt = _case(case_id)
    model = vitkit.create_model(meta["vitkit_model"], pretrained=ckpt, dynamic_img_size=True, **meta["kwargs"])
    out = _logits(model, io["pixel_values_48"])
    assert _within(out, io["logits_48"], meta), max_diff(out, io["logits_48"])
    assert _within(_logits(model, io["pixel_values"]), io["logits"], meta)


def test_another_size_without_dynamic_img_size_is_a_clear_error():
    model = vitkit.create_model("cct_2_3x2_32", embedding_dim=64)
    with pytest.raises(ValueError, match=r"12x12 token grid but the model was built for 8x8.*img_size="):
        model(torch.zeros(1, 3, 48, 48))


@pytest.mark.parametrize("variant", ["cct_2_3x2_32", "cct_2_3x2_32_sine"])
def test_the_checkpoint_decides_the_kind_of_position_embedding(variant):
    """Either variant name loads either file: a sine table makes a sine model (a frozen buffer), a learned one a
    learnable model, and the report says it came from the checkpoint."""
    for case_id, kind in zip(CASES, ("learnable", "sine")):
        meta, io, ckpt = _case(case_id)
        model = vitkit.create_model(variant, pretrained=ckpt, **meta["kwargs"])
        assert model.cfg.positional_embedding == kind
        assert f"config positional_embedding='{kind}' taken from the checkpoint" in model.load_report.notes
        assert ("pos_embed" in dict(model.named_parameters())) == (kind == "learnable")
        assert "pos_embed" in model.state_dict()
        assert _within(_logits(model, io["pixel_values"]), io["logits"], meta)


def test_sine_table_is_loaded_from_the_checkpoint_and_checked(tmp_path):
    """A sine checkpoint's table is loaded, not regenerated: a table that is not the sinusoid (here shifted by
    0.01) is kept as trained, and the report says it differs."""
    meta, io, ckpt = _case("official_cct_2_3x2_32_shrunk_sine")
    model = vitkit.create_model("cct_2_3x2_32_sine", pretrained=ckpt, **meta["kwargs"])
    assert any("equal to the official formula's" in n for n in model.load_report.notes)
    state = torch.load(ckpt, weights_only=True)
    state["classifier.positional_emb"] = state["classifier.positional_emb"] + 0.01
    torch.save(state, tmp_path / "tampered.pth")
    assert official_hints(state)["positional_embedding"] == "learnable"  # no longer the sinusoid
    forced = vitkit.create_model("cct_2_3x2_32_sine", pretrained=str(tmp_path / "tampered.pth"),
                                 positional_embedding="sine", **meta["kwargs"])
    assert torch.equal(forced.pos_embed, state["classifier.positional_emb"])
    assert any("NOT the official sinusoid" in n and "kept as trained" in n for n in forced.load_report.notes)


# --------------------------------------------------------------------------------------------- layers and maths
def test_sinusoid_table_is_the_official_formula_bit_for_bit():
    """The official ``sinusoidal_embedding``: Python-float angles p / 10000^(2(i//2)/d) in a FloatTensor, then
    float32 sin on even and cos on odd channels (brute force here)."""
    for n, d in [(64, 64), (256, 256), (196, 384)]:
        angles = torch.FloatTensor([[p / (10000 ** (2 * (i // 2) / d)) for i in range(d)] for p in range(n)])
        ref = torch.empty_like(angles)
        ref[:, 0::2], ref[:, 1::2] = torch.sin(angles[:, 0::2]), torch.cos(angles[:, 1::2])
        assert torch.equal(sinusoid_table(n, d, angle_dtype=torch.float32), ref[None])
    assert 0 < max_diff(sinusoid_table(1024, 128, angle_dtype=torch.float32), sinusoid_table(1024, 128)) < 1e-4


def test_block_residual_norm_is_ccts_order():
    """z' = LN2(z + MSA(LN1(z))); out = z' + MLP(z'): the second norm normalises the stream itself (official
    TransformerEncoderLayer), written out by hand; the default Block stays pre-norm."""
    torch.manual_seed(0)
    attn = Attention(16, 2, qkv_bias=False)
    blk = randomize_(Block(16, mlp_ratio=2.0, norm_eps=1e-5, attn=attn, residual_norm=True)).eval()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        z = x + blk.attn(blk.norm1(x))
        z = blk.norm2(z)
        expected = z + blk.mlp(z)
        assert max_diff(blk(x), expected) < 1e-6
        blk.residual_norm = False
        z = x + blk.attn(blk.norm1(x))
        assert max_diff(blk(x), z + blk.mlp(blk.norm2(z))) < 1e-6
    assert isinstance(blk.mlp, Mlp) and blk.attn.qkv.bias is None


@pytest.mark.parametrize("name,tokens", [("cct_7_3x1_32", 256), ("cct_7_3x2_32", 64), ("cct_14_7x2_224", 196),
                                         ("cct_14_7x2_384", 576), ("cct_7_7x2_224", 196)])
def test_tokenizer_geometry(name, tokens):
    """Token counts of the official tokenizer (SHI-Labs/Compact-Transformers@cd11f09 src/utils/tokenizer.py: 3x1
    at 32 → 16x16, 3x2 → 8x8, 7x2 at 224 → 14x14); the closed-form grid equals the tokenizer's real output at odd
    sizes too (the official code probes with a dummy image)."""
    spec = vitkit.get_spec(name)
    cfg = CCTConfig(**spec.config)
    assert math.prod(token_grid(cfg, cfg.img_size, cfg.img_size)) == tokens
    model = vitkit.create_model(name, **spec.tiny)
    for h, w in [(33, 47), (50, 21)]:
        with torch.no_grad():
            n = model.tokenizer(torch.zeros(1, 3, h, w)).shape[1]
        assert n == math.prod(token_grid(model.cfg, h, w))


def test_drop_rates_follow_the_official_defaults():
    model = vitkit.create_model("cct_7_3x1_32")
    rates = [blk.drop_path1.p if hasattr(blk.drop_path1, "p") else 0.0 for blk in model.blocks]
    torch.testing.assert_close(torch.tensor(rates), torch.linspace(0, 0.1, 7))
    assert all(blk.attn.attn_drop == 0.1 for blk in model.blocks)
    assert model.pos_drop.p == 0.0 and isinstance(model.pos_embed, nn.Parameter)


# ----------------------------------------------------------------------------------------------- key table
def test_official_key_table_both_ways(golden_root):
    """vitkit → official (the inverse table) gives exactly the official key list and shapes of the golden case,
    and reads back to the same model."""
    case = golden_root / "official_cct_7_3x1_32"
    if not case.is_dir():
        pytest.skip("golden case official_cct_7_3x1_32 not found")
    expected = json.loads((case / "keys.json").read_text())
    model = randomize_(vitkit.create_model("cct_7_3x1_32", num_layers=2))
    official = OFFICIAL.inverse(model.state_dict())
    assert {k: list(v.shape) for k, v in official.items()} == expected
    back = vitkit.create_model("cct_7_3x1_32", num_layers=2)
    back.load_state_dict(OFFICIAL.forward(official))
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(_logits(back, x), _logits(model, x))


def test_new_class_count_gives_a_zero_head():
    meta, io, ckpt = _case("official_cct_2_3x2_32_shrunk")
    model = vitkit.create_model("cct_2_3x2_32", pretrained=ckpt, num_classes=100, **meta["kwargs"])
    assert model.head.out_features == 100 and not model.head.weight.any()
    assert model.load_report.reinitialized == ["head: 10 → 100 classes, zero-initialised"]


def test_convert_an_official_file(tmp_path):
    from vitkit.cli.main import main
    meta, io, ckpt = _case("official_cct_2_3x2_32_shrunk_sine")
    assert main(["convert", ckpt, str(tmp_path / "out"), "--model", "cct_2_3x2_32", "--set", "embedding_dim=64"]) == 0
    model = vitkit.load_model(tmp_path / "out")
    assert model.cfg.positional_embedding == "sine"
    assert _within(_logits(model, io["pixel_values"]), io["logits"], meta)


# ----------------------------------------------------------------------------------------------- the variants
def test_variants_match_the_official_factory_functions():
    """Every official variant is registered with its default class count (CIFAR 10, CCT-7/7x2 Flowers 102,
    CCT-14 ImageNet 1000), and its reference size is the one counted on the official code."""
    counted = json.loads((DATA / "official_sizes.json").read_text())
    assert sorted(counted) == vitkit.list_models("cct_*")
    for name, size in counted.items():
        spec = vitkit.get_spec(name)
        assert spec.config["num_classes"] == size["num_classes"]
        assert spec.config["positional_embedding"] == ("sine" if name.endswith("_sine") else "learnable")
        assert (spec.reference.params_m, spec.reference.gmacs) == pytest.approx((size["params_m"], size["gmacs"]))
    cfg = CCTConfig(**vitkit.get_spec("cct_7_3x1_32").config)
    assert (cfg.conv_stride, cfg.conv_padding) == (1, 1)  # official _cct: max(1, k//2 - 1), max(1, k//2)
    cfg = CCTConfig(**vitkit.get_spec("cct_14_7x2_224").config)
    assert (cfg.conv_stride, cfg.conv_padding) == (2, 3)


def test_published_sizes():
    """The official code's counts to two decimals (tests/families/cct/data/official_sizes.json, counted on
    SHI-Labs/Compact-Transformers@cd11f09): CCT-7/3x1 at 32 px with 10 classes 3.76 M / 1.18 G, CCT-14/7x2 22.37 M /
    5.52 G."""
    for name, params, gmacs in [("cct_7_3x1_32", 3.76, 1.18), ("cct_14_7x2_224", 22.37, 5.52)]:
        ref = vitkit.get_spec(name).reference
        assert (round(ref.params_m, 2), round(ref.gmacs, 2)) == (params, gmacs)


@pytest.mark.parametrize("override,field", [({"embedding_dim": 100, "num_heads": 3}, "embedding_dim"),
                                            ({"img_size": 4, "kernel_size": 7, "padding": 0}, "img_size"),
                                            ({"pooling_padding": 2}, "pooling_padding"),
                                            ({"positional_embedding": "rope"}, "positional_embedding"),
                                            ({"stochastic_depth": 1.0}, "stochastic_depth")])
def test_bad_config_names_the_field(override, field):
    with pytest.raises(ConfigError, match=field):
        vitkit.create_model("cct_7_3x1_32", **override)
