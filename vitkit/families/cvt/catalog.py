"""The CvT variants (microsoft/CvT ``experiments/imagenet/cvt/*.yaml``), their evaluation preprocessing, named weights,
published sizes and the tiny test configuration."""
from __future__ import annotations

from vitkit.specs import PreprocessConfig, Reference, WeightSpec

# -------------------------------------------------------------------------------------------------- variants
# experiments/imagenet/cvt/cvt-{13,21}-224x224.yaml and cvt-w24-384x384.yaml; kernels, strides, paddings, MLP ratio,
# qkv bias and the class token are the same in all three (the CvTConfig defaults).
VARIANTS = {
    "cvt_13": dict(embed_dim=(64, 192, 384), num_heads=(1, 3, 6), depth=(1, 2, 10), drop_path_rate=(0.0, 0.0, 0.1)),
    "cvt_21": dict(embed_dim=(64, 192, 384), num_heads=(1, 3, 6), depth=(1, 4, 16), drop_path_rate=(0.0, 0.0, 0.1)),
    "cvt_w24": dict(embed_dim=(192, 768, 1024), num_heads=(3, 12, 16), depth=(2, 2, 20),
                    drop_path_rate=(0.0, 0.0, 0.3), img_size=384),
}
# cvt-{13,21}-384x384.yaml: the 224 models' SPEC at 384 (the released CvT-13/21-384x384 weights)
VARIANTS.update({f"{name}_384": dict(VARIANTS[name], img_size=384) for name in ("cvt_13", "cvt_21")})
# Official evaluation (lib/dataset/transformas/build.py): ImageNet mean/std, bicubic (TEST.INTERPOLATION 3); at 224
# T.Resize(int(224 / 0.875)) (the short side) and T.CenterCrop(224) (TEST.CENTER_CROP default True); the 384 configs
# set CENTER_CROP False: T.Resize((384, 384)) squashes the whole image, aspect not kept (crop_mode "squash").
DATA_CFGS = {name: PreprocessConfig(crop_pct=0.875) if cfg.get("img_size", 224) == 224 else
             PreprocessConfig(crop_pct=1.0, crop_mode="squash") for name, cfg in VARIANTS.items()}

# ------------------------------------------------------------------------------------------- published sizes
# Counted with FlopCounterMode (MACs = FLOPs / 2) on the official code, microsoft/CvT@f851e68 lib/models/cls_cvt.py
# (tests/families/cvt/data/README.md): 19.9975 M / 4.5661 G, 31.6227 M / 7.1780 G, 277.1964 M / 194.2217 G. The
# README.md model-zoo tables of microsoft/CvT round them: 20M / 4.5, 32M / 7.1, 277M / 193.2 GFLOPs.
_SRC = "microsoft/CvT@f851e68 lib/models/cls_cvt.py counted with FlopCounterMode; README {}"
REFERENCES = {
    "cvt_13": Reference(19.9975, 4.5661, _SRC.format("20M / 4.5 G"), params_tol=1e-4, macs_rtol=1e-4),
    "cvt_21": Reference(31.6227, 7.1780, _SRC.format("32M / 7.1 G"), params_tol=1e-4, macs_rtol=1e-4),
    "cvt_w24": Reference(277.1964, 194.2217, _SRC.format("277M / 193.2 G at 384"), params_tol=1e-4, macs_rtol=1e-4),
    # the official cls_cvt.py at f851e68 counted the same way at 384 (tests/families/cvt/data/README.md)
    "cvt_13_384": Reference(19.9975, 16.2694, _SRC.format("20M / 16.3 G at 384"), params_tol=1e-4, macs_rtol=1e-4),
    "cvt_21_384": Reference(31.6227, 24.8491, _SRC.format("32M / 24.9 G at 384"), params_tol=1e-4, macs_rtol=1e-4),
}


def tiny(name: str, cfg: dict) -> dict:
    """Widths 16/32/48 on a 32x32 input (token grids 8, 4, 2): forward and backward in milliseconds."""
    return dict(embed_dim=(16, 32, 48), num_heads=(1, 2, 3), depth=(1, 1, 2), img_size=32)


# ----------------------------------------------------------------------------------------------- named weights
# The official files live in a OneDrive model zoo (microsoft/CvT README.md "model zoo" link) with no hash in their
# names or anywhere else, so they cannot be verified and are not listed. transformers' Hub repositories hold the same
# weights renamed by convert_cvt_original_pytorch_checkpoint_to_pytorch.py (its 2022 save_pretrained wrote
# pytorch_model.bin); the Hub verifies them. They run with transformers' numerics (exact GELU) unless
# act_layer='quick_gelu' is passed. Top-1: microsoft/CvT README.md.
WEIGHTS: dict[str, WeightSpec] = {
    name: WeightSpec(url=f"hf-hub:microsoft/{repo}", source_format="hf", filename="pytorch_model.bin", notes=notes)
    for name, repo, notes in (
        ("cvt_13", "cvt-13", "ImageNet-1k, 224; README top-1 81.6"),
        ("cvt_21", "cvt-21", "ImageNet-1k, 224; README top-1 82.5"),
        ("cvt_13_384", "cvt-13-384", "ImageNet-1k, fine-tuned at 384; README top-1 83.0"),
        ("cvt_21_384", "cvt-21-384", "ImageNet-1k, fine-tuned at 384; README top-1 83.3"),
        ("cvt_w24", "cvt-w24-384-22k", "ImageNet-22k pre-trained, ImageNet-1k fine-tuned at 384; README top-1 87.6"),
    )
}
