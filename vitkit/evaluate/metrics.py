"""Classification metrics over a labelled dataset, and the files ``vitkit eval`` writes.

Conventions (timm's ``validate`` and scikit-learn's ``confusion_matrix``):
- top-k accuracy counts a sample correct when its label is among the k largest logits (``torch.topk``; ties broken
  as ``topk`` breaks them); top-5 is reported only for heads with at least 5 classes, otherwise ``None``.
- ``loss`` is the mean cross-entropy (natural log) over all samples, computed in float32.
- ``confusion[i, j]`` counts samples of true class ``i`` predicted as class ``j`` (rows = truth, columns = top-1
  prediction). Per-class accuracy is the recall ``confusion[i, i] / confusion[i].sum()``; NaN for a class with no
  samples (written as ``null`` in JSON and an empty cell in CSV).
"""
from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["EvalResult", "evaluate", "result_from_logits", "save_eval_artifacts", "confusion_matrix"]

log = logging.getLogger(__name__)

MAX_LABELLED_CLASSES = 20  # the PNG names and annotates every class up to this many


@dataclass
class EvalResult:
    """Accuracies are fractions in [0, 1]."""

    top1: float
    top5: float | None
    loss: float
    per_class_acc: list[float]  # recall per class; NaN where the class has no samples
    confusion: np.ndarray  # (K, K) int64, rows = true class, columns = predicted class
    num_samples: int
    class_names: list[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. probe results added by later evaluations

    @property
    def num_classes(self) -> int:
        return int(self.confusion.shape[0])

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (the confusion matrix goes to its own CSV)."""
        return {"top1": self.top1, "top5": self.top5, "loss": self.loss, "num_samples": self.num_samples,
                "num_classes": self.num_classes, "class_names": self.class_names,
                "per_class_acc": [None if math.isnan(a) else a for a in self.per_class_acc], **self.extra}


def confusion_matrix(targets: torch.Tensor, preds: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(K, K) int64 counts, ``[true, predicted]``."""
    flat = targets.long() * num_classes + preds.long()  # (N,) index into the flattened matrix
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)  # (K, K)


class _Accumulator:
    """Running sums over batches: loss, top-k hits and the confusion matrix."""

    def __init__(self, num_classes: int):
        self.K = num_classes
        self.k = min(5, num_classes)
        self.loss_sum, self.top1, self.top5, self.n = 0.0, 0, 0, 0
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        logits, targets = logits.float().cpu(), targets.long().cpu()  # (B, K), (B,)
        if targets.numel() and (targets.min() < 0 or targets.max() >= self.K):
            raise ValueError(f"label {int(targets.max())} is outside the model's {self.K} classes")
        self.loss_sum += float(F.cross_entropy(logits, targets, reduction="sum"))
        topk = logits.topk(self.k, dim=1).indices  # (B, k)
        hits = topk == targets[:, None]  # (B, k)
        self.top1 += int(hits[:, 0].sum())
        self.top5 += int(hits.any(dim=1).sum())
        self.confusion += confusion_matrix(targets, topk[:, 0], self.K)
        self.n += targets.numel()

    def result(self, class_names: list[str] | None) -> EvalResult:
        if self.n == 0:
            raise ValueError("no samples were evaluated (empty dataset, or every image was unreadable)")
        conf = self.confusion.numpy()
        support = conf.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            per_class = np.diag(conf) / support  # NaN where support is 0
        return EvalResult(top1=self.top1 / self.n, top5=self.top5 / self.n if self.K >= 5 else None,
                          loss=self.loss_sum / self.n, per_class_acc=[float(a) for a in per_class],
                          confusion=conf, num_samples=self.n, class_names=class_names)


def result_from_logits(logits: torch.Tensor, targets: torch.Tensor,
                       class_names: list[str] | None = None) -> EvalResult:
    """Metrics of precomputed ``logits`` (N, K) against ``targets`` (N,)."""
    acc = _Accumulator(logits.shape[1])
    acc.update(logits, targets)
    return acc.result(class_names)


def _autocast(device: torch.device, amp_dtype: torch.dtype | None):
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def _progress(loader: Iterable, enabled: bool):
    from vitkit.progress import progress
    total = len(loader) if hasattr(loader, "__len__") else None
    return progress(loader, enabled=enabled, total=total, desc="eval", unit="batch", leave=False)


