"""Constructor options of the official ViT, DeiT and BEiT code that no released classifier sets, each against a
reference made by running that code on seeded random weights (the README beside each data folder names repository,
commit and generator script):

| option | official code | reference (under tests/families/) |
| --- | --- | --- |
| add_position_embedding=False | vision_transformer@c6de1e5 vit_jax/models_vit.py | vit/data/jax/vit_jax_no_posemb.npz |
| classifier 'unpooled' / 'token_unpooled' | same | vit/data/jax/vit_jax_{,token_}unpooled.npz |
| head_bias_init | same (initialisation only) | vit/data/jax/reference_options.npz head_bias_init/* |
| resnet (R50+ViT-B/16, R+Ti/16), 2 sizes | same, + checkpoint.py load_pretrained | vit/data/jax/vit_jax_r{50,_stem}_shrunk.npz |
| the hybrids, timm's layout, 2 sizes | timm 1.0.31 vision_transformer_hybrid.py | vit/data/timm_vit_hybrid{,_stem}_shrunk |
| qk_scale (DeiT) | facebookresearch/deit@7e160fe models.py, timm 0.3.2 | deit/data/official_qk_scale |
| qk_scale, init_scale (BEiT) | microsoft/unilm@768a3c8 beit/modeling_finetune.py | beit/data/official_options |

Logits are compared at |out − ref| ≤ 1e-4 + 1e-4·|ref| (``golden_close``).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import vitkit
from vitkit.config import ConfigError

from conftest import golden_close, max_diff

DATA = Path(__file__).parent / "data"
JAX = DATA / "jax"
DEIT_DATA = Path(__file__).parents[1] / "deit" / "data"  # DeiT's and BEiT's cases of the options they share with ViT
BEIT_DATA = Path(__file__).parents[1] / "beit" / "data"
REF = dict(np.load(JAX / "reference_options.npz"))
HYBRID = "vit_base_r50_s16_224"
SMALL = dict(img_size=8)  # the small JAX cases: width 16, patch 4, 8 px (their hints give the rest)


def _ref(key: str) -> torch.Tensor:
    return torch.from_numpy(REF[key])


def _jax(name: str, model: str = "vit_tiny_patch16_224", **kw) -> torch.nn.Module:
    return vitkit.create_model(model, pretrained=str(JAX / f"{name}.npz"), **kw).eval()


def _run(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


# ------------------------------------------------------------------------------------ vit_jax models_vit.py options
def test_no_position_embedding_from_jax_and_through_a_vitkit_folder(tmp_path):
    model = _jax("vit_jax_no_posemb", **SMALL)
    assert model.cfg.add_position_embedding is False and model.pos_embed is None
    assert "pos_embed" not in model.state_dict() and model.position_embedding_grid() is None
    x = _ref("vit_jax_no_posemb/pixel_values")
    out = _run(model, x)
    assert golden_close(out, _ref("vit_jax_no_posemb/logits")), max_diff(out, _ref("vit_jax_no_posemb/logits"))
    vitkit.save_pretrained(model, tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["config"]["add_position_embedding"] is False
    back = vitkit.load_model(tmp_path / "saved")
    assert back.pos_embed is None and torch.equal(_run(back, x), out)
    from safetensors.torch import save_file
    save_file(model.state_dict(), str(tmp_path / "timm.safetensors"))  # timm's names (pos_embed='none': no key)
    timm = vitkit.create_model("vit_tiny_patch16_224", pretrained=str(tmp_path / "timm.safetensors"), embed_dim=16,
                               num_heads=2, depth=2, mlp_ratio=2.0, patch_size=4, img_size=8, act_layer="gelu_tanh")
    assert timm.load_report.format == "timm" and timm.pos_embed is None and torch.equal(_run(timm, x), out)


@pytest.mark.parametrize("name,class_token", [("vit_jax_unpooled", False), ("vit_jax_token_unpooled", True)])
def test_unpooled_classifiers_are_the_tokens_of_forward_features(name, class_token):
    """vit_jax's 'unpooled' / 'token_unpooled' apply the representation layer and head to every token of the encoded
    sequence: vitkit's forward_features, then pre_logits and head per token."""
    model = _jax(name, **SMALL)
    assert model.cfg.class_token is class_token
    with torch.no_grad():
        tokens = model.forward_features(_ref(f"{name}/pixel_values"))
        out = model.head(model.pre_logits(tokens))
    ref = _ref(f"{name}/logits")
    assert out.shape == ref.shape == (2, 4 + class_token, 5)
    assert golden_close(out, ref), max_diff(out, ref)


