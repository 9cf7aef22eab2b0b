"""Golden cases of every registered family, run exactly as ../shared/golden/check.py runs them: the reference
implementations' own outputs (official code, timm, the JAX ViT code, transformers) on seeded random weights.

Cases come from ``$VITKIT_GOLDEN`` or ``../shared/golden`` (see conftest.py); missing cases skip locally and fail
under CI=true.
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import vitkit

from conftest import GoldenCase, skip_or_fail

GOLDEN_FAMILIES = set(vitkit.registry.list_families())  # case.json "family" names are vitkit's family names

# the load report's format for each case.json source_format (a bare official state dict reads as timm's layout)
_REPORTED_FORMAT = {"jax": {"jax"}, "hf": {"hf"}, "timm": {"timm"}, "official": {"official", "timm"}}


_LOADED: dict[str, tuple] = {}


def _load(case: GoldenCase):
    """The case's model, built exactly as check.py builds it (once per case for the tests of this module)."""
    key = str(case.folder)
    if key not in _LOADED:
        meta = case.meta
        model = vitkit.create_model(meta["vitkit_model"], pretrained=str(case.checkpoint),
                                    num_classes=meta["num_classes"], **meta.get("kwargs", {}))
        model.eval()
        _LOADED[key] = model, load_file(str(case.folder / "io.safetensors"))
    return _LOADED[key]


def _within_tolerance(out: torch.Tensor, ref: torch.Tensor, meta: dict) -> torch.Tensor:
    atol, rtol = float(meta.get("atol", 1e-4)), float(meta.get("rtol", 1e-4))
    return (out - ref).abs() <= atol + rtol * ref.abs()


def _case(golden_root, golden_case) -> GoldenCase:
    if golden_case is None:
        skip_or_fail(f"no {'/'.join(sorted(GOLDEN_FAMILIES))} golden case under {golden_root}")
    return golden_case


def test_golden_logits(golden_root, golden_case):
    case = _case(golden_root, golden_case)
    model, io = _load(case)
    with torch.no_grad():
        out = model(io["pixel_values"].float())
    assert isinstance(out, torch.Tensor), f"model output is {type(out).__name__}"
    ref = io["logits"].float()
    assert out.shape == ref.shape and torch.isfinite(out).all()
    ok = _within_tolerance(out.float(), ref, case.meta)
    assert ok.all(), f"max |diff| {(out - ref).abs().max().item():.3e}, {int((~ok).sum())} values outside tolerance"


def test_golden_pre_logits(golden_root, golden_case):
    """The input of the final classifier: pooled, normed feature (distilled DeiT: (cls + dist) / 2, JAX with a
    representation layer: its tanh output)."""
    case = _case(golden_root, golden_case)
    model, io = _load(case)
    if "pre_logits" not in io:
        pytest.skip(f"{case.case_id}: io.safetensors has no pre_logits")
    with torch.no_grad():
        pre = model.forward_head(model.forward_features(io["pixel_values"].float()), pre_logits=True)
    ref = io["pre_logits"].float()
    assert pre.shape == ref.shape
    ok = _within_tolerance(pre, ref, case.meta)
    assert ok.all(), f"max |diff| {(pre - ref).abs().max().item():.3e}"


def test_golden_load_report(golden_root, golden_case):
    case = _case(golden_root, golden_case)
    model, _ = _load(case)
    report = model.load_report
    assert report.format in _REPORTED_FORMAT[case.meta["source_format"]]
    if case.meta.get("dtype_stored") == "float16":
        assert report.upcast and report.upcast[0].startswith("float16")
    assert report.reinitialized == [] and report.resized == []  # the case is loaded at its own size and classes
