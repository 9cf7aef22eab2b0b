"""T2T-ViT against the official code: the golden cases (run by the golden tests imported below), the official
reference cases in tests/families/t2t_vit/data (README there: official code on random weights with a live Performer
kernel, a CheckpointSaver file whose EMA and raw weights differ, the CIFAR container, another input size), and the
parts checked against brute-force formulas: the Performer kernel and its recorded map, the sinusoidal table, the
soft-split grid. timm and transformers have no T2T-ViT, so there is no other format to test.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import vitkit
from vitkit.config import ConfigError
from vitkit.families.t2t_vit.model import t2t_grid
from vitkit.layers import favor_attention, implied_attention, sinusoid_table
from vitkit.layers.performer import log_features
from vitkit.weights import CheckpointError
from vitkit.weights.load_report import CheckpointMismatchError

from conftest import eval_forward, golden_close, max_diff, randomize_, tiny_overrides

DATA = Path(__file__).parent / "data"
PERFORMER = DATA / "performer_64"
# the official constructor arguments of tests/families/t2t_vit/data/performer_64, as vitkit overrides of t2t_vit_7
PERFORMER_KW = dict(img_size=64, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, token_dim=16, qk_scale=32 ** -0.5)


@pytest.fixture(scope="module")
def performer_io():
    return load_file(str(PERFORMER / "io.safetensors"))


def _golden_checkpoint(golden_root, case: str) -> dict:
    return torch.load(golden_root / case / "checkpoint.pth.tar", weights_only=True)


# ------------------------------------------------------------------------------------------ official reference
def test_official_performer_loads_the_ema_weights_by_default(performer_io):
    model = vitkit.create_model("t2t_vit_7", pretrained=str(PERFORMER / "checkpoint.pth.tar"), **PERFORMER_KW)
    out = eval_forward(model, performer_io["pixel_values"])
    assert golden_close(out, performer_io["logits_ema"]), max_diff(out, performer_io["logits_ema"])
    assert not golden_close(out, performer_io["logits_state_dict"])  # the two weight sets really differ
    report = model.load_report
    assert report.format == "official" and report.container == "{'state_dict_ema': state_dict}"
    assert any("'state_dict' (different weights)" in n and "checkpoint_key" in n for n in report.notes), report.notes
    assert model.num_classes == 10  # from the checkpoint's head


def test_official_performer_state_dict_on_request(performer_io, tmp_path):
    path = str(PERFORMER / "checkpoint.pth.tar")
    model = vitkit.create_model("t2t_vit_7", pretrained=path, checkpoint_key="state_dict", **PERFORMER_KW)
    assert golden_close(eval_forward(model, performer_io["pixel_values"]), performer_io["logits_state_dict"])
    assert model.load_report.container == "{'state_dict': state_dict}"
    assert any("'state_dict_ema' (different weights)" in n for n in model.load_report.notes)
    # the same choice from the command line
    from vitkit.cli.main import main
    args = ["convert", path, str(tmp_path / "raw"), "--model", "t2t_vit_7", "--checkpoint-key", "state_dict"]
    args += [f"--set={k}={v}" for k, v in PERFORMER_KW.items() if k != "img_size"] + ["--img-size", "64"]
    assert main(args) == 0
    assert golden_close(eval_forward(vitkit.load_model(tmp_path / "raw"), performer_io["pixel_values"]),
                  performer_io["logits_state_dict"])


def test_checkpoint_key_errors(tmp_path):
    path = str(PERFORMER / "checkpoint.pth.tar")
    with pytest.raises(CheckpointError, match=r"checkpoint_key='model' is not in the file \(it holds state dicts "
                                              r"under 'state_dict', 'state_dict_ema'\)"):
        vitkit.create_model("t2t_vit_7", pretrained=path, checkpoint_key="model", **PERFORMER_KW)
    with pytest.raises(ValueError, match="checkpoint_key='state_dict' needs a checkpoint"):
        vitkit.create_model("t2t_vit_7", checkpoint_key="state_dict")
    bare = tmp_path / "bare.pth"
    torch.save(torch.load(path, weights_only=True)["state_dict_ema"], bare)
    with pytest.raises(CheckpointError, match="a bare state dict, no container"):
        vitkit.create_model("t2t_vit_7", pretrained=str(bare), checkpoint_key="state_dict", **PERFORMER_KW)
    model = vitkit.create_model("t2t_vit_7", pretrained=str(bare), **PERFORMER_KW)
    vitkit.save_pretrained(model, tmp_path / "folder")
    with pytest.raises(CheckpointError, match="holds only one"):
        vitkit.load_model(tmp_path / "folder", checkpoint_key="state_dict")


def test_qk_scale_is_the_official_evaluations_unless_overridden(performer_io):
    """The reference case was built with qk_scale = embed_dim^-1/2 (the pretrained=True branch); the default
    (head_dim^-1/2, what the official evaluation builds) gives other logits with the same weights."""
    kw = {k: v for k, v in PERFORMER_KW.items() if k != "qk_scale"}
    model = vitkit.create_model("t2t_vit_7", pretrained=str(PERFORMER / "checkpoint.pth.tar"), **kw)
    assert all(b.attn.scale == 16 ** -0.5 for b in model.blocks)  # head_dim = 32 / 2
    assert max_diff(eval_forward(model, performer_io["pixel_values"]), performer_io["logits_ema"]) > 1e-2


def test_another_input_size_regenerates_the_sinusoid_when_asked(performer_io):
    """``pos_embed_resize="sinusoid"``: the 64-px checkpoint in a 96-px model runs with the 96-px model's own
    sinusoidal table, the official code's output when its constructor builds the table for 96 px. By default the
    table is interpolated as the official transfer-learning loader does it (tests/test_pos_embed_resize.py); the two
    differ."""
    kw = {**PERFORMER_KW, "img_size": 96}
    model = vitkit.create_model("t2t_vit_7", pretrained=str(PERFORMER / "checkpoint.pth.tar"), **kw,
                                pos_embed_resize="sinusoid")
    out, ref = eval_forward(model, performer_io["pixel_values_96"]), performer_io["logits_96_regenerated"]
    assert golden_close(out, ref), max_diff(out, ref)
    assert max_diff(out, performer_io["logits_96_interpolated"]) > 1e-2
    assert torch.equal(model.pos_embed, sinusoid_table(37, 32))
    (line,) = model.load_report.resized
    assert line.startswith("pos_embed (1, 17, 32) → (1, 37, 32) (grid 4x4 → 6x6, sinusoidal table regenerated")
    assert "chosen with pos_embed_resize='sinusoid'" in line


def test_a_table_that_is_not_sinusoidal_is_said_so_when_the_sinusoid_replaces_it(tmp_path):
    source = randomize_(vitkit.create_model("t2t_vit_7", **tiny_overrides("t2t_vit_7")))
    with torch.no_grad():
        source.pos_embed.add_(0.1)
    vitkit.save_pretrained(source, tmp_path / "m")
    big = vitkit.create_model("t2t_vit_7", pretrained=str(tmp_path / "m"), **tiny_overrides("t2t_vit_7", img_size=64))
    (line,) = big.load_report.resized
    assert "bicubic without antialias: yitu-opensource/T2T-ViT utils.py@0f63dc9" in line
    big = vitkit.create_model("t2t_vit_7", pretrained=str(tmp_path / "m"), pos_embed_resize="sinusoid",
                              **tiny_overrides("t2t_vit_7", img_size=64))
    assert "regenerated" in big.load_report.resized[0]
    assert any("not the sinusoid" in n for n in big.load_report.notes)


def test_official_transformer_cifar_container():
    io = load_file(str(DATA / "transformer_48_cifar" / "io.safetensors"))
    model = vitkit.create_model("t2t_vit_t_14", pretrained=str(DATA / "transformer_48_cifar" / "ckpt.pth"),
                                img_size=48, embed_dim=24, depth=2, num_heads=3, token_dim=16)
    out = eval_forward(model, io["pixel_values"])
    assert golden_close(out, io["logits"]), max_diff(out, io["logits"])
    report = model.load_report
    assert report.container == "{'net': state_dict}" and any("'module.'" in n for n in report.notes)


# ------------------------------------------------------------------------------------------ golden checkpoints
def test_golden_frozen_tensors_are_loaded_not_redrawn(golden_root):
    """The Performer features and the position table are the checkpoint's, whatever the random state; the official
    table is exactly vitkit's sinusoid_table."""
    state = _golden_checkpoint(golden_root, "official_t2t_vit_7")["state_dict_ema"]
    path = str(golden_root / "official_t2t_vit_7" / "checkpoint.pth.tar")
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = vitkit.create_model("t2t_vit_7", pretrained=path, depth=2)
        for i in (1, 2):
            stored = state[f"tokens_to_token.attention{i}.w"]
            attn = getattr(model.tokens_to_token, f"attention{i}").attn
            assert stored.dtype == torch.float32 and stored.shape == (32, 64)
            assert torch.equal(attn.w, stored) and not attn.w.requires_grad
        assert torch.equal(model.pos_embed, state["pos_embed"]) and not model.pos_embed.requires_grad
    assert torch.equal(state["pos_embed"], sinusoid_table(197, 256))


