"""Top-k predictions for image files.

Preprocessing comes from ``model.data_cfg`` (``vitkit.evaluate.preprocess``) and class names from the checkpoint
(``vitkit.evaluate.labels.resolve_class_names``), so a file path and a model are all a user supplies. Probabilities
are the softmax of the logits (for distilled DeiTs, of the averaged class/distillation logits, as the DeiT code
evaluates). A file that cannot be read becomes a ``Prediction`` with ``error`` set; the other files are unaffected.
"""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
from torch import nn

from vitkit.data.images import IMG_EXTENSIONS, ImageLoadError, load_image
from vitkit.evaluate.labels import resolve_class_names
from vitkit.evaluate.preprocess import eval_transform

__all__ = ["Prediction", "predict_files", "predict_tensors", "expand_inputs", "image_files", "load_batch"]

log = logging.getLogger(__name__)


@dataclass
class Prediction:
    path: str
    topk: list[tuple[int, str, float]] = field(default_factory=list)  # (class index, class name, probability)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict:
        return {"path": self.path, "error": self.error,
                "topk": [{"rank": r, "index": i, "label": name, "prob": p}
                         for r, (i, name, p) in enumerate(self.topk, start=1)]}


def expand_inputs(paths: Iterable[str | os.PathLike], extensions: tuple[str, ...] = IMG_EXTENSIONS) -> list[str]:
    """Files as given (whatever their extension, so a bad file is reported rather than skipped), and every image
    file under each folder (recursive, extensions matched case-insensitively, sorted by path). Paths that do not
    exist are kept, so they get an error row. Hidden files and folders (``.name``) inside folders are skipped."""
    out, empty = _expand(paths, extensions)
    for p in empty:
        log.warning("no image files (%s) under %s", ", ".join(extensions), p)
    return out


def image_files(paths: Iterable[str | os.PathLike], extensions: tuple[str, ...] = IMG_EXTENSIONS) -> list[str]:
    """``expand_inputs`` for a command line, where a path that does not exist is a typo, not an error row: raises
    ``FileNotFoundError`` naming it, or naming the folders when no image file is found at all."""
    paths = [os.fspath(p) for p in paths]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(f"{', '.join(missing)}: no such file or folder")
    out, empty = _expand(paths, extensions)
    if not out:
        raise FileNotFoundError(f"no image files ({', '.join(extensions)}) in {', '.join(empty)}")
    for p in empty:
        log.warning("no image files (%s) under %s", ", ".join(extensions), p)
    return out


def _expand(paths: Iterable[str | os.PathLike], extensions: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """(the files ``expand_inputs`` returns, the folders in ``paths`` that hold no image file)."""
    out: list[str] = []
    empty: list[str] = []
    exts = tuple(e.lower() for e in extensions)
    for p in map(os.fspath, paths):
        if not os.path.isdir(p):
            out.append(p)
            continue
        found = sorted(_walk_images(p, exts))
        if not found:
            empty.append(p)
        out.extend(found)
    return out, empty


def _walk_images(folder: str, exts: tuple[str, ...]) -> Iterable[str]:
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for f in files:
            if f.lower().endswith(exts) and not f.startswith("."):
                yield os.path.join(root, f)


def load_batch(paths: Sequence[str], transform) -> tuple[list[torch.Tensor], list[str | None]]:
    """Load and preprocess each path; returns the tensors of the readable ones and, per path, an error or None."""
    tensors, errors = [], []
    for path in paths:
        try:
            tensors.append(transform(load_image(path)))
            errors.append(None)
        except ImageLoadError as e:
            errors.append(e.reason)
        except (OSError, ValueError) as e:  # e.g. a decompression bomb or an image PIL cannot resize
            errors.append(f"{type(e).__name__}: {e}")
    return tensors, errors


def predict_tensors(model: nn.Module, x: torch.Tensor, topk: int, class_names: Sequence[str],
                    amp_dtype: torch.dtype | None = None) -> list[list[tuple[int, str, float]]]:
    """Top-k ``(index, name, probability)`` per row of a preprocessed batch ``x`` (B, 3, H, W), under autocast to
    ``amp_dtype`` when given (probabilities are computed in fp32)."""
    device = next(model.parameters(), torch.empty(0)).device  # an exported model (RuntimeModel) runs on the CPU
    cast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
    with torch.inference_mode(), cast:
        probs = model(x.to(device)).float().softmax(dim=-1)  # (B, K)
    values, indices = probs.topk(min(topk, probs.shape[-1]), dim=-1)  # (B, k) each
    return [[(int(i), class_names[int(i)], float(v)) for v, i in zip(vs, ids)]
            for vs, ids in zip(values.cpu(), indices.cpu())]


def predict_files(model: nn.Module, paths: Iterable[str | os.PathLike], topk: int = 5,
                  batch_size: int = 16, amp_dtype: torch.dtype | None = None) -> list[Prediction]:
    """One ``Prediction`` per path (in order); ``paths`` may include folders (see ``expand_inputs``). The model
    runs on the device its parameters are on, in eval mode (its previous mode is restored)."""
    if topk < 1 or batch_size < 1:
        raise ValueError(f"topk and batch_size must be >= 1, got {topk} and {batch_size}")
    if model.num_classes <= 0:
        raise ValueError("the model has no classification head (num_classes=0); nothing to predict")
    files = expand_inputs(paths)
    transform = eval_transform(model.data_cfg)
    names = resolve_class_names(model)
    was_training = model.training
    model.eval()
    try:
        return [p for start in range(0, len(files), batch_size)
                for p in _predict_chunk(model, files[start:start + batch_size], transform, topk, names, amp_dtype)]
    finally:
        model.train(was_training)


def _predict_chunk(model: nn.Module, paths: Sequence[str], transform, topk: int, names: Sequence[str],
                   amp_dtype: torch.dtype | None) -> list[Prediction]:
    tensors, errors = load_batch(paths, transform)
    results = iter(predict_tensors(model, torch.stack(tensors), topk, names, amp_dtype) if tensors else [])
    out = []
    for path, error in zip(paths, errors):
        if error is not None:  # reported once, in the Prediction (the CLI prints it), not also logged
            out.append(Prediction(path, [], error))
        else:
            out.append(Prediction(path, next(results)))
    return out
