"""The recipe's ``data:`` section and the train / val / test splits it describes.

Conventions: the validation set is carved from the training set, stratified by class and seeded, as the ViT paper
chose fine-tuning hyper-parameters on a held-out sub-split of the training set (2% for CIFAR, 10% for Pets and
Flowers, 1% for ImageNet; Dosovitskiy et al. 2021, appendix B.1.1); the test split is never used for model selection.
``train_limit``/``val_limit``/``test_limit`` keep the first N items, for smoke runs and budgets; the validation split
is carved *after* ``train_limit``, so it shrinks with it, and ``val_limit`` then keeps the first N of it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from torch.utils.data import Dataset

from ..config import ConfigError
from .datasets import CIFAR10, CIFAR100, Digits, FakeData, ImageFolder, Subset, UnlabelledImages, stratified_pick
from .shards import ShardDataset

__all__ = ["DataConfig", "Splits", "train_val_split", "limit", "build_splits"]


@dataclass
class DataConfig:
    """The recipe's ``data:`` section."""

    name: Literal["cifar10", "cifar100", "folder", "images", "digits", "fake", "shards"] = "cifar10"
    root: str | None = None  # required but for digits/fake; folder: root/train/<class>/...; images: any tree of images
    download: bool = False  # cifar only: fetch the canonical tarball into root
    img_size: int = 224  # model input size; CIFAR's 32×32 images are resized to it
    val_fraction: float = 0.02  # ViT paper: 2% of the training set held out; 0 = no validation split; shards: unused
    split_seed: int = 0  # seeds the validation split, independent of the training seed
    num_workers: int = 2
    mean: tuple[float, float, float] | None = None  # None: take the model's data config
    std: tuple[float, float, float] | None = None
    interpolation: Literal["bilinear", "bicubic", "nearest"] = "bicubic"  # timm's ViT default
    crop_pct: float = 1.0  # eval centre crop (timm); 1.0 keeps the whole image, right for CIFAR
    crop_mode: Literal["center", "squash"] = "center"  # eval resize: short side (aspect kept) or both sides (timm)
    train_limit: int | None = None  # use only the first N training items (smoke runs)
    val_limit: int | None = None  # use only the first N validation items (default for a val/ folder: test_limit)
    test_limit: int | None = None  # use only the first N test items
    # shards (root/train/, and val/, test/ if present, written by `vitkit shards`; vitkit.data.shards):
    shuffle_buffer: int = 1000  # samples in each training stream's shuffle buffer; 0 = shard order
    # training streams per process, the train loader's workers (none when num_workers is 0); null: set to
    # max(1, num_workers) when resolved, so a resumed run keeps its data order whatever its num_workers
    shard_streams: int | None = None

    def validate(self) -> None:
        if self.name in ("cifar10", "cifar100", "folder", "images", "shards") and not self.root:
            raise ConfigError(f"data.root: required for data.name={self.name!r}")
        if self.download and self.name not in ("cifar10", "cifar100"):
            raise ConfigError(f"data.download: only cifar10/cifar100 can be downloaded, not {self.name!r}")
        if self.img_size <= 0:
            raise ConfigError(f"data.img_size: must be positive, got {self.img_size}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction: must be in [0, 1), got {self.val_fraction}")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers: must be >= 0, got {self.num_workers}")
        if not 0.0 < self.crop_pct <= 1.0:
            raise ConfigError(f"data.crop_pct: must be in (0, 1], got {self.crop_pct}")
        if self.std is not None and min(self.std) <= 0:
            raise ConfigError(f"data.std: must be positive, got {self.std}")
        for name in ("train_limit", "val_limit", "test_limit"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"data.{name}: must be positive or null, got {value}")
        self._validate_shards()

    def _validate_shards(self) -> None:
        if self.shuffle_buffer < 0:
            raise ConfigError(f"data.shuffle_buffer: must be >= 0, got {self.shuffle_buffer}")
        if self.shard_streams is not None and self.shard_streams <= 0:
            raise ConfigError(f"data.shard_streams: must be positive or null, got {self.shard_streams}")
        if self.name == "shards" and self.train_limit is not None:
            raise ConfigError("data.train_limit: not available for data.name=shards (a stream reads whole shards); "
                              "write fewer samples with `vitkit shards --limit N`")
        if self.name == "shards" and self.shard_streams is None:
            self.shard_streams = max(1, self.num_workers)


