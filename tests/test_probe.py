"""Few-shot least squares and the linear probe, against independent solutions (numpy normal equations, sklearn)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import vitkit
from vitkit.evaluate.probe import (BIAS_CONSTANT, Features, extract_features, few_shot_eval, fewshot_lstsq,
                                   linear_probe)

from conftest import randomize_, require


def _blobs(n_per_class: int, num_classes: int, dim: int, spread: float, seed: int) -> Features:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(123)) * 3
    y = torch.arange(num_classes).repeat_interleave(n_per_class)
    x = centres[y] + spread * torch.randn(len(y), dim, generator=g)
    return Features(x.float(), y)


def _correlated_classes(n_per_class: int, seed: int, num_classes: int = 5, dim: int = 24) -> Features:
    """Overlapping classes whose noise is correlated across features (unlike ``_blobs``, which every classifier
    separates): the ridge regression's answer depends on its L2 strength."""
    centres = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(123))
    mixing = torch.randn(dim, dim, generator=torch.Generator().manual_seed(7))
    y = torch.arange(num_classes).repeat_interleave(n_per_class)
    x = centres[y] + torch.randn(len(y), dim, generator=torch.Generator().manual_seed(seed)) @ mixing
    return Features(x.float(), y)


def _numpy_ridge_predict(x, y, x_test, k, l2):
    """The same estimator written independently with numpy (primal normal equations; l2 = 0: the minimum-norm
    least-squares solution, the limit as l2 -> 0)."""
    x, x_test = x.numpy().astype(np.float64), x_test.numpy().astype(np.float64)
    mean, std = x.mean(0), x.std(0) + 1e-5
    a = np.hstack([(x - mean) / std, np.full((len(x), 1), BIAS_CONSTANT)])
    a_test = np.hstack([(x_test - mean) / std, np.full((len(x_test), 1), BIAS_CONSTANT)])
    t = 2.0 * np.eye(k)[y.numpy()] - 1.0
    if l2 == 0:
        w = np.linalg.lstsq(a, t, rcond=None)[0]
    else:
        w = np.linalg.solve(a.T @ a + l2 * np.eye(a.shape[1]), a.T @ t)
    return (a_test @ w).argmax(1)


@pytest.mark.parametrize("n_per_class", [2, 40])  # dual (N < D) and primal (N >= D) branches
def test_lstsq_matches_numpy(n_per_class):
    train, test = _blobs(n_per_class, 5, 24, 2.0, 0), _blobs(30, 5, 24, 2.0, 1)
    ours = fewshot_lstsq(train.x, train.y, test.x, 5, l2=3.0)
    ref = _numpy_ridge_predict(train.x, train.y, test.x, 5, 3.0)
    assert (ours.numpy() == ref).all()


@pytest.mark.parametrize("n_per_class", [2, 40])  # dual (N = 10 < D + 1 = 25) and primal (N = 200 > 25)
def test_lstsq_l2_term_matches_numpy_where_it_changes_the_answer(n_per_class):
    """The default L2 strength 2^10 (big_vision) changes about half the predictions here (measured: 46.5% with 2
    images per class, 47% with 40), so a solve that dropped the L2 term, or mis-scaled it, disagrees with numpy."""
    train, test = _correlated_classes(n_per_class, 0), _correlated_classes(40, 1)
    ref = _numpy_ridge_predict(train.x, train.y, test.x, 5, 2.0 ** 10)
    unregularised = _numpy_ridge_predict(train.x, train.y, test.x, 5, 0.0)
    assert (ref != unregularised).mean() > 0.3  # the case tells the L2 term apart
    ours = fewshot_lstsq(train.x, train.y, test.x, 5)
    assert (ours.numpy() == ref).all(), f"{(ours.numpy() != ref).mean():.0%} of the predictions differ from numpy's"


def test_few_shot_separable_and_chance():
    train, test = _blobs(50, 4, 16, 0.5, 0), _blobs(50, 4, 16, 0.5, 1)
    res = few_shot_eval(train, test, shots=[1, 5], num_classes=4, draws=3)
    assert [r.shots for r in res] == [1, 5] and all(len(r.accuracies) == 3 for r in res)
    assert res[1].mean > 0.95
    shuffled = Features(train.x, train.y[torch.randperm(len(train.y), generator=torch.Generator().manual_seed(0))])
    chance = few_shot_eval(shuffled, test, shots=[5], num_classes=4, draws=5)[0]
    assert chance.mean < 0.6  # labels carry no information: near 1/4


def test_few_shot_needs_enough_images_per_class():
    train, test = _blobs(3, 2, 4, 1.0, 0), _blobs(3, 2, 4, 1.0, 1)
    with pytest.raises(ValueError, match="fewer than 5 shots"):
        few_shot_eval(train, test, shots=[5], num_classes=2)