@pytest.mark.parametrize("option,value,match", [
    ("classifier", "unpooled", r"global_pool.*forward_features\(x\)"),
    ("encoder", "Encoder", r"a flax module class"),
    ("model_name", "R50+ViT-B_16", r"builds nothing"),
])
def test_vit_jax_arguments_vitkit_does_not_take_are_refused_with_the_reason(option, value, match):
    pattern = rf"^{option} \(an argument of the official vit constructor\): .*{match}"
    with pytest.raises(ConfigError, match=pattern) as err:
        vitkit.create_model("vit_tiny_patch16_224", **{option: value})
    assert "\n" not in str(err.value)


def test_head_bias_init_is_the_jax_initialiser(tmp_path):
    """model.init of vit_jax: head kernel zeros, bias head_bias_init; vitkit's init, reset_classifier and a head
    replaced for a new task at load (vit_jax load_pretrained takes it from init_params) do the same."""
    kw = dict(embed_dim=16, num_heads=2, depth=2, mlp_ratio=2.0, patch_size=4, img_size=8, num_classes=5)
    model = vitkit.create_model("vit_tiny_patch16_224", head_bias_init=0.25, **kw)
    assert torch.equal(model.head.weight.T, _ref("head_bias_init/kernel"))
    assert torch.equal(model.head.bias, _ref("head_bias_init/bias"))
    model.reset_classifier(3)
    assert torch.equal(model.head.bias, torch.full((3,), 0.25)) and not model.head.weight.any()
    fresh = _jax("vit_jax_linen", num_classes=7, head_bias_init=0.25, **SMALL)  # its 5-class head replaced
    assert torch.equal(fresh.head.bias, torch.full((7,), 0.25)) and not fresh.head.weight.any()
    assert vitkit.create_model("vit_tiny_patch16_224", **kw).head.bias.abs().max() == 0  # default 0


# ------------------------------------------------------------------------------------------------- the hybrids
@pytest.mark.parametrize("name", ["vit_jax_r50_shrunk", "vit_jax_r_stem_shrunk"])
def test_hybrid_from_vit_jax_at_its_size_and_resized_as_load_pretrained(name):
    """The ResNet root (and stages) of models_vit.py, and at 48 px the position embedding zoomed as
    checkpoint.load_pretrained does (interpolate_posembed)."""
    for size, suffix in ((32, ""), (48, "_48")):
        model = _jax(name, HYBRID, img_size=size)
        out = _run(model, _ref(f"{name}/pixel_values{suffix}"))
        ref = _ref(f"{name}/logits{suffix}")
        assert golden_close(out, ref), (size, max_diff(out, ref))
    assert model.cfg.resnet.gn_eps == 1e-6 and not model.cfg.resnet.ws_eps_in_sqrt  # vit_jax's numerics
    assert "interpolate_posembed" in model.load_report.resized[0]


def test_hybrid_groupnorm_of_old_release_files_loads(tmp_path):
    """Release files written by flax < 0.3.6 store GroupNorm scale and bias as (1, 1, 1, C) (vit_jax checkpoint.py
    _fix_groupnorm squeezes them)."""
    arrays = dict(np.load(JAX / "vit_jax_r50_shrunk.npz"))
    old = {k: v.reshape(1, 1, 1, -1) if "/gn" in f"/{k}" and k.endswith(("scale", "bias")) else v
           for k, v in arrays.items()}
    assert old["block1/unit1/gn1/scale"].shape == (1, 1, 1, 32)
    np.savez(tmp_path / "old.npz", **old)
    model = vitkit.create_model(HYBRID, pretrained=str(tmp_path / "old.npz"), img_size=32).eval()
    out = _run(model, _ref("vit_jax_r50_shrunk/pixel_values"))
    assert golden_close(out, _ref("vit_jax_r50_shrunk/logits"))


@pytest.mark.parametrize("case", ["timm_vit_hybrid_shrunk", "timm_vit_hybrid_stem_shrunk"])
def test_hybrid_from_timm_at_its_size_and_at_48(case):
    folder = DATA / case
    meta, io = json.loads((folder / "case.json").read_text()), load_file(folder / "io.safetensors")
    kw = {k: v for k, v in meta["kwargs"].items() if k not in ("img_size", "resnet", "patch_size")}  # from the file
    for size, suffix in ((32, ""), (48, "_48")):
        model = vitkit.create_model(meta["vitkit_model"], pretrained=str(folder / "model.safetensors"), img_size=size,
                                    **kw).eval()
        out = _run(model, io[f"pixel_values{suffix}"])
        assert golden_close(out, io[f"logits{suffix}"]), (size, max_diff(out, io[f"logits{suffix}"]))
    resnet = model.cfg.resnet
    assert list(resnet.num_layers) == meta["kwargs"]["resnet"]["num_layers"] and resnet.width_factor == 0.5
    assert (resnet.gn_eps, resnet.ws_eps, resnet.ws_eps_in_sqrt) == (1e-5, 1e-8, True)  # timm's port