def evaluate(model: nn.Module, loader: Iterable, device: str | torch.device = "cpu",
             amp_dtype: torch.dtype | None = None, class_names: list[str] | None = None,
             progress: bool = True, reference: nn.Module | None = None) -> EvalResult:
    """Top-1/top-5 accuracy, mean cross-entropy, per-class accuracy and the confusion matrix of ``model`` on
    ``loader``'s ``(images (B, 3, H, W), labels (B,))`` batches. Empty batches (all items unreadable, see
    ``vitkit.data.collate_skip_none``) are skipped. The model is moved to ``device``; its train/eval mode is
    restored afterwards. ``reference`` (e.g. the eager model behind an exported or int8 one) runs on the same batches
    and ``extra["top1_agreement"]`` is the fraction of images whose top-1 class both give."""
    device = torch.device(device)
    num_classes = int(model.num_classes)
    if num_classes <= 0:
        raise ValueError("the model has no classification head (num_classes=0)")
    acc = _Accumulator(num_classes)
    agree = seen = 0
    was_training = model.training
    model.to(device).eval()
    try:
        with torch.inference_mode(), _autocast(device, amp_dtype):
            for batch in _progress(loader, progress):
                images, targets = batch
                if targets.numel() == 0:
                    continue
                logits = model(images.to(device, non_blocking=True))
                acc.update(logits, targets)
                if reference is not None:
                    same = reference(images.to(device)).argmax(-1).cpu() == logits.argmax(-1).cpu()
                    agree, seen = agree + int(same.sum()), seen + len(same)
    finally:
        model.train(was_training)
    result = acc.result(class_names)
    if reference is not None:
        result.extra["top1_agreement"] = agree / max(seen, 1)
    return result


# ------------------------------------------------------------------------------------------------------- files
def save_eval_artifacts(result: EvalResult, out_dir: str | os.PathLike,
                        class_names: list[str] | None = None) -> dict[str, str]:
    """Write ``metrics.json``, ``per_class.csv``, ``confusion_matrix.csv`` and ``confusion_matrix.png`` into
    ``out_dir``; returns ``{kind: path}`` of what was written (no PNG without matplotlib, with a warning)."""
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    names = _names(result, class_names)
    paths = {"metrics": os.path.join(out_dir, "metrics.json"), "per_class": os.path.join(out_dir, "per_class.csv"),
             "confusion_csv": os.path.join(out_dir, "confusion_matrix.csv")}
    with open(paths["metrics"], "w") as f:
        json.dump({**result.to_dict(), "class_names": names}, f, indent=1)
    _write_per_class(result, names, paths["per_class"])
    _write_confusion_csv(result.confusion, names, paths["confusion_csv"])
    png = os.path.join(out_dir, "confusion_matrix.png")
    if plot_confusion(result.confusion, names, png):
        paths["confusion_png"] = png
    return paths


def _names(result: EvalResult, class_names: list[str] | None) -> list[str]:
    names = class_names or result.class_names or [f"class_{i}" for i in range(result.num_classes)]
    if len(names) != result.num_classes:
        raise ValueError(f"{len(names)} class names for a {result.num_classes}-class confusion matrix")
    return list(names)


def _write_per_class(result: EvalResult, names: list[str], path: str) -> None:
    conf = result.confusion
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", "class", "support", "correct", "accuracy"])
        for i, name in enumerate(names):
            a = result.per_class_acc[i]
            w.writerow([i, name, int(conf[i].sum()), int(conf[i, i]), "" if math.isnan(a) else f"{a:.6f}"])


def _write_confusion_csv(conf: np.ndarray, names: list[str], path: str) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["true \\ predicted", *names])
        for name, row in zip(names, conf):
            w.writerow([name, *(int(v) for v in row)])


def plot_confusion(conf: np.ndarray, names: list[str], path: str) -> bool:
    """Row-normalised confusion matrix as a PNG (matplotlib's Agg canvas, no pyplot state); class names and counts
    are drawn when there are at most 20 classes. Returns False when matplotlib is not installed."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        log.warning("matplotlib is not installed: skipped %s (pip install 'vitkit[train]')", path)
        return False
    K = conf.shape[0]
    support = conf.sum(axis=1, keepdims=True)  # (K, 1)
    rates = np.divide(conf, support, out=np.zeros(conf.shape, dtype=float), where=support > 0)  # (K, K)
    side = min(4.0 + 0.45 * min(K, MAX_LABELLED_CLASSES), 14.0)
    fig = Figure(figsize=(side + 1.5, side), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"confusion matrix ({int(conf.sum())} samples)")
    if K <= MAX_LABELLED_CLASSES:
        _label_cells(ax, conf, rates, names)
    fig.tight_layout()
    fig.savefig(path)
    return True


def _label_cells(ax, conf: np.ndarray, rates: np.ndarray, names: list[str]) -> None:
    K = conf.shape[0]
    ticks = np.arange(K)
    ax.set_xticks(ticks, labels=[_short(n) for n in names], rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(ticks, labels=[_short(n) for n in names])
    for i in range(K):
        for j in range(K):
            if conf[i, j]:
                colour = "white" if rates[i, j] > 0.5 else "black"
                ax.text(j, i, str(int(conf[i, j])), ha="center", va="center", color=colour, fontsize=8)


def _short(name: str, width: int = 18) -> str:
    return name if len(name) <= width else name[: width - 1] + "…"
