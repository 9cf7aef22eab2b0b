"""Data layer: image decoding, datasets, deterministic augmentations, Mixup/CutMix and loader benchmarks.

Items are ``(uint8 (3, H, W), int)``; transforms take ``(image, torch.Generator)`` and return normalised float32;
masking generators (``BlockwiseMasking``) take the generator alone and return a bool patch mask.
See ``vitkit/data/README.md`` for the design choices and measured throughput.
"""
from .auto_augment import RandAugment, TrivialAugmentWide, build_auto_augment, parse_rand_augment
from .datasets import (CIFAR10, CIFAR100, Digits, FakeData, ImageFolder, Subset, UnlabelledImages,
                       collate_skip_none, load_cifar_pickle)
from .download import DownloadError, UnsafeArchiveError, download_url, md5sum, safe_extract
from .images import IMG_EXTENSIONS, ImageLoadError, load_image, pil_to_tensor, tensor_to_pil, to_rgb
from .loader import cifar_train_loader, measure_loader_throughput
from .masking import BlockwiseMasking
from .mixup import MixupCutmix, SoftTargetCrossEntropy, smooth_one_hot
from .rng import sample_generator, sample_seed
from .splits import DataConfig, Splits, build_splits, limit, train_val_split
from .transforms import (AugmentConfig, Compose, Normalize, RandomCropPad, RandomErasing, RandomHorizontalFlip,
                         RandomResizedCrop, Resize, ResizeCenterCrop, TransformDataset, build_eval_transform,
                         build_mixup, build_train_transform)

__all__ = [
    "load_image", "to_rgb", "pil_to_tensor", "tensor_to_pil", "ImageLoadError", "IMG_EXTENSIONS",
    "CIFAR10", "CIFAR100", "ImageFolder", "UnlabelledImages", "Digits", "FakeData", "Subset", "collate_skip_none",
    "load_cifar_pickle",
    "download_url", "md5sum", "safe_extract", "DownloadError", "UnsafeArchiveError",
    "DataConfig", "Splits", "build_splits", "train_val_split", "limit",
    "AugmentConfig", "build_train_transform", "build_eval_transform", "build_mixup", "TransformDataset", "Compose",
    "RandomResizedCrop", "RandomCropPad", "RandomHorizontalFlip", "Resize", "ResizeCenterCrop", "Normalize",
    "RandomErasing", "RandAugment", "TrivialAugmentWide", "build_auto_augment", "parse_rand_augment",
    "MixupCutmix", "SoftTargetCrossEntropy", "smooth_one_hot", "BlockwiseMasking",
    "sample_generator", "sample_seed", "measure_loader_throughput", "cifar_train_loader",
]
