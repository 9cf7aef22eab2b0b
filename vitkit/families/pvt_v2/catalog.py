"""The PVT v2 variants (whai362/PVT ``classification/pvt_v2.py`` factories), their evaluation preprocessing and tiny
test configuration (PVT v1's), named weights and published sizes."""
from __future__ import annotations

from vitkit.families.pvt import catalog as pvt_catalog
from vitkit.specs import Reference, WeightSpec

# -------------------------------------------------------------------------------------------------- variants
# classification/pvt_v2.py (timm's pvt_v2.py has the same table): B0 is narrower, B5 uses MLP ratio 4 everywhere,
# B2-Li is B2 with linear spatial reduction.
_WIDE = dict(embed_dims=(64, 128, 320, 512))
VARIANTS = {
    "pvt_v2_b0": dict(embed_dims=(32, 64, 160, 256), depths=(2, 2, 2, 2)),
    "pvt_v2_b1": dict(_WIDE, depths=(2, 2, 2, 2)),
    "pvt_v2_b2": dict(_WIDE, depths=(3, 4, 6, 3)),
    "pvt_v2_b3": dict(_WIDE, depths=(3, 4, 18, 3)),
    "pvt_v2_b4": dict(_WIDE, depths=(3, 8, 27, 3)),
    "pvt_v2_b5": dict(_WIDE, depths=(3, 6, 40, 3), mlp_ratios=(4.0, 4.0, 4.0, 4.0)),
    "pvt_v2_b2_li": dict(_WIDE, depths=(3, 4, 6, 3), linear=True),
}
# PVT's official evaluation (one classification/datasets.py serves both versions); timm's pretrained_cfg evaluates its
# ports at crop 0.9 instead of 0.875.
DATA_CFGS = pvt_catalog.DATA_CFGS

_SOURCE = ("whai362/PVT@57e2dfa README params (3.7/14.0/25.4/45.2/62.6/82.0/22.6 M), paper Table 2 GFLOPs "
           "(0.6/2.1/4.0/6.9/10.1/11.8/3.9); two decimals counted on the official classification/pvt_v2.py")
REFERENCES = {
    "pvt_v2_b0": Reference(3.67, 0.57, _SOURCE),
    "pvt_v2_b1": Reference(14.01, 2.11, _SOURCE),
    "pvt_v2_b2": Reference(25.36, 4.03, _SOURCE),
    "pvt_v2_b3": Reference(45.24, 6.90, _SOURCE),
    "pvt_v2_b4": Reference(62.56, 10.10, _SOURCE),
    "pvt_v2_b5": Reference(81.96, 11.72, _SOURCE),
    "pvt_v2_b2_li": Reference(22.55, 3.89, _SOURCE),
}

tiny = pvt_catalog.tiny  # PVT v1's: widths 8-32, one block per stage, 64×64 (the variant's linear flag is kept)

# ----------------------------------------------------------------------------------------------- named weights
# timm's Hub repositories (timm/<variant>.in1k, model.safetensors; verified by huggingface_hub): the official
# ImageNet-1k weights under timm's names (timm measured 70.65 / 78.70 / 82.06 / 83.12 / 83.71 / 83.76 / 82.20 top-1).
# The official release files (github.com/whai362/PVT/releases/download/v2/pvt_v2_*.pth) publish no hash and stay out.
WEIGHTS = {name: WeightSpec(url=f"hf-hub:timm/{name}.in1k", source_format="timm", filename="model.safetensors",
                            notes="official ImageNet-1k weights, timm port")
           for name in ("pvt_v2_b0", "pvt_v2_b1", "pvt_v2_b2", "pvt_v2_b3", "pvt_v2_b4", "pvt_v2_b5", "pvt_v2_b2_li")}