def test_linear_probe_agrees_with_sklearn():
    sklearn = require("sklearn.linear_model")
    train, val, test = _blobs(60, 3, 8, 2.5, 0), _blobs(30, 3, 8, 2.5, 1), _blobs(60, 3, 8, 2.5, 2)
    res = linear_probe(train, val, test, num_classes=3, l2_grid=(1e-3, 1e-1))
    assert set(res.val_by_l2) == {1e-3, 1e-1} and res.l2 in res.val_by_l2
    mean, std = train.x.double().mean(0), train.x.double().std(0) + 1e-6
    z = lambda f: ((f.x.double() - mean) / std).numpy()
    # ours minimises mean CE + l2/2 ||W||²; sklearn minimises C·ΣCE + ½||W||²  ⇒  C = 1 / (l2 · N)
    ref = sklearn.LogisticRegression(C=1.0 / (res.l2 * len(train.y)), max_iter=2000).fit(z(train), train.y.numpy())
    ref_acc = (ref.predict(z(test)) == test.y.numpy()).mean()
    assert abs(res.test_accuracy - ref_acc) <= 1.0 / len(test.y) + 1e-9


def test_extract_features_are_pre_logits():
    model = vitkit.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, embed_dim=24, num_heads=2,
                                num_classes=3).eval()
    x = torch.randn(5, 3, 32, 32)
    loader = [(x[:3], torch.tensor([0, 1, 2])), (x[3:], torch.tensor([2, 1]))]
    feats = extract_features(model, loader, progress=False)
    with torch.no_grad():
        ref = model.forward_head(model.forward_features(x), pre_logits=True)
    torch.testing.assert_close(feats.x, ref)
    assert feats.y.tolist() == [0, 1, 2, 2, 1] and feats.images_per_second > 0


def test_extract_features_autocast_is_applied():
    """bf16 extraction is close to float32 but not identical: the dtype reaches the forward pass."""
    model = vitkit.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2,
                                num_classes=3).eval()
    loader = [(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0]))]
    fp32 = extract_features(model, loader, progress=False).x
    bf16 = extract_features(model, loader, amp_dtype=torch.bfloat16, progress=False).x
    assert bf16.dtype == torch.float32 and not torch.equal(fp32, bf16)
    torch.testing.assert_close(bf16, fp32, atol=0.1, rtol=0.05)


def _quadrant_folders(root, shuffled: bool, per_class=(30, 20), seed=0):
    """An image-folder dataset with a known answer: 4 classes of 16x16 noise images, class k with quadrant k
    brightened (one 8x8 patch of the model below). ``shuffled``: the same images, each in a random class folder,
    so the labels carry no information and the best any probe can do is chance (1/4)."""
    from PIL import Image
    g = np.random.default_rng(seed)
    for split, n in zip(("train", "test"), per_class):
        for k in range(4):
            for i in range(n):
                img = g.normal(110, 15, (16, 16, 3))
                r, c = divmod(k, 2)
                img[8 * r:8 * r + 8, 8 * c:8 * c + 8] += 90
                label = g.integers(4) if shuffled else k
                folder = root / split / f"class_{label}"
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(folder / f"{k}_{i}.png")
    return root


@pytest.mark.parametrize("shuffled", [False, True], ids=["separable", "random-labels"])
def test_eval_cli_probes_a_problem_with_a_known_answer(tmp_path, capsys, shuffled):
    """`vitkit eval --few-shot --linear-probe` on frozen random features of a 7-class model (a foreign head: probes
    only, the classification report is skipped): near 1 when the class is visible in the image, near 1/4 when the
    labels are shuffled."""
    import json
    from vitkit.cli.main import main
    require("sklearn")
    data = _quadrant_folders(tmp_path / "data", shuffled)
    model = randomize_(vitkit.create_model("vit_tiny_patch16_224", img_size=16, patch_size=8, depth=1, embed_dim=24,
                                           num_heads=2, num_classes=7))
    vitkit.save_pretrained(model, tmp_path / "m")
    code = main(["eval", str(tmp_path / "m"), "--set", "data.name=folder", f"data.root={data}", "data.img_size=16",
                 "data.val_fraction=0.2", "--few-shot", "1,5", "--draws", "3", "--linear-probe",
                 "--out", str(tmp_path / "ev")])
    out = capsys.readouterr().out
    assert code == 0 and "skipping the classification report" in out and "5-shot linear" in out
    probes = json.loads((tmp_path / "ev" / "probes.json").read_text())
    five, one = probes["few_shot"]["5"], probes["few_shot"]["1"]
    assert len(five["accuracies"]) == 3 and len(probes["few_shot"]["1"]["accuracies"]) == 3
    linear = probes["linear_probe"]["test_top1"]
    seen = f"1-shot {one['mean']:.3f}, 5-shot {five['mean']:.3f}, linear probe {linear:.3f}"
    if shuffled:  # 80 test images: chance 0.25 with a standard deviation of about 0.05
        assert max(five["mean"], one["mean"], linear) < 0.45, seen  # measured 0.23, 0.20, 0.19
    else:
        assert five["mean"] > 0.9 and linear > 0.95 and one["mean"] > 0.6, seen  # measured 0.98, 1.0, 0.82