def test_redrawn_features_would_change_the_output(performer_io):
    """With a live kernel (the reference case), other random features give other logits: loading them matters."""
    model = vitkit.create_model("t2t_vit_7", pretrained=str(PERFORMER / "checkpoint.pth.tar"), **PERFORMER_KW)
    with torch.no_grad():
        for i in (1, 2):
            getattr(model.tokens_to_token, f"attention{i}").attn.w.copy_(vitkit.layers.orthogonal_features(8, 16))
    assert max_diff(eval_forward(model, performer_io["pixel_values"]), performer_io["logits_ema"]) > 1e-3


def test_a_checkpoint_of_the_other_t2t_type_names_the_right_variants(golden_root):
    path = str(golden_root / "official_t2t_vit_7" / "checkpoint.pth.tar")
    with pytest.raises(CheckpointMismatchError, match=r"holds a Performer T2T module, but t2t_vit_t_14 has a "
                                                      r"Transformer one: load it into t2t_vit_7/10/12/14/19/24"):
        vitkit.create_model("t2t_vit_t_14", pretrained=path, embed_dim=256, depth=2, num_heads=4, mlp_ratio=2.0)


# ---------------------------------------------------------------------------------------------- the Performer
def _brute_force_kernel(q, k, w):
    """φ(q)φ(k)ᵀ in float64 straight from the definition φ(x) = exp(Wx − |x|²/2)/√m (FAVOR+ Lemma 1)."""
    q, k, w = q.double(), k.double(), w.double()
    phi = lambda x: torch.exp(x @ w.t() - (x * x).sum(-1, keepdim=True) / 2) / math.sqrt(w.shape[0])  # noqa: E731
    return phi(q) @ phi(k).transpose(-2, -1)  # (B, N, M)