def test_each_hybrid_port_is_reproduced_with_its_own_numerics():
    """vit_jax standardises w by (σ + 1e-5) and GroupNorm adds 1e-6, timm's port √(σ² + 1e-8) and 1e-5: the two differ
    by ~2e-5 in these logits, and each file is reproduced to ~2e-6 only with its own."""
    folder = DATA / "timm_vit_hybrid_shrunk"
    io = load_file(folder / "io.safetensors")
    shape = dict(embed_dim=48, depth=2, num_heads=3, img_size=32)
    jax_numerics = dict(num_layers=[1, 1], width_factor=0.5)
    timm_file = vitkit.create_model(HYBRID, pretrained=str(folder / "model.safetensors"), **shape).eval()
    as_jax = vitkit.create_model(HYBRID, pretrained=str(folder / "model.safetensors"), resnet=jax_numerics,
                                 **shape).eval()
    assert max_diff(_run(timm_file, io["pixel_values"]), io["logits"]) < 5e-6
    assert max_diff(_run(as_jax, io["pixel_values"]), io["logits"]) > 1e-5
    timm_numerics = dict(jax_numerics, gn_eps=1e-5, ws_eps=1e-8, ws_eps_in_sqrt=True)
    x, ref = _ref("vit_jax_r50_shrunk/pixel_values"), _ref("vit_jax_r50_shrunk/logits")
    assert max_diff(_run(_jax("vit_jax_r50_shrunk", HYBRID, img_size=32), x), ref) < 5e-6
    assert max_diff(_run(_jax("vit_jax_r50_shrunk", HYBRID, img_size=32, resnet=timm_numerics), x), ref) > 5e-6


def test_hybrid_keys_are_timms_and_round_trip_through_a_vitkit_folder(tmp_path):
    folder = DATA / "timm_vit_hybrid_shrunk"
    timm_keys = set(load_file(folder / "model.safetensors"))
    model = vitkit.create_model(HYBRID, pretrained=str(folder / "model.safetensors"), embed_dim=48, depth=2,
                                num_heads=3, img_size=32).eval()
    assert set(model.state_dict()) == timm_keys  # vitkit's hybrid uses timm's names
    assert model.patch_embedding_filters() is None  # its patches are feature-map cells, not image pixels
    vitkit.save_pretrained(model, tmp_path / "saved")
    back = vitkit.load_model(tmp_path / "saved")
    x = load_file(folder / "io.safetensors")["pixel_values"]
    assert back.cfg.resnet == model.cfg.resnet and torch.equal(_run(back, x), _run(model, x))


def test_hybrid_jax_file_names_its_variant():
    assert vitkit.registry.infer_variant(JAX / "vit_jax_r50_shrunk.npz") == (HYBRID, {"img_size": 32})


@pytest.mark.parametrize("scheme", ["bicubic", "bicubic_antialias", "bilinear"])
def test_hybrid_second_size_tells_the_resize_schemes_apart(scheme):
    model = _jax("vit_jax_r50_shrunk", HYBRID, img_size=48, pos_embed_resize=scheme)
    out = _run(model, _ref("vit_jax_r50_shrunk/pixel_values_48"))
    assert max_diff(out, _ref("vit_jax_r50_shrunk/logits_48")) > 1e-3


def test_hybrid_units_start_as_their_shortcut():
    """vit_jax models_resnet.py ResidualUnit: gn3 scale_init zeros (the other GroupNorms 1 and 0)."""
    backbone = vitkit.create_model(HYBRID, **vitkit.get_spec(HYBRID).tiny).patch_embed.backbone
    units = [blk for stage in backbone.stages for blk in stage.blocks]
    assert units and all(not u.norm3.weight.any() and u.norm1.weight.eq(1).all() for u in units)


def test_hybrid_configuration_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"resnet\.width_factor 0\.25.*multiple of 32"):
        vitkit.create_model(HYBRID, resnet={"width_factor": 0.25})
    with pytest.raises(ConfigError, match=r"unknown config key .*resnet\.units"):
        vitkit.create_model(HYBRID, resnet={"units": [1]})
    with pytest.raises(ConfigError, match=r"img_size 200 gives the ResNet a feature map of side 13"):
        vitkit.create_model(HYBRID, img_size=200, patch_size=2)


