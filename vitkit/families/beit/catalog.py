"""The BEiT variants (microsoft/unilm ``beit/modeling_finetune.py``: base and large at 224, 384 and 512), their
evaluation preprocessing, the official fine-tuning's layer decay, named weights, published sizes and the tiny test
configuration."""
from __future__ import annotations

from vitkit.specs import INCEPTION_MEAN, INCEPTION_STD, PreprocessConfig, Reference, WeightSpec

# -------------------------------------------------------------------------------------------------- variants
# modeling_finetune.py: beit_{base,large}_patch16_{224,384,512}; layer-scale init per the fine-tuning flags of
# microsoft/unilm beit/README.md.
_SIZES = {"base": dict(embed_dim=768, depth=12, num_heads=12, init_values=0.1),
          "large": dict(embed_dim=1024, depth=24, num_heads=16, init_values=1e-5)}
VARIANTS = {f"beit_{size}_patch16_{res}": dict(**dims, patch_size=16, img_size=res)
            for size, dims in _SIZES.items() for res in ((224, 384) if size == "base" else (224, 384, 512))}

# Official evaluation (beit/datasets.py build_transform): mean = std = 0.5, bicubic resize to size / crop_pct then a
# centre crop, crop_pct = 224/256 below 384 px and 1.0 from 384 px.
DATA_CFGS = {name: PreprocessConfig(mean=INCEPTION_MEAN, std=INCEPTION_STD, interpolation="bicubic",
                                    crop_pct=0.875 if cfg["img_size"] < 384 else 1.0)
             for name, cfg in VARIANTS.items()}

# Layer-wise learning-rate decay of the official fine-tuning commands from the self-supervised checkpoints
# (microsoft/unilm beit/README.md, beit/get_started_for_image_classification.md): --layer_decay 0.65 (base), 0.75
# (large). The recipe layer picks these up for any recipe that does not set optim.layer_decay itself
# (vitkit.train.config.resolve).
TRAIN_DEFAULTS = {name: {"optim": {"layer_decay": 0.65 if cfg["embed_dim"] == 768 else 0.75}}
                  for name, cfg in VARIANTS.items()}


# ------------------------------------------------------------------------------------------- published sizes
def closed_form_size(cfg: dict, num_classes: int = 1000) -> Reference:
    """Parameters and forward MACs of a fine-tuning BEiT written out from the layer sizes, independent of the model
    code. A block has 12·D² + 14·D parameters (qkv kernel without bias, q and v biases, output projection, MLP, two
    LayerNorms, two layer-scale vectors) plus its ((2g−1)² + 3) × heads bias table for a g×g grid; over T = g² + 1
    tokens it costs 12·T·D² + 2·T²·D MACs like a ViT block (the bias is an addition). Reproduces the counts measured
    on the official model (microsoft/unilm@768a3c8 beit/modeling_finetune.py), BEiT-B 86.53 M / 17.56 G and BEiT-L
    304.43 M / 61.55 G at 224, and rounds to the parameter column of beit/README.md at 384 / 512 (87, 305, 306 M)."""
    D, depth, H, P, S = cfg["embed_dim"], cfg["depth"], cfg["num_heads"], cfg["patch_size"], cfg["img_size"]
    g = S // P
    T = g * g + 1
    table = ((2 * g - 1) ** 2 + 3) * H
    params = (3 * P * P * D + D) + D + depth * (12 * D * D + 14 * D + table) + 2 * D + D * num_classes + num_classes
    macs = g * g * 3 * P * P * D + depth * (12 * T * D * D + 2 * T * T * D) + D * num_classes
    return Reference(params / 1e6, macs / 1e9, "closed form of the official layer sizes (modeling_finetune.py); "
                     "= the official model's counts at 224", params_tol=1e-6, macs_rtol=1e-6)


REFERENCES = {name: closed_form_size(cfg) for name, cfg in VARIANTS.items()}


# ---------------------------------------------------------------------------------------------------- tests
def tiny(name: str, cfg: dict) -> dict:
    """2 blocks of width 48 on a 3x3 patch grid (the smallest grid whose table a cubic spline can resize)."""
    return dict(depth=2, embed_dim=48, num_heads=3, img_size=3 * cfg["patch_size"])


# ----------------------------------------------------------------------------------------------- named weights
# timm's Hub repositories (timm/<variant>.<tag>, model.safetensors; names from timm/models/beit.py default_cfgs),
# verified by huggingface_hub: the official pt22k_ft22kto1k releases (ImageNet-22k self-supervised pre-training,
# ImageNet-22k then ImageNet-1k fine-tuning). The official .pth files (github.com/addf400/files) carry no hash in
# their names, so vitkit cannot verify them and does not list them. Top-1 as timm measured it (results-imagenet.csv).
_TIMM_TOP1 = {"beit_base_patch16_224": 85.238, "beit_base_patch16_384": 86.814, "beit_large_patch16_224": 87.486,
              "beit_large_patch16_384": 88.380, "beit_large_patch16_512": 88.576}
WEIGHTS: dict[str, WeightSpec] = {
    name: WeightSpec(url=f"hf-hub:timm/{name}.in22k_ft_in22k_in1k", source_format="timm",
                     filename="model.safetensors",
                     notes=f"timm port of the official pt22k_ft22kto1k release, ImageNet-1k top-1 {top1}")
    for name, top1 in _TIMM_TOP1.items()}