def test_favor_attention_is_the_kernel_formula_and_records_its_map():
    g = torch.Generator().manual_seed(0)
    q, k, v = (0.3 * torch.randn(2, 11, 8, generator=g) for _ in range(3))
    w = vitkit.layers.orthogonal_features(4, 8, generator=g)
    K = _brute_force_kernel(q, k, w)  # (2, 11, 11)
    expected = (K @ v.double()) / (K.sum(-1, keepdim=True) + 1e-8)
    seen = {}
    out = favor_attention(q, k, v, w, eps=1e-8, record=lambda a, **info: seen.update(attn=a, **info), grid=(1, 11))
    assert max_diff(out, expected) < 1e-6
    A = K / K.sum(-1, keepdim=True)
    assert seen["attn"].shape == (2, 1, 11, 11) and max_diff(seen["attn"][:, 0], A) < 1e-6
    assert seen["grid"] == (1, 11) and seen["row_mass"].shape == (2, 1, 11)
    # the documented identity: output = row_mass · A v
    assert max_diff(seen["row_mass"][:, 0, :, None] * (seen["attn"][:, 0] @ v), out) < 1e-6


def test_implied_attention_survives_an_underflowing_kernel():
    """Large keys make every φ(k) underflow to 0 in float32: the layer's output is then ~0 (ε dominates, as in the
    official code), but the recorded map is still a proper distribution, the float64 kernel's normalised rows."""
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 6, 16, generator=g), 6 * torch.randn(1, 6, 16, generator=g)
    w = vitkit.layers.orthogonal_features(8, 16, generator=g)
    lq, lk = log_features(q, w), log_features(k, w)
    assert torch.exp(lk).max() == 0  # the float32 features are gone
    A = implied_attention(lq, lk, chunk_elements=50)  # several row chunks
    K = _brute_force_kernel(q, k, w)
    assert torch.isfinite(A).all() and max_diff(A.sum(-1), torch.ones(1, 6)) < 1e-6
    assert max_diff(A, K / K.sum(-1, keepdim=True)) < 1e-5


