"""The Swin variants (microsoft/Swin-Transformer ``configs/swin/*.yaml``), their evaluation preprocessing, named
weights, published sizes and the tiny test configuration."""
from __future__ import annotations

from vitkit.families.swin.model import SwinConfig, block_geometry, stage_grids
from vitkit.layers.window_attention import padded_grid
from vitkit.specs import PreprocessConfig, Reference, WeightSpec

# -------------------------------------------------------------------------------------------------- variants
# configs/swin/*.yaml of microsoft/Swin-Transformer; drop-path rates of the ImageNet-1k configs (Swin-L: the 22k one).
_SIZES = {
    "tiny": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.2),
    "small": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.3),
    "base": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), drop_path_rate=0.5),
    "large": dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), drop_path_rate=0.2),
}
_NAMES = [("tiny", 7, 224), ("small", 7, 224), ("base", 7, 224), ("base", 12, 384), ("large", 7, 224),
          ("large", 12, 384)]
VARIANTS = {f"swin_{size}_patch4_window{w}_{res}": dict(**_SIZES[size], window_size=w, img_size=res)
            for size, w, res in _NAMES}
# Official evaluation (data/build.py): bicubic, ImageNet mean/std; at 224 resize the short side to 256 and centre-crop
# (TEST.CROP), at 384 transforms.Resize((384, 384)) without cropping (the *_384 configs set TEST.CROP False): the
# image is squashed, aspect not kept (crop_mode "squash").
DATA_CFGS = {name: PreprocessConfig(crop_pct=0.875) if cfg["img_size"] == 224 else
             PreprocessConfig(crop_pct=1.0, crop_mode="squash") for name, cfg in VARIANTS.items()}


def closed_form_size(cfg: dict, num_classes: int = 1000) -> tuple[float, float]:
    """(parameters M, GMACs) written out from the paper's layer sizes, independent of the model code: patch
    embedding 3·P²·C + 3C; per block (width C, window W, h heads, T tokens of the padded grid, T₀ of the grid)
    12C² + 13C + (2W−1)²h parameters and 4C²T + 2T·W²·C + 8C²T₀ MACs (qkv + projection on the windows, the
    two attention products, the MLP); patch merging of c input channels 8c² + 8c parameters and 8c² MACs per
    output token; final norm and head. Reproduces the official code's counts (Swin-T 28.29 M / 4.49 G … Swin-L
    196.53 M / 34.48 G)."""
    full = SwinConfig(**{**cfg, "num_classes": num_classes})
    C0 = full.embed_dim
    params = 3 * full.patch_size ** 2 * C0 + 3 * C0
    macs = 0
    for i, (stage, grid) in enumerate(zip(block_geometry(full), stage_grids(full))):
        C = C0 * 2 ** i
        tokens = grid[0] * grid[1]
        if i == 0:
            macs += tokens * 3 * full.patch_size ** 2 * C
        else:
            params += 8 * (C // 2) ** 2 + 4 * C
            macs += tokens * 8 * (C // 2) ** 2
        for g in stage:
            hp, wp = padded_grid(g.grid, g.window)
            N = g.window[0] * g.window[1]
            params += 12 * C * C + 13 * C + (2 * g.window[0] - 1) * (2 * g.window[1] - 1) * full.num_heads[i]
            macs += 4 * C * C * hp * wp + 2 * hp * wp * N * C + 8 * C * C * tokens
    D = C0 * 2 ** (len(full.depths) - 1)
    params += 2 * D + D * num_classes + num_classes
    macs += D * num_classes
    return params / 1e6, macs / 1e9


# Published sizes: the official code counted (microsoft/Swin-Transformer@f82860b), reproducing MODELHUB.md's
# 28M/4.5G … 197M/34.5G.
# Swin-L@384 has no measured row there; its closed form (196.74 M, 103.92 G) matches MODELHUB's "197M / 103.9G"
# (to its rounding) and is the reference.
_PUBLISHED = {
    "swin_tiny_patch4_window7_224": (28.29, 4.49),
    "swin_small_patch4_window7_224": (49.61, 8.74),
    "swin_base_patch4_window7_224": (87.77, 15.43),
    "swin_base_patch4_window12_384": (87.90, 47.08),
    "swin_large_patch4_window7_224": (196.53, 34.48),
}
_SOURCE = "microsoft/Swin-Transformer@f82860b code counted (MODELHUB.md: 28M/4.5G … 197M/34.5G)"
REFERENCES = {name: Reference(*_PUBLISHED[name], _SOURCE, macs_rtol=0.002) if name in _PUBLISHED else
              Reference(*closed_form_size(cfg), "closed form of the paper's layer sizes (MODELHUB: 197M / 103.9G)",
                        params_tol=1e-6, macs_rtol=1e-6)
              for name, cfg in VARIANTS.items()}


def tiny(name: str, cfg: dict) -> dict:
    """Four stages of width 16-128 on a 16x16 token grid with 2x2 windows: shifted windows and masks in stages 1-3,
    a single unshifted window in stage 4, all in milliseconds."""
    return dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), window_size=2, img_size=64)


# ----------------------------------------------------------------------------------------------- named weights
# timm's Hub repositories (timm/<variant>.<tag>, model.safetensors; ports of the official Microsoft weights),
# verified by huggingface_hub; the tag is timm's default for the variant. Top-1 that timm measured
# (timm's results-imagenet.csv). The official GitHub release files
# (github.com/SwinTransformer/storage/releases/download/v1.0.0/<variant>.pth) carry no hash in their names and none is
# published, so they are not in the catalog; download them by hand and pass the path (format "official").
_TIMM_TAGS = {
    "swin_tiny_patch4_window7_224": "ms_in1k",  # 81.388
    "swin_small_patch4_window7_224": "ms_in22k_ft_in1k",  # 83.330
    "swin_base_patch4_window7_224": "ms_in22k_ft_in1k",  # 85.276
    "swin_base_patch4_window12_384": "ms_in22k_ft_in1k",  # 86.442
    "swin_large_patch4_window7_224": "ms_in22k_ft_in1k",  # 86.320
    "swin_large_patch4_window12_384": "ms_in22k_ft_in1k",  # 87.142
}
WEIGHTS = {name: WeightSpec(url=f"hf-hub:timm/{name}.{tag}", source_format="timm", filename="model.safetensors",
                            notes=f"timm port of the Microsoft weights, tag {tag}") for name, tag in _TIMM_TAGS.items()}
