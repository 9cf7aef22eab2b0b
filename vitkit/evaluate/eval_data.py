"""The labelled data ``vitkit eval`` scores a model on, built with ``vitkit.data`` (``DataConfig``, ``build_splits``,
``build_eval_transform``), so evaluation sees exactly the images and the eval transform training validated on.

The ``data:`` section is layered like a training recipe: the model's input size, interpolation and crop fraction
(``model.data_cfg``; for a model saved by ``vitkit train`` that is the run's own preprocessing) → the run's
``config.yaml`` data section → a ``--data-config`` YAML (a recipe with a ``data:`` key, or a bare data section) →
``--set data.key=value``. Unknown keys are errors (``vitkit.config.from_dict``). ``mean``/``std`` left null come from
the model's ``data_cfg``, as in training.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Sequence

import yaml
from torch import nn
from torch.utils.data import DataLoader

from vitkit.config import ConfigError, apply_dotted, from_dict, merge
from vitkit.data import DataConfig, TransformDataset, build_eval_transform, build_splits, collate_skip_none

__all__ = ["resolve_data_config", "build_eval_loader", "dataset_transform"]

log = logging.getLogger(__name__)

SPLITS = ("test", "val", "train")  # train: the unaugmented training images, e.g. for feature probes


def _model_defaults(model: nn.Module) -> dict[str, Any]:
    _, H, W = model.data_cfg.input_size
    out: dict[str, Any] = {"interpolation": model.data_cfg.interpolation, "crop_pct": model.data_cfg.crop_pct,
                           "crop_mode": model.data_cfg.crop_mode}
    if H == W:
        out["img_size"] = int(H)
    return out


def _read_data_file(path: str | os.PathLike) -> dict[str, Any]:
    with open(path) as f:
        doc = yaml.safe_load(f) or {}
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: expected a mapping")
    section = doc["data"] if "data" in doc else doc  # a whole recipe, or just its data section
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: the data section must be a mapping")
    return section


def _dotted(assignments: Sequence[str]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for a in assignments:
        if not a.split("=", 1)[0].strip().startswith("data."):
            raise ConfigError(f"--set {a}: eval only takes data.* settings (e.g. data.name=cifar10)")
        apply_dotted(tree, a)
    return tree.get("data", {})


def resolve_data_config(model: nn.Module, run_data: dict[str, Any] | None = None,
                        data_file: str | os.PathLike | None = None, sets: Sequence[str] = ()) -> DataConfig:
    """The validated ``DataConfig`` for evaluating ``model`` (see the module docstring for the layering)."""
    layers = [_model_defaults(model), run_data or {}, _read_data_file(data_file) if data_file else {}, _dotted(sets)]
    merged: dict[str, Any] = {}
    for layer in layers:
        merged = merge(merged, layer)
    cfg = from_dict(DataConfig, merged, where="data")
    _check_size(model, cfg)
    return cfg


def _check_size(model: nn.Module, cfg: DataConfig) -> None:
    _, H, W = model.data_cfg.input_size
    if (H, W) != (cfg.img_size, cfg.img_size) and not model.accepts_any_size:
        raise ConfigError(f"data.img_size={cfg.img_size} but the model takes {H}x{W} inputs")


def dataset_transform(cfg: DataConfig, model: nn.Module):
    """``vitkit.data``'s eval transform with the model's mean/std (unless the data section sets them); a model whose
    ``data_cfg.channel_order`` is BGR gets its channels swapped before normalising (mean/std in model order)."""
    return build_eval_transform(cfg, cfg.mean or model.data_cfg.mean, cfg.std or model.data_cfg.std,
                                channel_order=model.data_cfg.channel_order)


def build_eval_loader(cfg: DataConfig, model: nn.Module, split: str = "test",
                      batch_size: int = 64) -> tuple[DataLoader, list[str]]:
    """A sequential loader over ``split`` of ``cfg``'s dataset with the eval transform (also for ``train``: no
    augmentation), and the dataset's class names."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    splits = build_splits(cfg)
    dataset = {"test": splits.test, "val": splits.val, "train": splits.train}[split]
    if dataset is None:
        hint = "set data.val_fraction > 0" if split == "val" else "use --split val"
        raise ValueError(f"data.name={cfg.name} has no {split} split ({hint})")
    if int(model.num_classes) != len(splits.classes):
        raise ValueError(f"the model's head has {model.num_classes} classes but data.name={cfg.name} has "
                         f"{len(splits.classes)}")
    names = model.class_names
    if names and list(names) != list(splits.classes):
        log.warning("the checkpoint's class names differ from data.name=%s's classes; labels are compared by index",
                    cfg.name)
    loader = DataLoader(TransformDataset(dataset, dataset_transform(cfg, model)), batch_size=batch_size,
                        shuffle=False, num_workers=cfg.num_workers, collate_fn=collate_skip_none)
    log.info("data: %s %s split, %d images, %d classes", cfg.name, split, len(dataset), len(splits.classes))
    return loader, list(splits.classes)