def test_recording_adds_no_counted_arithmetic():
    """vitkit counts MACs with recording on; the Performer's map is computed outside matrix products, so the T2T
    module counts the same either way (its FAVOR+ products are counted, as the published MACs count them)."""
    from torch.utils.flop_counter import FlopCounterMode
    model = vitkit.create_model("t2t_vit_7", **tiny_overrides("t2t_vit_7")).eval()
    x = torch.randn(1, 3, 32, 32)
    counts = []
    for record in (False, True):
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter, (vitkit.record_attention(model) if record else torch.enable_grad()):
            model.tokens_to_token(x)
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] > 0


def test_recorded_maps_of_both_t2t_types(golden_root):
    for name in ("t2t_vit_7", "t2t_vit_t_14"):
        model = randomize_(vitkit.create_model(name, **tiny_overrides(name))).eval()
        with torch.no_grad(), vitkit.record_attention(model) as maps:
            model(torch.randn(2, 3, 32, 32))
        attn = maps["tokens_to_token.attention1.attn"]
        assert attn.shape == (2, 1, 64, 64) and maps.info["tokens_to_token.attention1.attn"]["grid"] == (8, 8)
        assert maps["tokens_to_token.attention2.attn"].shape == (2, 1, 16, 16)
        assert ("row_mass" in maps.info["tokens_to_token.attention1.attn"]) == (name == "t2t_vit_7")
        assert maps["blocks.0.attn"].shape == (2, 2, 5, 5)


