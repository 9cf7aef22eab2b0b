"""Every family as a backbone, shown end to end: the dense-prediction example (examples/dense_prediction.py) builds a
feature pyramid from Swin, PVT v2 and ViT (``features_only=True``) under a small segmentation head and trains it on
synthetic shapes; it must learn to find them (the per-family contract checks of ``feature_info``, ``features_only``,
grad checkpointing and ``in_chans`` are in test_contract.py)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))
import dense_prediction as example  # noqa: E402


def test_synthetic_shapes_are_what_the_masks_say():
    """Every marked pixel carries its shape's colour (the masks are the drawn shapes), and each class appears."""
    images, masks = example.shapes_batch(32, torch.Generator().manual_seed(0))
    assert images.shape == (32, 3, 64, 64) and masks.shape == (32, 64, 64)
    assert set(masks.unique().tolist()) == {0, 1, 2, 3}
    pixel = images.permute(0, 2, 3, 1)  # (B, H, W, 3)
    for b in range(4):
        for k in masks[b].unique().tolist():
            if k:  # a shape's pixels are one colour plus 5% noise: far less spread than the background's
                assert pixel[b][masks[b] == k].std(0).max() < 0.3


@pytest.mark.parametrize("backbone", sorted(example.BACKBONES))
def test_a_feature_pyramid_learns_to_segment(backbone):
    """100 steps of 8 images (a few seconds) lift the held-out mean IoU well above the all-background answer's, on
    maps the backbone's feature_info describes."""
    torch.manual_seed(0)
    model = example.build(backbone)
    maps = model.backbone(torch.zeros(1, 3, 64, 64))
    assert [m.shape[1] for m in maps] == [f["num_chs"] for f in model.backbone.feature_info]
    _, masks = example.held_out()
    _, background_miou = example.scores(torch.zeros_like(masks), masks)
    result = example.train(backbone, steps=100, batch=8)
    assert result.mean_iou > background_miou + 0.08, (result.line(), background_miou)
