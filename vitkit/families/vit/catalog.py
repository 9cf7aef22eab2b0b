"""The ViT variants (the ViT paper's Table 1 sizes at every patch and resolution timm names, and the R50+ViT-B/16
hybrids), their evaluation preprocessing, named weights, published sizes and the tiny test configurations."""
from __future__ import annotations

from vitkit.specs import INCEPTION_MEAN, INCEPTION_STD, PreprocessConfig, Reference, WeightSpec

# -------------------------------------------------------------------------------------------------- variants
# Widths, depths, heads and MLP sizes: ViT paper Table 1 (B, L, H) and DeiT Table 1 / AugReg (Ti, S).
SIZES = {
    "tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
    "large": dict(embed_dim=1024, depth=24, num_heads=16),
    "huge": dict(embed_dim=1280, depth=32, num_heads=16),
}
PATCHES = (8, 14, 16, 32)
RESOLUTIONS = (224, 384)

PLAIN = {
    f"vit_{size}_patch{p}_{res}": dict(**dims, patch_size=p, img_size=res)
    for size, dims in SIZES.items() for p in PATCHES for res in RESOLUTIONS if res % p == 0
}
# The hybrid R50+ViT-B/16 (paper §3.1, Table 5): ViT-B on the 1/16 feature map of a ResNet-50 root and three stages
# of (3, 4, 9) units, 1x1 patches (vit_jax configs/models.py get_r50_b16_config@c6de1e5); timm's names. Built by
# ``HybridVisionTransformer`` (the family's ``model_classes``).
HYBRIDS = {f"vit_base_r50_s16_{res}": dict(**SIZES["base"], patch_size=1, img_size=res,
                                           resnet=dict(num_layers=(3, 4, 9), width_factor=1.0))
           for res in RESOLUTIONS}
VARIANTS = {**PLAIN, **HYBRIDS}
# Google's checkpoints expect pixels in [-1, 1]; timm evaluates at crop 0.9 (224) and 1.0 (384).
DATA_CFGS = {
    name: PreprocessConfig(mean=INCEPTION_MEAN, std=INCEPTION_STD, crop_pct=0.9 if cfg["img_size"] == 224 else 1.0)
    for name, cfg in VARIANTS.items()
}


# ------------------------------------------------------------------------------------------- published sizes
def closed_form_size(cfg: dict, prefix_tokens: int = 1, heads: int = 1, num_classes: int = 1000) -> Reference:
    """Parameters and forward MACs of a ViT written out by hand from the paper's layer sizes (eq. 1-4), independent of
    the model code: a block has 12·D² + 13·D parameters and, over T tokens, 12·T·D² + 2·T²·D MACs (q/k/v, output
    projection, the 4·D MLP, and the two attention products). Agrees with timm's ``VisionTransformer`` counted, e.g.
    ViT-B/16 86.57 M / 17.56 G, ViT-L/16 304.33 M / 61.55 G, DeiT-Ti 5.72 M / 1.25 G, and with the papers' rounded
    sizes (ViT Table 1: ViT-B 86 M; DeiT Table 1: 5 M, 22 M, 86 M)."""
    D, depth, P, S = cfg["embed_dim"], cfg["depth"], cfg["patch_size"], cfg["img_size"]
    N = (S // P) ** 2
    T = N + prefix_tokens
    params = (3 * P * P * D + D) + prefix_tokens * D + T * D + depth * (12 * D * D + 13 * D) + 2 * D \
        + heads * (D * num_classes + num_classes)
    macs = N * 3 * P * P * D + depth * (12 * T * D * D + 2 * T * T * D) + heads * D * num_classes
    return Reference(params / 1e6, macs / 1e9, "closed form of the ViT paper's layer sizes (eq. 1-4)",
                     params_tol=1e-6, macs_rtol=1e-6)


# The hybrids' sizes: timm 1.0.31 vision_transformer_hybrid.py's models (num_classes=1000) counted here
# (FlopCounterMode, attention on its explicit path, one image), independent of vitkit's code; the paper gives none.
_HYBRID_COUNTED = {"vit_base_r50_s16_224": (98.659112, 21.535358976), "vit_base_r50_s16_384": (98.950952, 67.155787776)}
_HYBRID_SOURCE = "timm 1.0.31 vision_transformer_hybrid.py counted (FlopCounterMode, 1000 classes, one image)"
REFERENCES = {**{name: closed_form_size(cfg) for name, cfg in PLAIN.items()},
              **{name: Reference(*_HYBRID_COUNTED[name], _HYBRID_SOURCE, params_tol=1e-6, macs_rtol=1e-6)
                 for name in HYBRIDS}}


# ---------------------------------------------------------------------------------------------------- tests
def tiny(name: str, cfg: dict) -> dict:
    """2 blocks of width 48 on a 2x2 patch grid: forward and backward in milliseconds. A hybrid: that transformer on a
    32-channel ResNet of two one-unit stages (stride 8), 16 px."""
    if "resnet" in cfg:
        return dict(depth=2, embed_dim=48, num_heads=3, img_size=16, resnet=dict(num_layers=(1, 1), width_factor=0.5))
    return dict(depth=2, embed_dim=48, num_heads=3, img_size=2 * cfg["patch_size"])


# ----------------------------------------------------------------------------------------------- named weights
# timm's Hub repositories (timm/<variant>.<tag>, model.safetensors), verified by huggingface_hub. augreg = Steiner et
# al. 2021, fine-tuned on ImageNet-1k from ImageNet-21k; orig = the ViT paper's own ImageNet-21k weights. Tag →
# ImageNet-1k top-1 that timm measured (results-imagenet.csv).
_TIMM_VIT = {
    "vit_tiny_patch16_224": "augreg_in21k_ft_in1k",  # 75.45
    "vit_tiny_patch16_384": "augreg_in21k_ft_in1k",  # 78.44
    "vit_small_patch16_224": "augreg_in21k_ft_in1k",  # 81.40
    "vit_small_patch16_384": "augreg_in21k_ft_in1k",  # 83.81
    "vit_base_patch16_224": "augreg_in21k_ft_in1k",  # 84.53
    "vit_base_patch16_384": "augreg_in21k_ft_in1k",  # 86.01
    "vit_base_patch32_224": "augreg_in21k_ft_in1k",  # 80.73
    "vit_large_patch16_224": "augreg_in21k_ft_in1k",  # 85.86
    "vit_large_patch16_384": "augreg_in21k_ft_in1k",  # 87.10
    "vit_large_patch32_384": "orig_in21k_ft_in1k",  # 81.51
}
WEIGHTS: dict[str, WeightSpec] = {
    name: WeightSpec(url=f"hf-hub:timm/{name}.{tag}", source_format="timm", filename="model.safetensors",
                     notes=f"timm port, tag {tag}") for name, tag in _TIMM_VIT.items()}
