"""DeiT models: every registered variant builds, runs forward and backward (tiny overrides) and has the parameter count
of the paper (full size, on the meta device); the distillation token and heads (averaged at inference, both logits
while distilling), transformers' DeiT without a distillation head, and the plain DeiTs as ViTs. The helpers shared with
ViT's tests are in tests/families/vit/test_vit.py; the official code's own outputs are checked in
test_pos_embed_resize.py (tests/families/deit/data/official_deit_tiny_distilled_shrunk) and test_vit_options.py
(official_qk_scale)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import vitkit

from conftest import randomize_, tiny_overrides

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "vit"))  # ViT's test module holds the shared helpers
from test_vit import (check_dynamic_img_size_equals_model_built_at_that_size, check_forward_backward_tiny,  # noqa: E402
                      check_forward_intermediates_match_block_hooks, check_reset_classifier_gives_zero_head,
                      count_on_meta, expected_params)

DEIT = vitkit.list_models("deit_*")


def _tiny(name="deit_tiny_distilled_patch16_224", **extra):
    return randomize_(vitkit.create_model(name, **tiny_overrides(name, **extra)))


# --------------------------------------------------------------------------------------- every variant, tiny size
@pytest.mark.parametrize("name", DEIT)
def test_variant_forward_backward_tiny(name):
    check_forward_backward_tiny(name)


# ------------------------------------------------------------------------------------- parameter counts (meta device)
@pytest.mark.parametrize("name", DEIT)
def test_full_size_parameter_count_on_meta_device(name):
    count, _ = count_on_meta(name)
    assert count == expected_params(vitkit.get_spec(name).config, distilled="distilled" in name)


# (millions, 2 decimals). Paper: DeiT Table 1 (Ti 5M, S 22M, B 86M) and Table 5; the two decimals are timm's
# VisionTransformer / VisionTransformerDistilled counted (1000-class heads).
PUBLISHED = [
    ("deit_tiny_patch16_224", 5.72),
    ("deit_small_patch16_224", 22.05),  # DeiT-S 22.1 M
    ("deit_base_patch16_224", 86.57),
    ("deit_tiny_distilled_patch16_224", 5.91),
    ("deit_small_distilled_patch16_224", 22.44),
    ("deit_base_distilled_patch16_224", 87.34),  # DeiT-B distilled 87.34 M
    ("deit_base_patch16_384", 86.86),
    ("deit_base_distilled_patch16_384", 87.63),
]


@pytest.mark.parametrize("name,millions", PUBLISHED)
def test_parameter_count_matches_published(name, millions):
    count, _ = count_on_meta(name)
    assert round(count / 1e6, 2) == millions


# ---------------------------------------------------------------------------------------------- model interface
def test_reset_classifier_gives_zero_heads():
    check_reset_classifier_gives_zero_head("deit_tiny_distilled_patch16_224")


def test_no_weight_decay_names_the_distillation_token():
    deit = _tiny()
    assert {"pos_embed", "cls_token", "dist_token"} <= {n for n in deit.no_weight_decay()
                                                         if n in dict(deit.named_parameters())}


def test_forward_intermediates_match_block_hooks():
    check_forward_intermediates_match_block_hooks("deit_tiny_distilled_patch16_224", (48, 32))


def test_dynamic_img_size_equals_model_built_at_that_size():
    check_dynamic_img_size_equals_model_built_at_that_size("deit_tiny_distilled_patch16_224")


def test_distilled_deit_heads():
    model = _tiny("deit_tiny_distilled_patch16_224", num_classes=5)
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    feats = model.forward_features(x)
    assert feats.shape == (2, 2 + 4, 48)  # [cls, dist, patches]
    cls_logits = feats[:, 0] @ model.head.weight.T + model.head.bias
    dist_logits = feats[:, 1] @ model.head_dist.weight.T + model.head_dist.bias
    assert not torch.allclose(cls_logits, dist_logits)
    torch.testing.assert_close(model(x), (cls_logits + dist_logits) / 2)
    torch.testing.assert_close(model.forward_head(feats, pre_logits=True), (feats[:, 0] + feats[:, 1]) / 2)

    assert model.set_distilled_training(True) is True  # it has a distillation head, and switched it
    assert isinstance(model(x), torch.Tensor), "eval mode always returns the averaged logits"
    model.train()
    out = model(x)
    assert isinstance(out, tuple) and len(out) == 2
    torch.testing.assert_close(out[0], cls_logits)
    torch.testing.assert_close(out[1], dist_logits)
    assert model.set_distilled_training(False) is True
    torch.testing.assert_close(model(x), (cls_logits + dist_logits) / 2)


def test_deit_without_distillation_head_classifies_the_class_token():
    """transformers' DeiTForImageClassification: the distillation token is in the sequence, only cls is classified."""
    model = _tiny("deit_tiny_distilled_patch16_224", num_classes=5, dist_head=False).eval()
    assert model.head_dist is None and "head_dist.weight" not in model.state_dict()
    x = torch.randn(2, 3, 32, 32)
    feats = model.forward_features(x)
    assert feats.shape == (2, 6, 48)
    torch.testing.assert_close(model(x), feats[:, 0] @ model.head.weight.T + model.head.bias)
    model.reset_classifier(3)
    assert model(x).shape == (2, 3) and model.head_dist is None
    assert model.set_distilled_training(True) is False  # one head: nothing to switch
    assert isinstance(model.train()(x), torch.Tensor)


def test_plain_deit_is_a_vit_with_imagenet_normalisation():
    deit = vitkit.create_model("deit_small_patch16_224", **tiny_overrides("deit_small_patch16_224"))
    vit = vitkit.create_model("vit_small_patch16_224", **tiny_overrides("vit_small_patch16_224"))
    assert type(deit).__bases__ == (type(vit),) and type(deit).config_cls.__bases__ == (type(vit).config_cls,)
    assert type(deit).forward is type(vit).forward  # only the config's refusals differ (hybrid_backbone)
    assert {k: v.shape for k, v in deit.state_dict().items()} == {k: v.shape for k, v in vit.state_dict().items()}
    assert deit.data_cfg.mean == (0.485, 0.456, 0.406) and vit.data_cfg.mean == (0.5, 0.5, 0.5)
    assert deit.set_distilled_training(True) is False  # no distillation head