# ------------------------------------------------------------------------------------------ tables and grids
def test_sinusoid_table_is_the_formula():
    table = sinusoid_table(7, 6)
    for p in range(7):
        for j in range(6):
            angle = p / 10000 ** (2 * (j // 2) / 6)
            assert table[0, p, j].item() == pytest.approx(math.sin(angle) if j % 2 == 0 else math.cos(angle), abs=1e-7)


@pytest.mark.parametrize("size", [224, 384, 32, 200, (64, 96), (50, 33)])
def test_t2t_grid_is_what_the_unfolds_produce(size):
    """The grid vitkit sizes the position table for is the token grid the soft splits really produce, also where the
    official ``img_size // 16`` is not (200 px: 13x13 tokens, the official code would build a 12x12 table)."""
    model = vitkit.create_model("t2t_vit_7", **tiny_overrides("t2t_vit_7", img_size=size, depth=1))
    H, W = (size, size) if isinstance(size, int) else size
    tokens = model.tokens_to_token(torch.randn(1, 3, H, W))
    assert tokens.shape[1] == t2t_grid(size)[0] * t2t_grid(size)[1] == model.pos_embed.shape[1] - 1
    assert eval_forward(model, torch.randn(1, 3, H, W)).shape == (1, model.num_classes)


def test_an_input_of_another_size_is_a_value_error():
    model = vitkit.create_model("t2t_vit_7", **tiny_overrides("t2t_vit_7"))
    with pytest.raises(ValueError, match=r"a 64x64 input gives a 4x4 token grid; .* img_size=32 \(2x2\)"):
        model(torch.randn(1, 3, 64, 64))


# ------------------------------------------------------------------------------------------ config and training
def test_config_validation_and_official_defaults():
    with pytest.raises(ConfigError, match="tokens_type .convolution. cannot run in the official code"):
        vitkit.create_model("t2t_vit_7", tokens_type="convolution")
    with pytest.raises(ConfigError, match="kernel_ratio"):
        vitkit.create_model("t2t_vit_7", kernel_ratio=0.01)
    with pytest.raises(ConfigError, match="img_size"):
        vitkit.create_model("t2t_vit_7", img_size=2)
    performer = vitkit.create_model("t2t_vit_14", depth=1)
    transformer = vitkit.create_model("t2t_vit_t_14", depth=1)
    t2t = performer.tokens_to_token.attention1
    assert t2t.attn.proj_drop.p == t2t.mlp_drop.p == 0.1  # Token_performer's dp1, dp2
    assert transformer.tokens_to_token.attention1.mlp_drop.p == 0.0  # Token_transformer gets drop=0
    assert transformer.tokens_to_token.attention1.attn.scale == 147 ** -0.5  # the input width, one head
    assert performer.blocks[0].attn.scale == 64 ** -0.5 and performer.blocks[0].attn.qkv.bias is None
    assert performer.blocks[0].norm1.eps == 1e-5


def test_frozen_tensors_stay_frozen_in_training():
    from vitkit.train.optim import param_groups
    model = randomize_(vitkit.create_model("t2t_vit_7", **tiny_overrides("t2t_vit_7", num_classes=3))).train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert sorted(frozen) == ["pos_embed", "tokens_to_token.attention1.attn.w", "tokens_to_token.attention2.attn.w"]
    groups = param_groups(model, weight_decay=0.05)
    assert not set(frozen) & {n for g in groups for n in g["param_names"]}
    opt = torch.optim.AdamW([p for g in groups for p in g["params"]], lr=1e-2)
    model(torch.randn(2, 3, 32, 32)).logsumexp(-1).sum().backward()
    opt.step()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


# ------------------------------------------------------------------------------------- the official key layout
@pytest.mark.parametrize("case", ["official_t2t_vit_7", "official_t2t_vit_t_14_shrunk"])
def test_rename_table_inverse_writes_the_official_keys(golden_root, case):
    """vitkit's state dict written back through the inverse of the rename table has exactly the official keys and
    shapes of the golden checkpoint (keys.json, read from the official files)."""
    import json
    from vitkit.families.t2t_vit.formats import OFFICIAL
    meta = json.loads((golden_root / case / "case.json").read_text())
    with torch.device("meta"):
        model = vitkit.create_model(meta["vitkit_model"], **meta["kwargs"])
    official = OFFICIAL[model.cfg.tokens_type].inverse(model.state_dict())
    assert {k: list(v.shape) for k, v in official.items()} == json.loads((golden_root / case / "keys.json").read_text())


def test_a_full_size_release_layout_names_its_variant_and_size(tmp_path):
    """A file laid out like the releases (here T2T-ViT-7 trained at 384 px, random weights) converts without --model:
    the T2T type, width, depth and MLP ratio name the variant, the position table the input size."""
    from vitkit.cli.main import main
    from vitkit.families.t2t_vit.formats import OFFICIAL
    source = vitkit.create_model("t2t_vit_7", img_size=384)
    path = tmp_path / "71.7_T2T_ViT_7_384.pth.tar"
    official = OFFICIAL["performer"].inverse(source.state_dict())
    torch.save({"epoch": 310, "arch": "t2t_vit_7", "state_dict_ema": official}, path)
    assert vitkit.registry.infer_variant(path) == ("t2t_vit_7", {"img_size": 384})
    model = vitkit.create_model("t2t_vit_7", pretrained=str(path))
    assert model.cfg.img_size == 384 and model.data_cfg.input_size == (3, 384, 384)
    assert "config img_size=384 taken from the checkpoint" in model.load_report.notes
    assert main(["convert", str(path), str(tmp_path / "out")]) == 0
    x = torch.randn(1, 3, 384, 384)
    assert torch.equal(eval_forward(vitkit.load_model(tmp_path / "out"), x), eval_forward(source, x))
