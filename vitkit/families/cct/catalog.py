"""The CCT variants (SHI-Labs/Compact-Transformers ``src/cct.py`` factory functions), their evaluation preprocessing,
named weights, published sizes and the tiny test configuration."""
from __future__ import annotations

from vitkit.specs import IMAGENET_MEAN, IMAGENET_STD, PreprocessConfig, Reference, WeightSpec

# -------------------------------------------------------------------------------------------------- variants
# src/cct.py size presets: layers, heads, MLP ratio, width.
SIZES = {
    2: dict(num_layers=2, num_heads=2, mlp_ratio=1.0, embedding_dim=128),
    4: dict(num_layers=4, num_heads=2, mlp_ratio=1.0, embedding_dim=128),
    6: dict(num_layers=6, num_heads=4, mlp_ratio=2.0, embedding_dim=256),
    7: dict(num_layers=7, num_heads=4, mlp_ratio=2.0, embedding_dim=256),
    14: dict(num_layers=14, num_heads=6, mlp_ratio=3.0, embedding_dim=384),
}
# (size, kernel, conv layers, resolution, classes, has a _sine twin): the official factory functions' defaults. The
# CIFAR variants default to 10 classes, CCT-7/7x2 to Flowers-102's 102, CCT-14 to ImageNet's 1000.
_SHAPES = [(2, 3, 2, 32, 10, True), (4, 3, 2, 32, 10, True), (6, 3, 1, 32, 10, True), (6, 3, 2, 32, 10, True),
           (7, 3, 1, 32, 10, True), (7, 3, 2, 32, 10, True), (7, 7, 2, 224, 102, True),
           (14, 7, 2, 224, 1000, False), (14, 7, 2, 384, 1000, False)]
VARIANTS = {}
for _size, _k, _convs, _res, _classes, _sine in _SHAPES:
    _cfg = dict(**SIZES[_size], kernel_size=_k, n_conv_layers=_convs, img_size=_res, num_classes=_classes)
    VARIANTS[f"cct_{_size}_{_k}x{_convs}_{_res}"] = dict(_cfg, positional_embedding="learnable")
    if _sine:
        VARIANTS[f"cct_{_size}_{_k}x{_convs}_{_res}_sine"] = dict(_cfg, positional_embedding="sine")

# Official evaluation preprocessing (configs/datasets/*.yml): dataset mean/std, bicubic, crop_pct 1.0 (0.9 ImageNet).
_CIFAR = PreprocessConfig(mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616), crop_pct=1.0, label_set=None)
_FLOWERS = PreprocessConfig(mean=(0.4353, 0.3773, 0.2872), std=(0.2966, 0.2455, 0.2698), crop_pct=1.0,
                            label_set=None)
_IMAGENET = PreprocessConfig(mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_pct=0.9)
DATA_CFGS = {name: {10: _CIFAR, 102: _FLOWERS, 1000: _IMAGENET}[cfg["num_classes"]] for name, cfg in VARIANTS.items()}

# ------------------------------------------------------------------------------------------- published sizes
# Trainable parameters (M; a sine table is a buffer) and forward GMACs at the native size with the default class count,
# counted on the official code (SHI-Labs/Compact-Transformers@cd11f09 src/cct.py, CCT(...) on zeros, torch
# FlopCounterMode / 2, attention products included; tests/families/cct/data/make_reference.py → official_sizes.json);
# to two decimals CCT-7/3x1 3.76 M / 1.18 G, CCT-14/7x2 22.37 M / 5.52 G. The older examples/README.md table of the
# official repository (CCT-7/3x1 3.760M / 0.947G) counts fewer MACs: its counter misses part of attention.
_SOURCE = "SHI-Labs/Compact-Transformers@cd11f09 src/cct.py, counted (tests/families/cct/data/official_sizes.json)"
_COUNTED = {
    "cct_2_3x2_32": (0.283723, 0.035341568),
    "cct_2_3x2_32_sine": (0.275531, 0.035341568),
    "cct_4_3x2_32": (0.482123, 0.050021632),
    "cct_4_3x2_32_sine": (0.473931, 0.050021632),
    "cct_6_3x1_32": (3.233803, 1.013844480),
    "cct_6_3x1_32_sine": (3.168267, 1.013844480),
    "cct_6_3x2_32": (3.326923, 0.253463040),
    "cct_6_3x2_32_sine": (3.310539, 0.253463040),
    "cct_7_3x1_32": (3.760139, 1.181616640),
    "cct_7_3x1_32_sine": (3.694603, 1.181616640),
    "cct_7_3x2_32": (3.853259, 0.289114624),
    "cct_7_3x2_32_sine": (3.836875, 0.289114624),
    "cct_7_7x2_224": (4.573735, 1.604554240),
    "cct_7_7x2_224_sine": (4.523559, 1.604554240),
    "cct_14_7x2_224": (22.367273, 5.521901568),
    "cct_14_7x2_384": (22.513193, 18.580282368),
}
REFERENCES = {name: Reference(params, gmacs, _SOURCE, params_tol=1e-6, macs_rtol=1e-6)
              for name, (params, gmacs) in _COUNTED.items()}


