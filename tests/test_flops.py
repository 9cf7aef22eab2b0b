"""Parameter and MAC counts against the papers and against a count written out by hand."""
from __future__ import annotations

import csv
import io
import json

import pytest
import torch

import vitkit
from vitkit.bench.flops import count_flops, count_macs, count_params, model_stats
from vitkit.cli.main import main


@pytest.mark.parametrize("name,millions", [
    ("vit_base_patch16_224", 86.6),  # ViT paper Table 1: 86M; timm 86.57 M
    ("vit_large_patch16_224", 304.3),  # ViT paper: 307M; timm 304.33 M
    ("deit_small_patch16_224", 22.1),  # DeiT Table 1: 22M; timm card 22.1 M
    ("vit_tiny_patch16_224", 5.7),  # DeiT-Ti / AugReg Ti: 5.7 M
])
def test_parameter_counts_match_the_papers(name, millions):
    assert model_stats(name).params / 1e6 == pytest.approx(millions, abs=0.05)


@pytest.mark.parametrize("name,gmacs,rel", [
    ("vit_base_patch16_224", 17.6, 0.01),  # DeiT Table 1 / timm: 17.6 GFLOPs (= MACs)
    ("deit_tiny_distilled_patch16_224", 1.26, 0.005),  # timm's VisionTransformer counted
])
def test_macs_match_the_papers(name, gmacs, rel):
    assert model_stats(name).macs / 1e9 == pytest.approx(gmacs, rel=rel)


def vit_macs_by_hand(N: int, prefix: int, D: int, hidden: int, depth: int, C: int, P: int, classes: int,
                heads: int = 1) -> int:
    """Forward MACs of a ViT written out: patch-embedding conv, per block qkv / proj / fc1 / fc2 dense layers and
    the two attention products (Q·Kᵀ and A·V: N'²·D each), then the classifier on the pooled token(s)."""
    T = N + prefix  # tokens, prefix included
    patch_embed = N * D * (C * P * P)
    per_block = T * D * 3 * D + T * D * D + T * D * hidden + T * hidden * D + 2 * T * T * D
    return patch_embed + depth * per_block + heads * D * classes


TINY = dict(img_size=32, patch_size=8, embed_dim=24, depth=2, num_heads=2, mlp_ratio=2.0, num_classes=5)


def test_macs_of_a_tiny_vit_by_hand():
    model = vitkit.create_model("vit_tiny_patch16_224", **TINY)
    expected = vit_macs_by_hand(N=16, prefix=1, D=24, hidden=48, depth=2, C=3, P=8, classes=5)
    assert expected == 258264
    assert count_macs(model) == expected


def test_macs_of_a_tiny_distilled_deit_by_hand():
    model = vitkit.create_model("deit_tiny_distilled_patch16_224", **TINY)
    assert count_macs(model) == vit_macs_by_hand(N=16, prefix=2, D=24, hidden=48, depth=2, C=3, P=8, classes=5, heads=2)


def test_attention_products_are_counted_on_cpu_and_meta_alike():
    """The CPU flash kernel of SDPA is invisible to FlopCounterMode; the count must not depend on it."""
    real = vitkit.create_model("vit_tiny_patch16_224", **TINY)
    with torch.device("meta"):
        meta = vitkit.create_model("vit_tiny_patch16_224", **TINY)
    assert count_macs(real) == count_macs(meta)
    assert all(m.attn_recorder is None for m in real.modules() if hasattr(m, "attn_recorder"))


def test_count_macs_takes_an_input_size_and_scales_with_tokens():
    model = vitkit.create_model("vit_tiny_patch16_224", **TINY, dynamic_img_size=True)
    at_64 = count_macs(model, (3, 64, 64))
    assert at_64 == vit_macs_by_hand(N=64, prefix=1, D=24, hidden=48, depth=2, C=3, P=8, classes=5)


def test_training_flops_are_about_three_forwards():
    with torch.device("meta"):
        model = vitkit.create_model("vit_tiny_patch16_224", **TINY).eval()
    fwd, train = count_flops(model), count_flops(model, backward=True)
    assert 2.5 * fwd < train <= 3 * fwd  # backward ≈ 2 × forward (no gradient for the input image)
    assert not model.training  # the caller's mode is restored


def test_count_params_trainable_only():
    model = vitkit.create_model("vit_tiny_patch16_224", **TINY)
    total = count_params(model)
    model.patch_embed.requires_grad_(False)
    assert count_params(model, trainable_only=True) == total - sum(p.numel() for p in model.patch_embed.parameters())


# ----------------------------------------------------------------------------------------------------- the CLI
def test_models_command_json_csv_and_table(capsys):
    assert main(["models", "deit_tiny*", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == vitkit.list_models("deit_tiny*")
    distilled = next(r for r in rows if r["name"] == "deit_tiny_distilled_patch16_224")
    assert distilled["family"] == "deit" and distilled["input_size"] == [3, 224, 224]
    assert distilled["gflops"] == pytest.approx(1.26, abs=0.005) and distilled["params_m"] == pytest.approx(5.91, abs=0.01)

    assert main(["models", "vit_base_patch16_*", "--format", "csv"]) == 0
    table = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["name"] for r in table] == ["vit_base_patch16_224", "vit_base_patch16_384"]
    assert float(table[1]["gflops"]) == pytest.approx(55.48, abs=0.01) and table[1]["input"] == "384x384"

    assert main(["models", "vit_base_patch16_224"]) == 0
    out = capsys.readouterr().out
    assert "vit_base_patch16_224" in out and "86.57" in out and "17.56" in out


def test_models_command_unknown_pattern_is_an_error(capsys):
    assert main(["models", "no_such_model*"]) == 2
    assert "no model matches" in capsys.readouterr().err
