"""Data-loader helpers shared by the trainer and the benchmarks: ``measure_loader_throughput`` (called by
``vitkit bench --train``) and the reference CIFAR-10 training loader.

Conventions: throughput is images per second of wall-clock time, timed after ``warmup`` batches so that worker
start-up is excluded; the CIFAR pipeline is the CIFAR standard (pad-4 crop + flip) plus timm's DeiT RandAugment.
"""
from __future__ import annotations

import time
from dataclasses import replace

import torch
from torch.utils.data import DataLoader

from .datasets import collate_skip_none
from .splits import DataConfig
from .transforms import AugmentConfig, TransformDataset, build_train_transform

__all__ = ["measure_loader_throughput", "cifar_train_loader", "bench_configs", "CIFAR10_MEAN", "CIFAR10_STD"]

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)  # per-channel, training set


def measure_loader_throughput(loader, batches: int, warmup: int = 1) -> float:
    """Images per second over ``batches`` batches of ``loader``, timed after ``warmup`` batches."""
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    count, start = 0, time.perf_counter()
    for _ in range(batches):
        try:
            images = next(it)[0]
        except StopIteration:
            break
        count += len(images)
    elapsed = time.perf_counter() - start
    del it  # shuts worker processes down
    return count / max(elapsed, 1e-9)


def bench_configs(img_size: int, auto_augment: str | None, erasing: float = 0.0,
                  rrc: bool = False) -> tuple[DataConfig, AugmentConfig]:
    """Configs of the benchmark pipelines: pad-4 crop (or random-resized crop) + flip + ``auto_augment``."""
    data = DataConfig(name="fake", img_size=img_size, interpolation="bilinear")
    aug = AugmentConfig(auto_augment=auto_augment, random_erasing=erasing)
    if rrc:
        aug = replace(aug, random_resized_crop=True, crop_padding=0)
    return data, aug


def cifar_train_loader(dataset, batch_size: int = 128, num_workers: int = 0, img_size: int = 32,
                       auto_augment: str | None = "rand-m9-mstd0.5-inc1", seed: int = 0) -> DataLoader:
    """The reference CIFAR-10 training loader: pad-4 crop + flip + RandAugment + normalise, shuffled, ``drop_last``."""
    data_cfg, aug = bench_configs(img_size, auto_augment)
    ds = TransformDataset(dataset, build_train_transform(aug, data_cfg, CIFAR10_MEAN, CIFAR10_STD), seed=seed)
    order = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=True, generator=order, num_workers=num_workers,
                      collate_fn=collate_skip_none, drop_last=True, persistent_workers=False)
