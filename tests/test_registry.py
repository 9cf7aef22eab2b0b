"""The registry: names, variant tables as data (checked against the names and the papers' size tables),
preprocessing specs, and registration errors."""
from __future__ import annotations

import re

import pytest
import torch

import vitkit
from vitkit.config import ConfigError
from vitkit.families.vit.model import VisionTransformer
from vitkit.families.contract import Family
from vitkit.registry import PreprocessConfig, register

# ViT paper Table 1 (B, L, H) and DeiT Table 1 / AugReg (Ti, S): width, depth, heads
SIZES = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16),
         "huge": (1280, 32, 16)}


def test_list_models_sorted_and_filtered():
    names = vitkit.list_models()
    assert names == sorted(names) and len(names) == len(set(names))
    vit, deit = vitkit.list_models("vit_*"), vitkit.list_models("deit_*")
    # 5 sizes x patches {8,14,16,32} x {224,384} where 384 % P == 0, and R50+ViT-B/16 at 224 and 384; DeiT 6+6
    assert len(vit) == 37 and len(deit) == 12
    assert set(vit) | set(deit) <= set(names)
    assert vitkit.list_models("deit*distilled*") == [n for n in deit if "distilled" in n]
    assert vitkit.list_models("nothing_like_this*") == []
    assert {"vit_base_patch16_224", "vit_huge_patch14_224", "vit_large_patch32_384", "deit_tiny_patch16_224",
            "deit_base_distilled_patch16_384"} <= set(names)
    assert "vit_base_patch14_384" not in names  # 384 is not a multiple of 14


HYBRIDS = vitkit.list_models("vit_*_r50_*")


@pytest.mark.parametrize("name", [n for n in vitkit.list_models("vit_*") if n not in HYBRIDS]
                         + vitkit.list_models("deit_*"))
def test_variant_table_agrees_with_its_name(name):
    m = re.fullmatch(r"(vit|deit)_(tiny|small|base|large|huge)(_distilled)?_patch(\d+)_(\d+)", name)
    assert m, f"{name} does not follow timm's naming"
    family, size, distilled, patch, res = m.groups()
    spec = vitkit.get_spec(name)
    cfg = spec.config
    assert spec.family == family
    assert (cfg["embed_dim"], cfg["depth"], cfg["num_heads"]) == SIZES[size]
    assert cfg["patch_size"] == int(patch) and cfg["img_size"] == int(res)
    assert cfg.get("mlp_ratio", 4.0) == 4.0
    assert (spec.model_cls.num_dist_tokens == 1) == bool(distilled)
    assert spec.data_cfg.input_size == (3, int(res), int(res))
    if family == "vit":  # Google's checkpoints: pixels in [-1, 1]; timm's crop 0.9 at 224, 1.0 at 384
        assert spec.data_cfg.mean == spec.data_cfg.std == (0.5, 0.5, 0.5)
        assert spec.data_cfg.crop_pct == (0.9 if res == "224" else 1.0)
    else:  # DeiT: ImageNet statistics, eval crop 0.875 (main.py --eval-crop-ratio)
        assert spec.data_cfg.mean == (0.485, 0.456, 0.406) and spec.data_cfg.std == (0.229, 0.224, 0.225)
        assert spec.data_cfg.crop_pct == (0.875 if res == "224" else 1.0)
    assert spec.data_cfg.interpolation == "bicubic" and spec.data_cfg.channel_order == "RGB"


@pytest.mark.parametrize("name", HYBRIDS)
def test_hybrid_table_agrees_with_its_name(name):
    """timm's names for R50+ViT-B/16: ViT-B on the 1/16 feature map ("s16") of ResNet-50's root and (3, 4, 9) units
    (vit_jax configs/models.py get_r50_b16_config), 1x1 patches; Google's preprocessing."""
    m = re.fullmatch(r"vit_base_r50_s16_(\d+)", name)
    assert m, f"{name} does not follow timm's naming"
    spec = vitkit.get_spec(name)
    cfg, res = spec.config, int(m[1])
    assert spec.family == "vit" and (cfg["embed_dim"], cfg["depth"], cfg["num_heads"]) == SIZES["base"]
    assert cfg["patch_size"] == 1 and cfg["img_size"] == res and tuple(cfg["resnet"]["num_layers"]) == (3, 4, 9)
    with torch.device("meta"):
        model = vitkit.create_model(name)
    assert model.patch_embed.backbone.stride * cfg["patch_size"] == 16
    assert spec.data_cfg.mean == spec.data_cfg.std == (0.5, 0.5, 0.5) and spec.data_cfg.input_size == (3, res, res)
    assert spec.data_cfg.crop_pct == (0.9 if res == 224 else 1.0)


def test_unknown_name_suggests_close_matches():
    with pytest.raises(ValueError, match="did you mean.*vit_base_patch16_224"):
        vitkit.get_spec("vit_base_patch16_244")
    with pytest.raises(ValueError, match="unknown model"):
        vitkit.create_model("resnet50")


def test_create_model_records_name_and_preprocessing():
    model = vitkit.create_model("deit_small_patch16_224", depth=1, img_size=(64, 48))
    assert model.variant_name == "deit_small_patch16_224"
    assert model.data_cfg.input_size == (3, 64, 48)
    assert model.data_cfg.mean == (0.485, 0.456, 0.406)
    assert model.load_report is None and model.class_names is None
    assert vitkit.get_spec("deit_small_patch16_224").data_cfg.input_size == (3, 224, 224)  # spec untouched
    assert PreprocessConfig().with_size(96).input_size == (3, 96, 96)


def test_num_classes_and_img_size_arguments():
    model = vitkit.create_model("vit_tiny_patch16_224", depth=1, num_classes=10, img_size=384)
    assert model.head.out_features == 10 and model.patch_embed.grid_size == (24, 24)
    assert model.cfg.num_classes == 10 and model.cfg.img_size == 384


def test_registration_rejects_duplicates_and_bad_tables():
    cfg = PreprocessConfig()
    with pytest.raises(ValueError, match="registered twice"):
        register(Family("zz", "ZZ", "", VisionTransformer, {"vit_tiny_patch16_224": dict(embed_dim=192)}, cfg))
    with pytest.raises(ConfigError, match="depth"):
        register(Family("zz", "ZZ", "", VisionTransformer, {"zz_broken_variant": dict(depth="12")}, cfg))
    assert "zz_broken_variant" not in vitkit.list_models()


@pytest.mark.parametrize("name, field, value, message", [
    ("vit_tiny_patch16_224", "drop_path_rate", 1.5, r"drop_path_rate must be in \[0, 1\), got 1.5"),
    ("swin_tiny_patch4_window7_224", "window_size", 0, "window_size must be positive, got 0"),
    ("cvt_13", "padding_kv", -1, "padding_kv must be >= 0, got -1"),
    ("mobilevit_xxs", "widths", (16, 24, 48, 64, -80), r"widths must be positive, got \[16, 24, 48, 64, -80\]"),
    ("cct_2_3x2_32", "mlp_ratio", 0.0, "mlp_ratio must be positive, got 0.0"),
    ("t2t_vit_7", "num_classes", -2, "num_classes must be >= 0, got -2"),
    ("dat_tiny", "attn_drop_rate", -0.1, r"attn_drop_rate must be in \[0, 1\), got -0.1"),
])
def test_out_of_range_values_are_named(name, field, value, message):
    """Every family's ranges go through one checker (config.check_ranges): the error names the field and the value."""
    with pytest.raises(vitkit.config.ConfigError, match=message):
        vitkit.create_model(name, **{field: value})
