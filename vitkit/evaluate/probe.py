"""Evaluation of frozen representations: the ViT paper's few-shot linear evaluation and a full linear probe.

Few-shot (ViT paper §4.1, "a regularized least-squares regression problem that maps the (frozen) representation of a
subset of training images to {−1, 1}^K target vectors", solved in closed form). Details follow big_vision's
``evaluators/fewshot_lsr.py``: features whitened with the support set's mean and std, a constant feature of 100 appended
so the bias is almost unregularised, L2 strength 2^10, k images per class drawn with several seeds; the solution uses
the primal or dual normal equations, whichever is smaller. Linear probe: multinomial logistic regression on the
standardised features of the whole training split (L-BFGS, full batch), L2 strength chosen on the held-out split.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Features", "extract_features", "fewshot_lstsq", "FewShotResult", "few_shot_eval", "LinearProbeResult",
           "linear_probe"]

log = logging.getLogger(__name__)
BIAS_CONSTANT = 100.0


@dataclass
class Features:
    x: Tensor  # (N, D) float32 pre-logits
    y: Tensor  # (N,) int64 labels
    images_per_second: float = 0.0


def extract_features(model: nn.Module, loader: Iterable, device: str | torch.device = "cpu",
                     amp_dtype: torch.dtype | None = None, progress: bool = True, desc: str = "features") -> Features:
    """Pre-logit features (the pooled, normalised token that feeds the classifier) for every batch of ``loader``."""
    from vitkit.progress import progress as bar_for
    device = torch.device(device)
    model.eval().to(device)
    xs, ys, seen, start = [], [], 0, time.perf_counter()
    bar = bar_for(loader, enabled=progress, total=len(loader) if hasattr(loader, "__len__") else None, desc=desc,
                  unit="batch")
    for images, labels in bar:
        images = images.to(device, non_blocking=True)
        with torch.inference_mode(), torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16,
                                                     enabled=amp_dtype is not None):
            feats = model.forward_head(model.forward_features(images), pre_logits=True)
        xs.append(feats.float().cpu())
        ys.append(torch.as_tensor(labels).cpu())
        seen += images.shape[0]
        bar.set_postfix(img_s=f"{seen / (time.perf_counter() - start):.0f}")
    rate = seen / max(time.perf_counter() - start, 1e-9)
    return Features(torch.cat(xs), torch.cat(ys).long(), rate)  # cat outside inference mode: ordinary tensors


def fewshot_lstsq(x: Tensor, y: Tensor, x_test: Tensor, num_classes: int, l2: float = 2.0 ** 10) -> Tensor:
    """Closed-form L2-regularised least squares from features to {−1, 1}^K targets; returns test predictions."""
    x, x_test = x.double(), x_test.double()
    mean, std = x.mean(0, keepdim=True), x.std(0, unbiased=False, keepdim=True) + 1e-5
    pad = lambda a: F.pad((a - mean) / std, (0, 1), value=BIAS_CONSTANT)  # (N, D + 1)
    a, a_test = pad(x), pad(x_test)
    targets = 2.0 * F.one_hot(y.long(), num_classes).double() - 1.0  # (N, K)
    n, d = a.shape
    if n >= d:  # primal: (AᵀA + λI)⁻¹ Aᵀ Y
        w = torch.linalg.solve(a.T @ a + l2 * torch.eye(d, dtype=a.dtype), a.T @ targets)
    else:  # dual: Aᵀ (AAᵀ + λI)⁻¹ Y
        w = a.T @ torch.linalg.solve(a @ a.T + l2 * torch.eye(n, dtype=a.dtype), targets)
    return (a_test @ w).argmax(dim=1)


@dataclass
class FewShotResult:
    shots: int
    accuracies: list[float] = field(default_factory=list)

    @property
    def mean(self) -> float:
        return float(np.mean(self.accuracies))

    @property
    def std(self) -> float:
        return float(np.std(self.accuracies))


def _draw(y: Tensor, shots: int, num_classes: int, rng: np.random.Generator) -> Tensor:
    idx = []
    labels = y.numpy()
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        if len(members) < shots:
            raise ValueError(f"class {c} has {len(members)} training images, fewer than {shots} shots")
        idx.append(rng.permutation(members)[:shots])
    return torch.from_numpy(np.concatenate(idx))


def few_shot_eval(train: Features, test: Features, shots: Sequence[int], num_classes: int, draws: int = 5,
                  l2: float = 2.0 ** 10, seed: int = 0) -> list[FewShotResult]:
    """k-shot accuracy on ``test`` for each k in ``shots``, over ``draws`` random draws of the k images per class."""
    results = [FewShotResult(k) for k in shots]
    for draw in range(draws):
        rng = np.random.default_rng(seed + draw)
        for res in results:
            idx = _draw(train.y, res.shots, num_classes, rng)
            pred = fewshot_lstsq(train.x[idx], train.y[idx], test.x, num_classes, l2)
            res.accuracies.append((pred == test.y).double().mean().item())
    return results


@dataclass
class LinearProbeResult:
    l2: float
    val_accuracy: float
    test_accuracy: float
    val_by_l2: dict[float, float]


def _fit_logreg(x: Tensor, y: Tensor, num_classes: int, l2: float, max_iter: int) -> nn.Linear:
    torch.manual_seed(0)
    clf = nn.Linear(x.shape[1], num_classes).double()
    nn.init.zeros_(clf.weight), nn.init.zeros_(clf.bias)
    opt = torch.optim.LBFGS(clf.parameters(), lr=1.0, max_iter=max_iter, history_size=20,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(clf(x), y) + 0.5 * l2 * clf.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return clf


def _accuracy(clf: nn.Linear, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return (clf(x).argmax(1) == y).double().mean().item()


def linear_probe(train: Features, val: Features, test: Features, num_classes: int,
                 l2_grid: Sequence[float] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2), max_iter: int = 300) -> LinearProbeResult:
    """Logistic regression on standardised frozen features; L2 picked on ``val``, refit on train, scored on ``test``."""
    mean, std = train.x.double().mean(0), train.x.double().std(0) + 1e-6
    norm = lambda f: (f.x.double() - mean) / std  # (N, D)
    xtr, xva, xte = norm(train), norm(val), norm(test)
    scores = {}
    for l2 in l2_grid:
        scores[l2] = _accuracy(_fit_logreg(xtr, train.y, num_classes, l2, max_iter), xva, val.y)
        log.info("linear probe l2=%g: val top-1 %.4f", l2, scores[l2])
    best = max(scores, key=lambda k: (scores[k], k))  # ties → the stronger regularisation
    clf = _fit_logreg(xtr, train.y, num_classes, best, max_iter)
    return LinearProbeResult(best, scores[best], _accuracy(clf, xte, test.y), scores)


# ------------------------------------------------------------------------------------------------ dataset runner
@dataclass
class ProbeReport:
    few_shot: list[FewShotResult] = field(default_factory=list)
    linear: LinearProbeResult | None = None
    feature_images_per_second: dict[str, float] = field(default_factory=dict)
    num_classes: int = 0

    def to_dict(self) -> dict:
        out: dict = {"feature_images_per_second": self.feature_images_per_second, "num_classes": self.num_classes}
        if self.few_shot:
            out["few_shot"] = {str(r.shots): {"mean": r.mean, "std": r.std, "accuracies": r.accuracies}
                               for r in self.few_shot}
        if self.linear:
            out["linear_probe"] = {"l2": self.linear.l2, "val_top1": self.linear.val_accuracy,
                                   "test_top1": self.linear.test_accuracy,
                                   "val_by_l2": {str(k): v for k, v in self.linear.val_by_l2.items()}}
        return out


def _needed_indices(targets: Sequence[int], shots: Sequence[int], num_classes: int, draws: int,
                    seed: int) -> list[int]:
    """The training images any k-shot draw can touch, so few-shot alone extracts features for only those."""
    y = torch.as_tensor(list(targets))
    need: set[int] = set()
    for draw in range(draws):
        rng = np.random.default_rng(seed + draw)
        for k in shots:
            need.update(_draw(y, k, num_classes, rng).tolist())
    return sorted(need)


def run_probes(model: nn.Module, splits, transform, shots: Sequence[int] = (), linear: bool = False,
               draws: int = 5, l2: float = 2.0 ** 10, seed: int = 0, batch_size: int = 64, num_workers: int = 0,
               device: str | torch.device = "cpu", progress: bool = True,
               amp_dtype: torch.dtype | None = None) -> ProbeReport:
    """Extract frozen features once per split and run the requested probes on them.

    ``splits`` is a ``vitkit.data.Splits``; ``transform`` the eval transform (no augmentation). Few-shot draws come
    from the training split and are scored on the test split; the linear probe trains on the whole training split and
    picks its L2 strength on the held-out validation split. ``amp_dtype`` (e.g. ``torch.bfloat16``) autocasts the
    extraction; the probes themselves are solved in float64.
    """
    from torch.utils.data import DataLoader

    from vitkit.data import Subset, TransformDataset, collate_skip_none
    num_classes = len(splits.classes)
    report = ProbeReport(num_classes=num_classes)
    train = splits.train
    if shots and not linear:
        train = Subset(train, _needed_indices(train.targets, shots, num_classes, draws, seed))

    def feats(ds, name: str) -> Features:
        loader = DataLoader(TransformDataset(ds, transform), batch_size=batch_size, shuffle=False,
                            num_workers=num_workers, collate_fn=collate_skip_none)
        f = extract_features(model, loader, device, amp_dtype, progress=progress, desc=f"{name} features")
        report.feature_images_per_second[name] = f.images_per_second
        return f

    f_train, f_test = feats(train, "train"), feats(splits.test, "test")
    if shots:
        report.few_shot = few_shot_eval(f_train, f_test, shots, num_classes, draws, l2, seed)
    if linear:
        if splits.val is None:
            raise ValueError("the linear probe picks its regularisation on a held-out split: set data.val_fraction > 0")
        report.linear = linear_probe(f_train, feats(splits.val, "val"), f_test, num_classes)
    return report
