"""The BEiT variants (microsoft/unilm ``beit/modeling_finetune.py``: base and large at 224, 384 and 512; and the
masked-image-modelling models of ``beit/modeling_pretrain.py``), their evaluation preprocessing, the official
fine-tuning's layer decay, named weights, published sizes and the tiny test configuration."""
from __future__ import annotations

from vitkit.specs import INCEPTION_MEAN, INCEPTION_STD, PreprocessConfig, Reference, WeightSpec

# -------------------------------------------------------------------------------------------------- variants
# modeling_finetune.py: beit_{base,large}_patch16_{224,384,512}; layer-scale init per the fine-tuning flags of
# microsoft/unilm beit/README.md.
_SIZES = {"base": dict(embed_dim=768, depth=12, num_heads=12, init_values=0.1),
          "large": dict(embed_dim=1024, depth=24, num_heads=16, init_values=1e-5)}
VARIANTS = {f"beit_{size}_patch16_{res}": dict(**dims, patch_size=16, img_size=res)
            for size, dims in _SIZES.items() for res in ((224, 384) if size == "base" else (224, 384, 512))}
# modeling_pretrain.py: beit_{base,large}_patch16_224_8k_vocab, the models of the released self-supervised checkpoints
# beit_{base,large}_patch16_224_pt22k.pth (transformers: microsoft/beit-{base,large}-patch16-224-pt22k), built as
# run_beit_pretraining.py builds them by default: one relative-position table shared by all blocks, no absolute
# position embedding, layer scale 0.1 (base) / 1e-5 (large) (README: --layer_scale_init_value), the DALL-E
# tokenizer's 8192 visual tokens. No classifier; the final norm reads every token (pooling: the class token).
PRETRAINING = {f"beit_{size}_patch16_224_8k_vocab": dict(**dims, patch_size=16, img_size=224, mim_vocab_size=8192,
                                                         use_rel_pos_bias=False, use_shared_rel_pos_bias=True,
                                                         num_classes=0, global_pool="token")
               for size, dims in _SIZES.items()}
VARIANTS.update(PRETRAINING)

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
                  for name, cfg in VARIANTS.items() if name not in PRETRAINING}


# ------------------------------------------------------------------------------------------- published sizes
def closed_form_size(cfg: dict, num_classes: int = 1000) -> Reference:
    """Parameters and forward MACs of a BEiT written out from the layer sizes, independent of the model code. A block
    has 12·D² + 14·D parameters (qkv kernel without bias, q and v biases, output projection, MLP, two LayerNorms, two
    layer-scale vectors) plus its ((2g−1)² + 3) × heads bias table for a g×g grid (one such table for all blocks
    in the pre-training model); over T = g² + 1 tokens it costs 12·T·D² + 2·T²·D MACs like a ViT block (the bias is
    an addition). The pre-training model adds a mask token and lm_head (D·V + V) and has no classifier; its ``forward``
    stops at the encoder (lm_head runs on the masked tokens only, in ``masked_token_logits``). Reproduces the counts
    measured on the official models (microsoft/unilm@768a3c8 beit/modeling_finetune.py, modeling_pretrain.py): BEiT-B
    86.53 M / 17.56 G and BEiT-L 304.43 M / 61.55 G at 224, the pre-training models' 91,965,776 and 311,534,016
    parameters (``beit_{base,large}_patch16_224_8k_vocab`` built as run_beit_pretraining.py does), and rounds to the
    parameter column of beit/README.md at 384 / 512 (87, 305, 306 M)."""
    D, depth, H, P, S = cfg["embed_dim"], cfg["depth"], cfg["num_heads"], cfg["patch_size"], cfg["img_size"]
    vocab = cfg.get("mim_vocab_size", 0)
    num_classes = cfg.get("num_classes", num_classes)
    g = S // P
    T = g * g + 1
    table = ((2 * g - 1) ** 2 + 3) * H
    tables = table if cfg.get("use_shared_rel_pos_bias") else 0
    tables += depth * table if cfg.get("use_rel_pos_bias", True) else 0
    params = (3 * P * P * D + D) + D + depth * (12 * D * D + 14 * D) + tables + 2 * D + D * num_classes + num_classes
    params += (D + D * vocab + vocab) if vocab else 0
    macs = g * g * 3 * P * P * D + depth * (12 * T * D * D + 2 * T * T * D) + D * num_classes
    which = "modeling_pretrain.py" if vocab else "modeling_finetune.py"
    return Reference(params / 1e6, macs / 1e9, f"closed form of the official layer sizes ({which}); "
                     "= the official model's counts at 224", params_tol=1e-6, macs_rtol=1e-6)


REFERENCES = {name: closed_form_size(cfg) for name, cfg in VARIANTS.items()}


# ---------------------------------------------------------------------------------------------------- tests
def tiny(name: str, cfg: dict) -> dict:
    """2 blocks of width 48 on a 3x3 patch grid (the smallest grid whose table a cubic spline can resize); a
    64-token vocabulary for a masked-image-modelling head."""
    vocab = dict(mim_vocab_size=64) if cfg.get("mim_vocab_size") else {}
    return dict(depth=2, embed_dim=48, num_heads=3, img_size=3 * cfg["patch_size"], **vocab)


# ----------------------------------------------------------------------------------------------- named weights
# timm's Hub repositories (timm/<variant>.<tag>, model.safetensors; names from timm/models/beit.py default_cfgs),
# verified by huggingface_hub: the official pt22k_ft22kto1k releases (ImageNet-22k self-supervised pre-training,
# ImageNet-22k then ImageNet-1k fine-tuning). The official .pth files (github.com/addf400/files) carry no hash in
# their names, so vitkit cannot verify them and does not list them. Top-1 as timm measured it (results-imagenet.csv).
_TIMM_TOP1 = {"beit_base_patch16_224": 85.238, "beit_base_patch16_384": 86.814, "beit_large_patch16_224": 87.486,
              "beit_large_patch16_384": 88.380, "beit_large_patch16_512": 88.576}
# The pre-training variants have none: the official *_pt22k.pth files carry no hash, and timm does not port them.
WEIGHTS: dict[str, WeightSpec] = {
    name: WeightSpec(url=f"hf-hub:timm/{name}.in22k_ft_in22k_in1k", source_format="timm",
                     filename="model.safetensors",
                     notes=f"timm port of the official pt22k_ft22kto1k release, ImageNet-1k top-1 {top1}")
    for name, top1 in _TIMM_TOP1.items()}
