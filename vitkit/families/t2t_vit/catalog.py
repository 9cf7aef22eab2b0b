"""The T2T-ViT variants (yitu-opensource/T2T-ViT@0f63dc9 ``models/t2t_vit.py`` factory functions), their evaluation
preprocessing, named weights (the official ImageNet release files), published sizes and the tiny test
configuration."""
from __future__ import annotations

from vitkit.specs import PreprocessConfig, Reference, WeightSpec

# -------------------------------------------------------------------------------------------------- variants
# the official models/t2t_vit.py factory functions (names as there)
_PERFORMER, _TRANSFORMER = dict(tokens_type="performer"), dict(tokens_type="transformer")
_LITE = dict(embed_dim=256, num_heads=4, mlp_ratio=2.0)
VARIANTS = {
    "t2t_vit_7": dict(**_PERFORMER, **_LITE, depth=7),
    "t2t_vit_10": dict(**_PERFORMER, **_LITE, depth=10),
    "t2t_vit_12": dict(**_PERFORMER, **_LITE, depth=12),
    "t2t_vit_14": dict(**_PERFORMER, embed_dim=384, depth=14, num_heads=6, mlp_ratio=3.0),
    "t2t_vit_19": dict(**_PERFORMER, embed_dim=448, depth=19, num_heads=7, mlp_ratio=3.0),
    "t2t_vit_24": dict(**_PERFORMER, embed_dim=512, depth=24, num_heads=8, mlp_ratio=3.0),
    "t2t_vit_t_14": dict(**_TRANSFORMER, embed_dim=384, depth=14, num_heads=6, mlp_ratio=3.0),
    "t2t_vit_t_19": dict(**_TRANSFORMER, embed_dim=448, depth=19, num_heads=7, mlp_ratio=3.0),
    "t2t_vit_t_24": dict(**_TRANSFORMER, embed_dim=512, depth=24, num_heads=8, mlp_ratio=3.0),
}
# official default_cfgs (_cfg): ImageNet mean/std, bicubic, crop_pct 0.9; main.py evaluates with them
DATA_CFGS = PreprocessConfig(crop_pct=0.9, interpolation="bicubic")

# Parameters / MACs at 224 px, 1000 classes: the official code (yitu-opensource/T2T-ViT@0f63dc9 models/t2t_vit.py)
# counted; the README's table rounds them (e.g. T2T-ViT-14 21.5M / 4.8G, T2T-ViT_t-14 21.5M / 6.1G).
_SOURCE = "official code yitu-opensource/T2T-ViT@0f63dc9 models/t2t_vit.py counted; README: {}"
_MEASURED = {
    "t2t_vit_7": (4.31, 1.15, "4.3M / 1.1G"), "t2t_vit_10": (5.89, 1.52, "5.9M / 1.5G"),
    "t2t_vit_12": (6.94, 1.76, "6.9M / 1.8G"), "t2t_vit_14": (21.55, 4.78, "21.5M / 4.8G"),
    "t2t_vit_19": (39.18, 8.48, "39.2M / 8.5G"), "t2t_vit_24": (64.11, 13.66, "64.1M / 13.8G"),
    "t2t_vit_t_14": (21.54, 6.09, "21.5M / 6.1G"), "t2t_vit_t_19": (39.17, 9.78, "39.2M / 9.8G"),
    "t2t_vit_t_24": (64.10, 14.97, "64.1M / 15.0G"),
}
REFERENCES = {name: Reference(p, g, _SOURCE.format(readme), params_tol=0.006, macs_rtol=0.005)
              for name, (p, g, readme) in _MEASURED.items()}


def tiny(name: str, cfg: dict) -> dict:
    """32 px (8x8 → 4x4 → 2x2 tokens), T2T width 16, 2 blocks of width 32: milliseconds."""
    return dict(img_size=32, token_dim=16, embed_dim=32, depth=2, num_heads=2)


# ----------------------------------------------------------------------------------------------- named weights
# The official ImageNet-1k release files, yitu-opensource/T2T-ViT@0f63dc9 README.md §2 "T2T-ViT Models" (GitHub release
# "main"; file name = top-1 + model). timm CheckpointSaver dicts holding 'state_dict' and 'state_dict_ema': the
# official evaluation (main.py, --model-ema on by default) and README's load_for_transfer_learning(use_ema=True) load
# the EMA weights, and so does this catalog (checkpoint_key; yitu-opensource/T2T-ViT#17 shows an earlier release,
# 80.6_T2T_ViT_14.pth.tar, holding 'state_dict_ema'). No hash is published (none in the names, the README or the
# code): the sha256 of the first complete download is recorded beside the cached file and every later use is checked
# against it.
_RELEASE = "https://github.com/yitu-opensource/T2T-ViT/releases/download/main/"
_FILES = {
    "t2t_vit_7": ("71.7_T2T_ViT_7.pth.tar", 71.7), "t2t_vit_10": ("75.2_T2T_ViT_10.pth.tar", 75.2),
    "t2t_vit_12": ("76.5_T2T_ViT_12.pth.tar", 76.5), "t2t_vit_14": ("81.5_T2T_ViT_14.pth.tar", 81.5),
    "t2t_vit_19": ("81.9_T2T_ViT_19.pth.tar", 81.9), "t2t_vit_24": ("82.3_T2T_ViT_24.pth.tar", 82.3),
    "t2t_vit_t_14": ("81.7_T2T_ViTt_14.pth.tar", 81.7), "t2t_vit_t_19": ("82.4_T2T_ViTt_19.pth.tar", 82.4),
    "t2t_vit_t_24": ("82.6_T2T_ViTt_24.pth.tar", 82.6),
}
WEIGHTS: dict[str, WeightSpec] = {
    name: WeightSpec(_RELEASE + file, "official", checkpoint_key="state_dict_ema",
                     notes=f"ImageNet-1k at 224: {top1}% top-1 (README@0f63dc9), EMA weights")
    for name, (file, top1) in _FILES.items()}
# Published but not named (one named file per registered variant): 83.3_T2T_ViT_14.pth.tar (T2T-ViT-14 trained at 384,
# 83.3%; create_model("t2t_vit_14", pretrained=PATH) builds it at 384 from its position table), 84.2_T2T_ViT_24.pth.tar
# (T2T-ViT-24 trained with Token Labeling, zihangJiang/TokenLabeling) and the CIFAR transfers of README §5
# (cifar10_t2t-vit_14_98.3.pth, …; {'net': ...} files with 10 or 100 classes at 224): pass the path.