def tiny(name: str, cfg: dict) -> dict:
    """2 blocks of width 32 on a few tokens: 16-px inputs for the 3x3 tokenizers (8x8 or 4x4 tokens), 32 px for the
    7x7 stride-2 ones (2x2 tokens)."""
    return dict(num_layers=2, embedding_dim=32, num_heads=2, conv_channels=8, img_size=16 if cfg["kernel_size"] == 3
                else 32)



# ----------------------------------------------------------------------------------------------- named weights
# The official files, as SHI-Labs/Compact-Transformers@cd11f09 src/cct.py ``model_urls`` names them (what the official
# factory functions' ``pretrained=True`` downloads; README.md "Results" lists the same files with their accuracy):
# bare state dicts (format "official"), each for the variant's default head (CIFAR-10: 10 classes, Flowers-102: 102,
# ImageNet: 1000). They are published without a checksum (no hash in the file names, none in the README or the code),
# so the sha256 of the first complete download is recorded beside the cached file and every later use is checked
# against it (vitkit.weights.hub).
_CCT = "https://shi-labs.com/projects/cct/checkpoints/"
WEIGHTS: dict[str, WeightSpec] = {
    "cct_7_3x1_32": WeightSpec(_CCT + "pretrained/cct_7_3x1_32_cifar10_300epochs.pth", "official", num_classes=10,
                               notes="CIFAR-10, 300 epochs: 96.53% top-1 (README@cd11f09)"),
    "cct_7_3x1_32_sine": WeightSpec(_CCT + "pretrained/cct_7_3x1_32_sine_cifar10_5000epochs.pth", "official",
                                    num_classes=10, notes="CIFAR-10, 5000 epochs: 98.00% top-1 (README@cd11f09)"),
    "cct_7_7x2_224_sine": WeightSpec(_CCT + "pretrained/cct_7_7x2_224_flowers102.pth", "official", num_classes=102,
                                     notes="Flowers-102 from scratch, 300 epochs: 97.19% top-1 (README@cd11f09)"),
    "cct_14_7x2_224": WeightSpec(_CCT + "pretrained/cct_14_7x2_224_imagenet.pth", "official",
                                 notes="ImageNet-1k, 310 epochs: 80.67% top-1 (README@cd11f09)"),
    "cct_14_7x2_384": WeightSpec(_CCT + "finetuned/cct_14_7x2_384_imagenet.pth", "official",
                                 notes="ImageNet-1k, fine-tuned at 384: 82.71% top-1 (README@cd11f09)"),
}
# Published but not named (a catalog names one file per registered variant; ``...`` = _CCT): the files of the official
# names for another head, which vitkit does not register (pass the path; the head size comes from the file),
#     cct_7_3x1_32_c100        .../pretrained/cct_7_3x1_32_cifar100_300epochs.pth              CIFAR-100 80.92%
#     cct_7_3x1_32_sine_c100   .../pretrained/cct_7_3x1_32_sine_cifar100_5000epochs.pth        CIFAR-100 82.87%
#     cct_14_7x2_384_fl        .../finetuned/cct_14_7x2_384_flowers102.pth                     Flowers-102 99.76%
# and the README's shorter sine runs, .../pretrained/cct_7_3x1_32_sine_cifar{10,100}_1500epochs.pth (97.48% / 82.72%).
# The older examples/README.md checkpoints (CCT-2/4/6/7 on CIFAR) are zip archives attached to GitHub issues
# (``files/<id>/<name>.pth.zip``), written by the earlier training script; none is named.
