"""The measurements behind ``vitkit/data/README.md``: our augmentations against kornia's, and the CIFAR-10
training loader (``measure_loader_throughput`` itself lives in ``loader.py``).

Run ``python -m vitkit.data.bench --augment`` and ``python -m vitkit.data.bench --loader --cifar-root DIR``.
Conventions: images/s of wall-clock time on the CPU, after one warm-up batch (worker start-up excluded); kornia is
imported only here and only if installed (vitkit does not depend on it).
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from .loader import CIFAR10_MEAN, CIFAR10_STD, bench_configs, cifar_train_loader, measure_loader_throughput
from .rng import sample_generator
from .transforms import build_train_transform

__all__ = ["own_augment_throughput", "kornia_augment_throughput", "main"]


def own_augment_throughput(images: torch.Tensor, auto_augment: str | None, rrc: bool = False,
                           erasing: float = 0.0) -> float:
    """vitkit's training transform, one sample at a time with its own generator; images/s."""
    data_cfg, aug = bench_configs(images.shape[-1], auto_augment, erasing, rrc)
    transform = build_train_transform(aug, data_cfg, CIFAR10_MEAN, CIFAR10_STD)
    start = time.perf_counter()
    for i, img in enumerate(images):
        transform(img, sample_generator(0, 0, i))
    return len(images) / (time.perf_counter() - start)


def _kornia_pipeline(size: int, auto_augment: str | None, rrc: bool, erasing: float):
    import kornia.augmentation as K
    ops = [K.RandomResizedCrop((size, size)) if rrc else K.RandomCrop((size, size), padding=4),
           K.RandomHorizontalFlip()]
    if auto_augment == "trivial":
        ops.append(K.auto.TrivialAugment())
    elif auto_augment:
        ops.append(K.auto.RandAugment(n=2, m=27))  # kornia's m is on a 0..30 scale: 27 ~ timm's m9
    ops.append(K.Normalize(torch.tensor(CIFAR10_MEAN), torch.tensor(CIFAR10_STD)))
    if erasing:
        ops.append(K.RandomErasing(p=erasing))
    return K.AugmentationSequential(*ops)


def kornia_augment_throughput(images: torch.Tensor, auto_augment: str | None, batched: bool, rrc: bool = False,
                              erasing: float = 0.0, reseed: bool = False) -> float:
    """kornia's nearest equivalent pipeline on float [0, 1] input; per sample or as one batch; images/s.

    ``reseed=True`` wraps each per-sample call in ``torch.random.fork_rng`` + ``manual_seed``, the cost of making
    kornia deterministic per sample.
    """
    pipe = _kornia_pipeline(images.shape[-1], auto_augment, rrc, erasing)
    start = time.perf_counter()
    x = images.float() / 255.0  # (B, 3, H, W); conversion counted, as our pipeline counts its own
    if batched:
        pipe(x)
    else:
        for i in range(len(x)):
            if reseed:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(i)
                    pipe(x[i:i + 1])
            else:
                pipe(x[i:i + 1])
    return len(images) / (time.perf_counter() - start)


def _best(fn, repeat: int) -> float:
    """Best of ``repeat`` runs: on a shared machine the fastest run is the least disturbed one."""
    return max(fn() for _ in range(repeat))


def _augment_report(n32: int, n224: int, repeat: int) -> None:
    g = torch.Generator().manual_seed(0)
    aa = "rand-m9-mstd0.5-inc1"
    cases = [("32x32 pad-crop+flip+RA", 32, n32, False, 0.0), ("224x224 RRC+flip+RA+erase", 224, n224, True, 0.25)]
    print("| pipeline | vitkit per-sample | kornia per-sample | kornia per-sample, reseeded | kornia batched |")
    print("| --- | --- | --- | --- | --- |")
    for name, size, n, rrc, erasing in cases:
        images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
        own_augment_throughput(images[:8], aa, rrc, erasing)  # warm-up: first calls allocate
        own = _best(lambda: own_augment_throughput(images, aa, rrc, erasing), repeat)
        try:
            kornia_augment_throughput(images[:8], aa, True, rrc, erasing)
            kor = [_best(lambda: kornia_augment_throughput(images, aa, b, rrc, erasing, r), repeat)
                   for b, r in ((False, False), (False, True), (True, False))]
        except ImportError:
            kor = [float("nan")] * 3
        print(f"| {name} | {own:.0f} | {kor[0]:.0f} | {kor[1]:.0f} | {kor[2]:.0f} |")


def _loader_report(cifar_root: str | None, batches: int, workers: list[int], repeat: int, img_size: int) -> None:
    from .datasets import CIFAR10, FakeData
    dataset = CIFAR10(cifar_root, "train") if cifar_root else FakeData(50_000, 10, 32)
    print(f"| CIFAR-10 train pipeline at {img_size}px, batch 128 | num_workers | images/s |")
    print("| --- | --- | --- |")
    for aa in ("rand-m9-mstd0.5-inc1", None):
        for w in workers:
            loader = lambda: cifar_train_loader(dataset, 128, w, img_size=img_size, auto_augment=aa)  # noqa: E731
            rate = _best(lambda: measure_loader_throughput(loader(), batches), repeat)
            print(f"| {'resize+' if img_size != 32 else ''}pad-crop+flip{' + ' + aa if aa else ''} | {w} | "
                  f"{rate:.0f} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--augment", action="store_true", help="vitkit vs kornia augmentation throughput")
    p.add_argument("--loader", action="store_true", help="CIFAR-10 training DataLoader throughput")
    p.add_argument("--cifar-root", help="folder holding cifar-10-batches-py (default: random FakeData)")
    p.add_argument("--batches", type=int, default=20, help="timed batches per loader measurement")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--img-size", type=int, default=32, help="loader output size (CIFAR is resized to it)")
    p.add_argument("--n32", type=int, default=1024, help="images in the 32x32 augmentation run")
    p.add_argument("--n224", type=int, default=128, help="images in the 224x224 augmentation run")
    p.add_argument("--threads", type=int, help="torch.set_num_threads for this process (workers always use 1)")
    p.add_argument("--repeat", type=int, default=3, help="report the best of this many runs")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, load {load}")
    if args.augment:
        _augment_report(args.n32, args.n224, args.repeat)
    if args.loader:
        _loader_report(args.cifar_root, args.batches, args.workers, args.repeat, args.img_size)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
