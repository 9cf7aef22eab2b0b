"""The PVT v1 variants (whai362/PVT ``classification/pvt.py`` factories), their evaluation preprocessing, named
weights, published sizes and the tiny test configuration."""
from __future__ import annotations

from vitkit.specs import PreprocessConfig, Reference, WeightSpec

# -------------------------------------------------------------------------------------------------- variants
# classification/pvt.py pvt_tiny … pvt_large: widths, heads, MLP and reduction ratios shared, depths differ.
VARIANTS = {
    "pvt_tiny": dict(depths=(2, 2, 2, 2)),
    "pvt_small": dict(depths=(3, 4, 6, 3)),
    "pvt_medium": dict(depths=(3, 4, 18, 3)),
    "pvt_large": dict(depths=(3, 8, 27, 3)),
}
# The official evaluation (classification/datasets.py): resize to 256/224 · size (bicubic), centre crop, ImageNet
# mean/std.
DATA_CFGS = PreprocessConfig(crop_pct=0.875, interpolation="bicubic")

# Published sizes (the README's Model Zoo and the paper's ImageNet table), to two decimals as counted.
_SOURCE = ("whai362/PVT@57e2dfa README params (13.2/24.5/44.2/61.4 M), paper Table 2 GFLOPs (1.9/3.8/6.7/9.8); "
           "two decimals counted on the official classification/pvt.py")
REFERENCES = {
    "pvt_tiny": Reference(13.23, 1.93, _SOURCE),
    "pvt_small": Reference(24.49, 3.82, _SOURCE),
    "pvt_medium": Reference(44.21, 6.66, _SOURCE),
    "pvt_large": Reference(61.37, 9.81, _SOURCE),
}


def tiny(name: str, cfg: dict) -> dict:
    """Widths 8-32, one block per stage, 64×64 inputs: forward and backward in milliseconds (PVT v2 too; the
    variant's MLP ratios, reduction ratios and linear flag are kept)."""
    return dict(embed_dims=(8, 16, 24, 32), num_heads=(1, 2, 3, 4), depths=(1, 1, 1, 1), img_size=64)


# ----------------------------------------------------------------------------------------------- named weights
# The official release files (github.com/whai362/PVT/releases/download/v2/pvt_{tiny,…}.pth) carry no hash in their
# names and none is published, so they are not in the catalog. transformers' converted copies of them are Hub
# repositories (huggingface_hub verifies what it downloads): the ones whose model.safetensors is listed on the Hub.
# pvt_small's repository (Zetatech/pvt-small-224) is left out: its safetensors file could not be confirmed here.
_HUB = {"pvt_tiny": "Zetatech/pvt-tiny-224", "pvt_medium": "Zetatech/pvt-medium-224",
        "pvt_large": "Zetatech/pvt-large-224"}
WEIGHTS = {name: WeightSpec(url=f"hf-hub:{repo}", source_format="hf", filename="model.safetensors",
                            notes="official ImageNet-1k weights converted by transformers (convert_pvt_to_pytorch.py)")
           for name, repo in _HUB.items()}