# ------------------------------------------------------------------------------------------------ DeiT and BEiT
@pytest.mark.parametrize("folder", [DEIT_DATA / "official_qk_scale", BEIT_DATA / "official_options"],
                         ids=["deit", "beit"])
def test_qk_scale_against_the_official_code(folder):
    """The scale is not stored in a checkpoint: the user gives it, as to the official constructor."""
    meta, io = json.loads((folder / "case.json").read_text()), load_file(folder / "io.safetensors")
    model = vitkit.create_model(meta["vitkit_model"], pretrained=str(folder / "checkpoint.pth"), num_classes=10,
                                **meta["kwargs"]).eval()
    assert all(blk.attn.scale == 0.3 for blk in model.blocks)
    out = _run(model, io["pixel_values"])
    assert golden_close(out, io["logits"]), max_diff(out, io["logits"])
    kwargs = {k: v for k, v in meta["kwargs"].items() if k != "qk_scale"}
    default = vitkit.create_model(meta["vitkit_model"], pretrained=str(folder / "checkpoint.pth"), num_classes=10,
                                  **kwargs).eval()
    assert golden_close(_run(default, io["pixel_values"]), io["logits_default_scale"])
    assert max_diff(_run(default, io["pixel_values"]), io["logits"]) > 1e-2  # the option matters


@pytest.mark.parametrize("init_scale,key", [(0.5, "0.5"), (0.001, "default")])
def test_beit_init_scale_draws_the_official_head(init_scale, key):
    """Initialisation is random, so the comparison is of distributions: trunc_normal(std=0.02) · init_scale, zero
    bias, as the official constructor's 200-class head."""
    io = load_file(BEIT_DATA / "official_options" / "io.safetensors")
    official = io[f"init_head_weight_{key}"]
    torch.manual_seed(7)
    head = vitkit.create_model("beit_base_patch16_224", embed_dim=48, depth=2, num_heads=3, img_size=48,
                               num_classes=200, init_scale=init_scale).head
    assert not head.bias.any() and not io[f"init_head_bias_{key}"].any()
    assert abs(head.weight.std().item() / official.std().item() - 1) < 0.1
    assert abs(official.std().item() / (0.02 * init_scale) - 1) < 0.1
    assert head.weight.abs().max() <= 5 * 0.02 * init_scale
    zero = vitkit.create_model("beit_base_patch16_224", embed_dim=48, depth=2, num_heads=3, img_size=48).head
    assert not zero.weight.any()  # init_scale=None: vitkit's zero head


# ------------------------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"])
def test_deit_hybrid_backbone_is_refused_pointing_to_the_resnet_hybrid(name):
    with pytest.raises(ConfigError, match=r"^hybrid_backbone \(an argument of the official deit constructor\): an "
                                          r"nn\.Module.*resnet=.*vit_base_r50_s16_224") as err:
        vitkit.create_model(name, hybrid_backbone="resnet50")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name,kwargs,match", [
    ("vit_tiny_patch16_224", dict(qk_scale=0.0), r"qk_scale must be positive"),
    ("beit_base_patch16_224", dict(add_position_embedding=False), r"use_abs_pos_emb"),
    ("beit_base_patch16_224", dict(resnet={"num_layers": [1]}), r"unknown argument resnet"),
    ("beit_base_patch16_224", dict(head_bias_init=0.5), r"init_scale"),
])
def test_values_the_config_does_not_build_are_errors(name, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        vitkit.create_model(name, **kwargs)


@pytest.mark.parametrize("name,kwargs", [("vit_tiny_patch16_224", dict(qk_scale=0.3)),
                                         ("vit_tiny_patch16_224", dict(add_position_embedding=False)),
                                         (HYBRID, dict(resnet={"num_layers": [1], "width_factor": 0.5}))])
def test_the_transformers_twin_refuses_what_transformers_vit_cannot_express(name, kwargs):
    pytest.importorskip("transformers")
    from vitkit.families.vit.formats import transformers_config
    model = vitkit.create_model(name, **{"img_size": 32, **kwargs})
    with pytest.raises(ValueError, match=f"cannot express {next(iter(kwargs))}="):
        transformers_config(model)


def test_a_plain_vit_takes_no_resnet_and_names_the_hybrids():
    with pytest.raises(ConfigError, match=r"^resnet \(an argument of the official vit constructor\): .*"
                                          r"vit_base_r50_s16_224"):
        vitkit.create_model("vit_tiny_patch16_224", resnet={"num_layers": [1]})
    with pytest.raises(vitkit.registry.CheckpointMismatchError, match=r"implies resnet=.*vit_base_r50_s16"):
        vitkit.create_model("vit_base_patch16_224", pretrained=str(JAX / "vit_jax_r50_shrunk.npz"), img_size=32)
