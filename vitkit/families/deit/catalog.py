"""The DeiT variants (facebookresearch/deit ``models.py`` and timm's names: Ti, S, B at 224 and 384, plain and
distilled), their evaluation preprocessing, named weights, published sizes and the tiny test configuration (ViT's)."""
from __future__ import annotations

from vitkit.families.vit.catalog import closed_form_size, tiny
from vitkit.specs import PreprocessConfig, WeightSpec

__all__ = ["PLAIN", "DISTILLED", "VARIANTS", "DATA_CFGS", "REFERENCES", "WEIGHTS", "tiny"]


# -------------------------------------------------------------------------------------------------- variants
def _deit(size: str, res: int) -> dict:
    """DeiT Table 1: Ti (192 wide, 3 heads), S (384, 6), B (768, 12); 12 blocks of 16x16 patches."""
    dims = {"tiny": (192, 3), "small": (384, 6), "base": (768, 12)}[size]
    return dict(embed_dim=dims[0], num_heads=dims[1], depth=12, patch_size=16, img_size=res)


_NAMES = [(s, r) for s in ("tiny", "small", "base") for r in (224, 384)]
PLAIN = {f"deit_{s}_patch16_{r}": _deit(s, r) for s, r in _NAMES}  # built by ``DeiT`` (a ViT with DeiT's refusals)
DISTILLED = {f"deit_{s}_distilled_patch16_{r}": _deit(s, r) for s, r in _NAMES}  # ``DistilledVisionTransformer``
VARIANTS = {**PLAIN, **DISTILLED}
# DeiT evaluates with ImageNet mean/std, resize to size / 0.875 then centre-crop (main.py --eval-crop-ratio 0.875)
DATA_CFGS = {n: PreprocessConfig(crop_pct=0.875 if c["img_size"] == 224 else 1.0) for n, c in VARIANTS.items()}

# ------------------------------------------------------------------------------------------- published sizes
# ViT's closed form; a distilled model has a second prefix token and a second head.
REFERENCES = {**{n: closed_form_size(c) for n, c in PLAIN.items()},
              **{n: closed_form_size(c, prefix_tokens=2, heads=2) for n, c in DISTILLED.items()}}

# ----------------------------------------------------------------------------------------------- named weights
# facebookresearch/deit README_deit.md model zoo (official {'model': state_dict} files); their file names carry the
# sha256 prefix that torch.hub checks (-a1311bcf.pth), and vitkit checks the same prefix.
_DEIT_URL = "https://dl.fbaipublicfiles.com/deit/{}.pth"
_DEIT_FILES = {
    "deit_tiny_patch16_224": "deit_tiny_patch16_224-a1311bcf",  # 72.2 top-1 (README)
    "deit_small_patch16_224": "deit_small_patch16_224-cd65a155",  # 79.9
    "deit_base_patch16_224": "deit_base_patch16_224-b5f2ef4d",  # 81.8
    "deit_tiny_distilled_patch16_224": "deit_tiny_distilled_patch16_224-b40b3cf7",  # 74.5
    "deit_small_distilled_patch16_224": "deit_small_distilled_patch16_224-649709d9",  # 81.2
    "deit_base_distilled_patch16_224": "deit_base_distilled_patch16_224-df68dfff",  # 83.4
    "deit_base_patch16_384": "deit_base_patch16_384-8de9b5d1",  # 82.9
    "deit_base_distilled_patch16_384": "deit_base_distilled_patch16_384-d0272ac0",  # 85.2 (1000 epochs)
}
WEIGHTS: dict[str, WeightSpec] = {
    name: WeightSpec(url=_DEIT_URL.format(f), source_format="official", filename=f"{f}.pth",
                     notes="facebookresearch/deit release") for name, f in _DEIT_FILES.items()}
