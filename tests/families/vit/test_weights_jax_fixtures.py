"""The JAX importer against files written by the real code, not by this suite's own exporter: vit_jax's writer
(linen and pre-linen numbering, the AugReg ``opt/target/`` prefix, a tanh representation layer) and big_vision's
(scanned blocks under ``params/``), with the logits the JAX models computed. Provenance of every file (repository,
commit, writer): ``tests/families/vit/data/jax/README.md`` and ``fixtures.json`` beside it."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import vitkit

DATA = Path(__file__).parent / "data" / "jax"
MANIFEST = json.loads((DATA / "fixtures.json").read_text())["fixtures"]
REFERENCE = dict(np.load(DATA / "reference.npz"))
PIXELS = torch.from_numpy(REFERENCE["pixel_values"])  # (2, 3, 8, 8)

NUMBERING = {"linen": "linen", "pre-linen": "pre-linen", "opt-target": "pre-linen"}  # per fixtures.json layout


def _load(name: str) -> torch.nn.Module:
    meta = MANIFEST[name]
    return vitkit.create_model("vit_tiny_patch16_224", pretrained=str(DATA / f"{name}.npz"), img_size=meta["img_size"],
                               **meta["kwargs"]).eval()


def _assert_close_to_jax(out: torch.Tensor, ref: np.ndarray) -> None:
    ref_t = torch.from_numpy(ref)
    assert ref_t.std() > 0.1  # the reference varies: not a comparison of zeros
    ok = (out - ref_t).abs() <= 1e-4 + 1e-4 * ref_t.abs()
    assert ok.all(), f"max |diff| {(out - ref_t).abs().max().item():.2e} against the JAX logits"


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_real_jax_file_gives_the_jax_logits(name):
    meta = MANIFEST[name]
    model = _load(name)
    assert model.load_report.format == "jax" and model.cfg.act_layer == "gelu_tanh"
    with torch.no_grad():
        out = model(PIXELS)
    _assert_close_to_jax(out, REFERENCE[f"{name}/logits"])
    if meta["layout"] in NUMBERING:
        assert f"JAX module numbering: {NUMBERING[meta['layout']]}" in model.load_report.notes


def test_pre_logits_layer_is_dense_tanh_as_vit_jax_computes_it():
    model = _load("vit_jax_pre_logits")
    assert model.cfg.representation_size == 12
    with torch.no_grad():
        pre = model.forward_head(model.forward_features(PIXELS), pre_logits=True)
    _assert_close_to_jax(pre, REFERENCE["vit_jax_pre_logits/pre_logits"])


def test_big_vision_files_are_scanned_and_patch_only_pos_embedding():
    arrays = np.load(DATA / "big_vision_scan_tok.npz")
    assert arrays["params/Transformer/encoderblock/MlpBlock_0/Dense_0/kernel"].shape == (2, 16, 32)  # layer axis
    assert arrays["params/pos_embedding"].shape == (1, 4, 16)  # patches only: the class token has none
    tok, gap = _load("big_vision_scan_tok"), _load("big_vision_scan_gap")
    assert tok.cfg.class_token and tok.cfg.depth == 2
    assert not gap.cfg.class_token and gap.cfg.global_pool == "avg"
    assert torch.equal(tok.pos_embed[0, 0], torch.zeros(16))  # zero row prepended for the class token
