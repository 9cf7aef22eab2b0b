"""The MobileViT v1 variants (apple/ml-cvnets@7771756 ``cvnets/models/classification/config/mobilevit.py``), their
evaluation preprocessing, named weights, published sizes and the tiny test configuration."""
from __future__ import annotations

from vitkit.specs import PreprocessConfig, Reference, WeightSpec

# -------------------------------------------------------------------------------------------------- variants
# official cvnets/models/classification/config/mobilevit.py (modes xx_small, x_small, small); timm's names
VARIANTS = {
    "mobilevit_xxs": dict(widths=(16, 24, 48, 64, 80), expand_ratio=2.0, transformer_dims=(64, 80, 96)),
    "mobilevit_xs": dict(widths=(32, 48, 64, 80, 96), transformer_dims=(96, 120, 144)),
    "mobilevit_s": dict(widths=(32, 64, 96, 128, 160), transformer_dims=(144, 192, 240)),
}
# The official evaluation (CVNets v0.1, which trained the released weights: data/datasets/classification/
# imagenet.py): OpenCV-read BGR images, short side 288 (= 256 + 32) bilinear, centre crop 256, pixels / 255 without
# mean/std. transformers' MobileViTImageProcessor does the same (do_flip_channel_order). timm's port is evaluated
# differently; its data config replaces this one when timm weights are loaded (formats.TIMM_DATA_CFG).
DATA_CFGS = PreprocessConfig(input_size=(3, 256, 256), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
                             interpolation="bilinear", crop_pct=256 / 288, channel_order="BGR")

# Parameters / MACs at 256 px, 1000 classes. Parameters: timm's results-imagenet.csv
# (huggingface/pytorch-image-models@aa4b585 results/, param_count 1.27 / 2.32 / 5.58 for the cvnets_in1k ports of the
# official weights); MACs: counted on timm's port (timm==1.0.31 timm/models/mobilevit.py) at 256 px (timm's own
# benchmark-infer-*.csv, counted by its profiler, lists 0.42 / 1.05 / 2.03 GMACs). The ml-cvnets model zoo
# (apple/ml-cvnets@7771756 docs/source/en/general/README-model-zoo.md) rounds the parameters to 1.3 M / 2.3 M / 5.6 M.
_SOURCE = ("timm results-imagenet.csv param_count; MACs counted on timm's mobilevit.py at 256 px; ml-cvnets model "
           "zoo: {} params")
REFERENCES = {
    "mobilevit_xxs": Reference(1.27, 0.41, _SOURCE.format("1.3 M"), params_tol=0.006, macs_rtol=0.01),
    "mobilevit_xs": Reference(2.32, 1.03, _SOURCE.format("2.3 M"), params_tol=0.006, macs_rtol=0.01),
    "mobilevit_s": Reference(5.58, 2.00, _SOURCE.format("5.6 M"), params_tol=0.006, macs_rtol=0.01),
}


def tiny(name: str, cfg: dict) -> dict:
    """64 px (feature maps 32 → 2), narrow widths, one transformer layer per block: milliseconds."""
    return dict(img_size=64, stem_chs=8, widths=(8, 16, 16, 24, 24), transformer_dims=(16, 16, 24),
                transformer_depths=(1, 1, 1), num_heads=2, mv2_depths=(1, 2))


# ----------------------------------------------------------------------------------------------- named weights
# timm's Hub repositories (timm/<variant>.cvnets_in1k, model.safetensors), verified by huggingface_hub: the official
# ImageNet-1k weights ported by timm (timm's top-1 at 256 px, crop 0.9: 68.94 / 74.62 / 78.30, results-imagenet.csv).
# The official .pt files (docs-assets.developer.apple.com/ml-research/models/cvnets/classification/mobilevit_*.pt)
# carry no hash in their names and could not be downloaded here to compute one, so they are not in the catalog; load
# them by path.
_TIMM_TAG = "cvnets_in1k"
WEIGHTS: dict[str, WeightSpec] = {
    name: WeightSpec(url=f"hf-hub:timm/{name}.{_TIMM_TAG}", source_format="timm", filename="model.safetensors",
                     notes=f"timm port of the official ml-cvnets weights, tag {_TIMM_TAG}")
    for name in VARIANTS
}
