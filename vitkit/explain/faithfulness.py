"""Tests of explanations, not just pictures.

- ``randomisation_check`` (Adebayo et al., NeurIPS 2018, "Sanity Checks for Saliency Maps", model-parameter
  randomisation): the maps of the trained model and of the same architecture with re-initialised weights must differ
  materially. Measured by the Spearman rank correlation of the two maps per image; a method whose maps barely change
  explains the input's structure, not the model.
- ``deletion_curve`` (Petsiuk et al., BMVC 2018, RISE's deletion metric): remove the most-attributed patches first
  (set to the dataset mean, i.e. 0 after normalisation) and follow the probability of the originally predicted class;
  a faithful map makes it fall faster than random removal orders do. The area under the curve (fraction removed on
  the x axis, trapezoid rule) summarises it: lower is better.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitkit.explain.methods import explain

__all__ = ["spearman", "randomisation_check", "deletion_curve", "DeletionResult", "randomized_copy"]


def _ranks(x: Tensor) -> Tensor:
    """Average ranks (ties share their mean rank) of a 1-d tensor."""
    order = x.argsort()
    ranks = torch.empty_like(x, dtype=torch.float64)
    ranks[order] = torch.arange(len(x), dtype=torch.float64)
    values, inverse = torch.unique(x, return_inverse=True)
    sums = torch.zeros(len(values), dtype=torch.float64).index_add_(0, inverse, ranks)
    counts = torch.zeros(len(values), dtype=torch.float64).index_add_(0, inverse, torch.ones_like(ranks))
    return (sums / counts)[inverse]


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman's rank correlation of two maps (flattened)."""
    ra, rb = _ranks(a.flatten().double()), _ranks(b.flatten().double())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = (ra.norm() * rb.norm()).item()
    return float((ra @ rb).item() / denom) if denom > 0 else 0.0


def randomized_copy(model: nn.Module, seed: int = 0) -> nn.Module:
    """The same architecture with every parameter redrawn (weights N(0, 1/fan_in), norms 1, biases 0; the head too),
    so the predictions of the copy are those of an untrained network."""
    twin = copy.deepcopy(model).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in twin.named_parameters():
            if p.ndim >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0) if "norm" in name else p.copy_(0.02 * torch.randn(p.shape, generator=g))
    return twin


def randomisation_check(model: nn.Module, images: Tensor, method: str) -> list[float]:
    """Spearman correlation, per image, between the maps of ``model`` and of its randomised copy (each explaining its
    own predicted class)."""
    real = explain(model, images, method).heatmap
    rand = explain(randomized_copy(model), images, method).heatmap
    return [spearman(a, b) for a, b in zip(real, rand)]


@dataclass
class DeletionResult:
    fractions: list[float]
    method_curve: list[float]  # mean over images of the predicted class's probability
    random_curve: list[float]
    method_auc: float
    random_auc: float


def _auc(xs: list[float], ys: list[float]) -> float:
    return float(sum((x1 - x0) * (y0 + y1) / 2 for x0, x1, y0, y1 in zip(xs, xs[1:], ys, ys[1:])))


def _delete(images: Tensor, order: Tensor, k: int, grid: tuple[int, int]) -> Tensor:
    """Zero (the dataset mean after normalisation) the first ``k`` grid cells of ``order`` in every image."""
    B, _, H, W = images.shape
    mask = torch.ones(B, grid[0] * grid[1])
    mask.scatter_(1, order[:, :k], 0.0)
    mask = F.interpolate(mask.view(B, 1, *grid), size=(H, W), mode="nearest")
    return images * mask


def deletion_curve(model: nn.Module, images: Tensor, method: str, steps: int = 10, random_orders: int = 3,
                   seed: int = 0) -> DeletionResult:
    """Probability of each image's predicted class as its most-attributed patches (by ``method``'s map, on the map's
    grid) are removed in ``steps`` equal steps, against the mean of ``random_orders`` random removal orders."""
    model.eval()
    with torch.no_grad():
        predicted = model(images).argmax(-1)
    heat = explain(model, images, method).heatmap  # (B, h, w)
    grid = tuple(heat.shape[-2:])
    n = grid[0] * grid[1]
    order = heat.flatten(1).argsort(dim=1, descending=True)
    g = torch.Generator().manual_seed(seed)
    randoms = [torch.stack([torch.randperm(n, generator=g) for _ in images]) for _ in range(random_orders)]
    ks = [round(n * i / steps) for i in range(steps + 1)]

    def curve(orders: Tensor) -> list[float]:
        out = []
        for k in ks:
            with torch.no_grad():
                probs = model(_delete(images, orders, k, grid)).float().softmax(-1)
            out.append(probs.gather(1, predicted[:, None]).mean().item())
        return out
    fractions = [k / n for k in ks]
    method_curve = curve(order)
    random_curve = [sum(vals) / len(vals) for vals in zip(*[curve(o) for o in randoms])]
    return DeletionResult(fractions, method_curve, random_curve, _auc(fractions, method_curve),
                          _auc(fractions, random_curve))