@dataclass
class Splits:
    """Raw (untransformed) datasets; ``val``/``test`` are ``None`` when the source has none."""

    train: Dataset
    val: Dataset | None
    test: Dataset | None
    classes: list[str]


def train_val_split(dataset, val_fraction: float, seed: int = 0) -> tuple[Subset, Subset]:
    """Hold out ``round(val_fraction * N)`` items, stratified by class, chosen by ``seed``; deterministic.

    Both subsets keep the base order (indices ascending).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    val_idx = stratified_pick(dataset.targets, val_fraction, seed)
    keep = np.ones(len(dataset), dtype=bool)
    keep[val_idx] = False
    return Subset(dataset, np.flatnonzero(keep)), Subset(dataset, val_idx)


def limit(dataset, n: int | None):
    """The first ``n`` items of ``dataset`` (all of it when ``n`` is None or larger)."""
    if dataset is None or n is None or n >= len(dataset):
        return dataset
    return Subset(dataset, range(n))


def _cifar(cfg: DataConfig):
    cls = CIFAR10 if cfg.name == "cifar10" else CIFAR100
    train = cls(cfg.root, "train", download=cfg.download)
    return train, None, cls(cfg.root, "test")


def _folder(cfg: DataConfig):
    root = Path(cfg.root)
    if not (root / "train").is_dir():
        raise FileNotFoundError(f"data.name=folder expects {root}/train/<class>/<images>")
    train = ImageFolder(root / "train")
    val = ImageFolder(root / "val", classes=train.classes) if (root / "val").is_dir() else None
    test = ImageFolder(root / "test", classes=train.classes) if (root / "test").is_dir() else None
    return train, val, test


def _sources(cfg: DataConfig):
    """``(train, val or None, test or None)`` before limits and the validation carve-out."""
    if cfg.name in ("cifar10", "cifar100"):
        return _cifar(cfg)
    if cfg.name == "folder":
        return _folder(cfg)
    if cfg.name == "images":  # no labels: the validation images are carved out of these (val_fraction)
        return UnlabelledImages(cfg.root), None, None
    if cfg.name == "digits":
        return Digits("train"), None, Digits("test")
    # fake: noise at the model's input size, 10 classes; the limits set the sizes
    return FakeData(cfg.train_limit or 512, 10, cfg.img_size, seed=0), None, FakeData(cfg.test_limit or 128, 10,
                                                                                        cfg.img_size, seed=1)


def _shard_splits(cfg: DataConfig) -> Splits:
    """``root/train`` (streamed in training), ``root/val`` and ``root/test`` when present. Without ``val/`` there is
    no validation split: a carve-out would need the whole training split's labels, so ``val_fraction`` is unused."""
    root = Path(cfg.root)
    if not (root / "train" / "index.json").is_file():
        raise FileNotFoundError(f"data.name=shards expects {root}/train/index.json (write it with `vitkit shards "
                                f"SOURCE {root}`)")
    train = ShardDataset.open(root / "train")
    found = {name: ShardDataset.open(root / name, n) for name, n in (("val", cfg.val_limit or cfg.test_limit),
                                                                     ("test", cfg.test_limit))
             if (root / name / "index.json").is_file()}
    for name, split in found.items():
        if split.classes != train.classes:
            raise ValueError(f"{root / name}/index.json lists other classes than {root}/train/index.json")
    return Splits(train, found.get("val"), found.get("test"), train.classes)


def build_splits(cfg: DataConfig) -> Splits:
    """Build train/val/test for ``cfg``: limits first, then (if the source has no val split) the held-out carve."""
    if cfg.name == "shards":
        return _shard_splits(cfg)
    train, val, test = _sources(cfg)
    classes = list(train.classes)
    train = limit(train, cfg.train_limit)
    val, test = limit(val, cfg.val_limit or cfg.test_limit), limit(test, cfg.test_limit)
    if val is None and cfg.val_fraction > 0:
        train, val = train_val_split(train, cfg.val_fraction, cfg.split_seed)
        val = limit(val, cfg.val_limit)
    return Splits(train, val, test, classes)
