"""vitkit.data.mixup: soft targets, CutMix's area-corrected lambda, identities, and the loss."""
import pytest
import torch
import torch.nn.functional as F

from vitkit.data import AugmentConfig, MixupCutmix, SoftTargetCrossEntropy, build_mixup, smooth_one_hot
from vitkit.data.mixup import MixParams, cutmix_box

K = 5


def _batch(B=6, H=16, W=16):
    g = torch.Generator().manual_seed(0)
    return torch.randn(B, 3, H, W, generator=g), torch.arange(B) % K


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_smooth_one_hot():
    y = smooth_one_hot(torch.tensor([0, 3]), 4, 0.2)
    assert torch.allclose(y.sum(1), torch.ones(2))
    assert torch.allclose(y[0], torch.tensor([0.85, 0.05, 0.05, 0.05])) and y[1].argmax() == 3
    assert torch.equal(smooth_one_hot(torch.tensor([2]), 4), torch.tensor([[0.0, 0.0, 1.0, 0.0]]))


@pytest.mark.parametrize("kwargs", [dict(mixup_alpha=0.0, cutmix_alpha=0.0), dict(prob=0.0)])
def test_identity_when_disabled(kwargs):
    x, y = _batch()
    mix = MixupCutmix(**{**dict(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=K), **kwargs})
    images, targets = mix(x, y, _gen())
    assert torch.equal(images, x) and torch.allclose(targets, smooth_one_hot(y, K, 0.1))


def test_mixup_blends_images_and_targets_with_the_same_lambda():
    x, _ = _batch()
    y = torch.tensor([0, 1, 2, 3, 4, 1])  # sample 0 is paired with sample 5
    mix = MixupCutmix(mixup_alpha=0.8, cutmix_alpha=0.0, label_smoothing=0.0, num_classes=K)
    p = mix.params(16, 16, _gen(3))
    assert p.box is None and 0.0 <= p.lam <= 1.0
    images, targets = mix.apply(x, y, p)
    assert torch.allclose(images, p.lam * x + (1 - p.lam) * x.flip(0))
    assert torch.allclose(targets.sum(1), torch.ones(6))
    assert torch.allclose(targets[0, y[0]], torch.tensor(p.lam)) and torch.allclose(targets[0, y[5]],
                                                                                   torch.tensor(1 - p.lam))
    assert torch.equal(x, _batch()[0])  # inputs untouched


def test_cutmix_lambda_is_corrected_to_the_pasted_area():
    x, y = _batch(H=20, W=24)
    mix = MixupCutmix(mixup_alpha=0.0, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=K)
    for seed in range(30):
        p = mix.params(20, 24, _gen(seed))
        images, targets = mix.apply(x, y, p)
        changed = (images != x).any(dim=1)[0]  # (H, W) of sample 0, pasted from sample B - 1
        assert abs(p.lam - (1.0 - changed.sum().item() / (20 * 24))) < 1e-6
        assert torch.allclose(targets.sum(1), torch.ones(6))
        expected = p.lam * smooth_one_hot(y, K, 0.1) + (1 - p.lam) * smooth_one_hot(y.flip(0), K, 0.1)
        assert torch.allclose(targets, expected)


def test_cutmix_box_is_clipped_at_borders():
    g = _gen(1)
    for _ in range(100):
        y0, y1, x0, x1 = cutmix_box(10, 12, 0.3, g)
        assert 0 <= y0 <= y1 <= 10 and 0 <= x0 <= x1 <= 12


def test_switch_prob_chooses_between_mixup_and_cutmix():
    both = dict(mixup_alpha=0.8, cutmix_alpha=1.0, num_classes=K)
    assert all(MixupCutmix(switch_prob=1.0, **both).params(8, 8, _gen(s)).box is not None for s in range(10))
    assert all(MixupCutmix(switch_prob=0.0, **both).params(8, 8, _gen(s)).box is None for s in range(10))


def test_deterministic_given_the_generator_and_ignores_global_rng():
    x, y = _batch()
    mix = MixupCutmix(mixup_alpha=0.8, cutmix_alpha=1.0, num_classes=K)
    state = torch.get_rng_state()
    torch.manual_seed(1)
    a = mix(x, y, _gen(9))
    torch.manual_seed(2)
    b = mix(x, y, _gen(9))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    torch.set_rng_state(state)


def test_soft_target_ce_equals_label_smoothed_cross_entropy_without_mixing():
    logits = torch.randn(6, K, generator=_gen(4))
    _, y = _batch()
    for eps in (0.0, 0.1, 0.3):
        _, targets = MixupCutmix(0.0, 0.0, label_smoothing=eps, num_classes=K)(torch.zeros(6, 3, 2, 2), y, _gen())
        ours = SoftTargetCrossEntropy()(logits, targets)
        assert torch.allclose(ours, F.cross_entropy(logits, y, label_smoothing=eps), atol=1e-6)


def test_apply_with_lam_one_is_identity():
    x, y = _batch()
    images, targets = MixupCutmix(num_classes=K, label_smoothing=0.0).apply(x, y, MixParams(1.0))
    assert images is x and torch.equal(targets, smooth_one_hot(y, K))


def test_build_mixup_from_config():
    assert build_mixup(AugmentConfig(), K) is None
    mix = build_mixup(AugmentConfig(mixup=0.8, cutmix=1.0, label_smoothing=0.1, mixup_switch_prob=0.4), K)
    assert (mix.mixup_alpha, mix.cutmix_alpha, mix.switch_prob, mix.label_smoothing, mix.num_classes) == \
        (0.8, 1.0, 0.4, 0.1, K)
