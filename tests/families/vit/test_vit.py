"""ViT models: every registered plain variant builds, runs forward and backward (tiny overrides), has the parameter
count of the paper (full size, on the meta device), and the model interface behaves as documented. DeiT's models
(tests/families/deit/test_deit.py) are checked with the helpers here; the hybrids and the official options are in
test_vit_options.py."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import vitkit
from vitkit.layers import resample_pos_embed

from conftest import randomize_, tiny_overrides

HYBRIDS = vitkit.list_models("vit_*_r50_*")  # the ResNet hybrids: sizes in test_contract, the rest test_vit_options
VIT = [n for n in vitkit.list_models("vit_*") if n not in HYBRIDS]


def _tiny(name="vit_tiny_patch16_224", **extra):
    return randomize_(vitkit.create_model(name, **tiny_overrides(name, **extra)))


# --------------------------------------------------------------------------------------- every variant, tiny size
def check_forward_backward_tiny(name: str) -> None:
    """Forward and backward of ``name`` at its tiny size: 7-class logits, a finite gradient for every parameter
    (reaching the patch and position embeddings), deterministic in eval mode."""
    model = _tiny(name, num_classes=7)
    size = model.patch_embed.img_size
    x = torch.randn(2, 3, *size)
    model.train()
    logits = model(x)
    assert isinstance(logits, torch.Tensor) and logits.shape == (2, 7)
    logits.pow(2).sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{pname} got no gradient"
        assert torch.isfinite(p.grad).all(), pname
    assert model.patch_embed.proj.weight.grad.abs().sum() > 0  # gradients reach the input end
    assert model.pos_embed.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


@pytest.mark.parametrize("name", VIT)
def test_variant_forward_backward_tiny(name):
    check_forward_backward_tiny(name)


# ------------------------------------------------------------------------------------- parameter counts (meta device)
def expected_params(cfg: dict, distilled: bool, num_classes: int = 1000) -> int:
    """Parameter count written out from the architecture (ViT paper eq. 1-4, timm's layout)."""
    D, L, P = cfg["embed_dim"], cfg["depth"], cfg["patch_size"]
    hidden = 4 * D
    n_patches = (cfg["img_size"] // P) ** 2
    prefix = 2 if distilled else 1
    block = 2 * (2 * D) + (3 * D * D + 3 * D) + (D * D + D) + (D * hidden + hidden) + (hidden * D + D)
    embed = 3 * P * P * D + D + prefix * D + (n_patches + prefix) * D
    heads = (2 if distilled else 1) * (D * num_classes + num_classes) if num_classes else 0
    return embed + L * block + 2 * D + heads


def count_on_meta(name: str, **kw) -> tuple[int, nn.Module]:
    with torch.device("meta"):
        model = vitkit.create_model(name, **kw)
    assert all(p.device.type == "meta" for p in model.parameters()), "parameters were allocated for real"
    return sum(p.numel() for p in model.parameters()), model


@pytest.mark.parametrize("name", VIT)
def test_full_size_parameter_count_on_meta_device(name):
    count, _ = count_on_meta(name)
    assert count == expected_params(vitkit.get_spec(name).config, distilled=False)


# (millions, 2 decimals). Paper: ViT Table 1 (B 86M, L 307M, H 632M); the two decimals are timm's VisionTransformer
# counted (1000-class head unless num_classes says otherwise).
PUBLISHED = [
    ("vit_tiny_patch16_224", {}, 5.72),  # ViT-Ti/16 5.7 M (DeiT-Ti)
    ("vit_small_patch16_224", {}, 22.05),
    ("vit_small_patch32_224", {}, 22.88),
    ("vit_base_patch16_224", {}, 86.57),  # ViT-B/16 86 M (paper), 86.6 M
    ("vit_base_patch32_224", {}, 88.22),
    ("vit_large_patch16_224", {}, 304.33),  # ViT-L/16 304.3 M (paper rounds to 307 M)
    # L/32 and H/14 as timm's in21k configs build them, without a head:
    ("vit_large_patch32_224", {"num_classes": 0}, 305.51),
    ("vit_huge_patch14_224", {"num_classes": 0}, 630.76),  # ViT-H/14 630.8 M
    ("vit_huge_patch14_224", {}, 632.05),  # with a 1000-class head: the paper's 632 M
]


@pytest.mark.parametrize("name,kw,millions", PUBLISHED, ids=[f"{n}{'-headless' if k else ''}" for n, k, _ in PUBLISHED])
def test_parameter_count_matches_published(name, kw, millions):
    count, _ = count_on_meta(name, **kw)
    assert round(count / 1e6, 2) == millions


def test_meta_model_can_be_materialised():
    with torch.device("meta"):
        model = vitkit.create_model("vit_tiny_patch16_224", depth=1, embed_dim=48, num_heads=3, img_size=32)
    model = model.to_empty(device="cpu")
    randomize_(model)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 1000)


# ---------------------------------------------------------------------------------------------- model interface
def test_forward_features_and_head_shapes():
    model = _tiny(num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    feats = model.forward_features(x)
    assert feats.shape == (2, 1 + 4, 48)
    pre = model.forward_head(feats, pre_logits=True)
    assert pre.shape == (2, 48)
    torch.testing.assert_close(pre, feats[:, 0])  # class token of the normed sequence (eq. 4)
    torch.testing.assert_close(model.forward_head(feats), pre @ model.head.weight.T + model.head.bias)
    torch.testing.assert_close(model(x), model.forward_head(feats))
    # the final LayerNorm (eq. 4) is applied over all tokens
    tokens = model.blocks(model.embed(x))
    torch.testing.assert_close(feats, nn.functional.layer_norm(tokens, (48,), model.norm.weight, model.norm.bias,
                                                               eps=1e-6))


def check_reset_classifier_gives_zero_head(name: str) -> None:
    model = _tiny(name, num_classes=5).eval()
    model.reset_classifier(11)
    heads = [model.head] + ([model.head_dist] if hasattr(model, "head_dist") else [])
    for head in heads:
        assert isinstance(head, nn.Linear) and head.out_features == 11 and head.in_features == 48
        assert not head.weight.any() and not head.bias.any()
    assert model.num_classes == 11 and model.cfg.num_classes == 11
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(x), torch.zeros(2, 11))
    model.reset_classifier(0)
    feats = model.forward_features(x)
    torch.testing.assert_close(model(x), model.forward_head(feats, pre_logits=True))
    assert model(x).shape == (2, 48)


def test_reset_classifier_gives_zero_head():
    check_reset_classifier_gives_zero_head("vit_tiny_patch16_224")


def test_no_weight_decay_names_the_tokens_and_position_embedding():
    vit = _tiny()
    vit_params = dict(vit.named_parameters())
    assert {"pos_embed", "cls_token"} <= vit.no_weight_decay()
    assert {n for n in vit.no_weight_decay() if n in vit_params} == {"pos_embed", "cls_token"}


def check_forward_intermediates_match_block_hooks(name: str, img: tuple[int, int]) -> None:
    model = _tiny(name, depth=3, img_size=img).eval()
    outputs = {}
    for i, blk in enumerate(model.blocks):
        blk.register_forward_hook(lambda m, inp, out, i=i: outputs.__setitem__(i, out))
    x = torch.randn(2, 3, *img)
    with torch.no_grad():
        model(x)
        last2 = model.forward_intermediates(x, indices=2)
        chosen = model.forward_intermediates(x, indices=[0, -1], norm=True)
        maps = model.forward_intermediates(x, indices=[1], reshape=True)
    prefix = model.num_prefix_tokens
    torch.testing.assert_close(last2[0], outputs[1])
    torch.testing.assert_close(last2[1], outputs[2])
    torch.testing.assert_close(chosen[0], model.norm(outputs[0]))
    torch.testing.assert_close(chosen[1], model.norm(outputs[2]))
    h, w = img[0] // 16, img[1] // 16
    (fmap,) = maps
    assert fmap.shape == (2, 48, h, w)
    for r in range(h):
        for c in range(w):  # patch tokens are in row-major order after the prefix tokens
            torch.testing.assert_close(fmap[:, :, r, c], outputs[1][:, prefix + r * w + c])


def test_forward_intermediates_match_block_hooks():
    check_forward_intermediates_match_block_hooks("vit_tiny_patch16_224", (32, 48))


@pytest.mark.parametrize("indices", [[5], 5, 0], ids=["index-5-of-3", "last-5-of-3", "zero"])
def test_forward_intermediates_rejects_out_of_range_indices(indices):
    model = _tiny(depth=3).eval()
    with pytest.raises(ValueError):
        model.forward_intermediates(torch.randn(1, 3, 32, 32), indices=indices)


def test_class_token_vs_global_average_pooling():
    x = torch.randn(2, 3, 32, 32)
    tok = _tiny().eval()
    feats = tok.forward_features(x)
    torch.testing.assert_close(tok.forward_head(feats, pre_logits=True), feats[:, 0])

    avg = _tiny(global_pool="avg").eval()
    assert isinstance(avg.norm, nn.Identity) and isinstance(avg.fc_norm, nn.LayerNorm)  # fc_norm defaults on for avg
    feats = avg.forward_features(x)
    ref = avg.fc_norm(feats[:, 1:].mean(dim=1))  # mean of the patch tokens, class token excluded
    torch.testing.assert_close(avg.forward_head(feats, pre_logits=True), ref)
    assert not torch.allclose(tok(x), avg(x))

    gap = _tiny(global_pool="avg", class_token=False, fc_norm=False).eval()  # the paper's GAP variant (App. D.3)
    assert gap.num_prefix_tokens == 0 and gap.pos_embed.shape == (1, 4, 48)
    feats = gap.forward_features(x)
    assert feats.shape == (2, 4, 48)
    torch.testing.assert_close(gap.forward_head(feats, pre_logits=True), feats.mean(dim=1))


def test_representation_size_pre_logits_layer():
    model = _tiny(representation_size=20, num_classes=5).eval()
    assert model.head.in_features == 20 and model.num_features == 20
    x = torch.randn(2, 3, 32, 32)
    feats = model.forward_features(x)
    pre = model.forward_head(feats, pre_logits=True)
    ref = torch.tanh(feats[:, 0] @ model.pre_logits.fc.weight.T + model.pre_logits.fc.bias)
    torch.testing.assert_close(pre, ref)
    assert pre.abs().max() < 1
    torch.testing.assert_close(model(x), ref @ model.head.weight.T + model.head.bias)


def _zero_fraction(t: torch.Tensor) -> float:
    return (t == 0).float().mean().item()


def test_dropout_placement():
    x = torch.randn(2, 3, 32, 32)
    plain = _tiny(depth=2).train()
    assert torch.equal(plain(x), plain(x)), "without dropout, train mode is deterministic"

    pos = _tiny(depth=2, pos_drop_rate=0.5).train()
    assert not torch.equal(pos(x), pos(x))
    assert 0.35 < _zero_fraction(pos.embed(x)) < 0.65  # dropout right after adding the position embedding
    pos.eval()
    assert _zero_fraction(pos.embed(x)) == 0
    assert torch.equal(pos(x), pos(x))

    proj = _tiny(depth=2, proj_drop_rate=0.5).train()
    seen = {}
    proj.blocks[0].attn.register_forward_hook(lambda m, i, o: seen.__setitem__("attn", o))
    proj.blocks[0].mlp.register_forward_hook(lambda m, i, o: seen.__setitem__("mlp", o))
    out1, out2 = proj(x), proj(x)
    assert not torch.equal(out1, out2)
    # after every dense layer except qkv: the attention output projection and the MLP output are dropped
    assert 0.35 < _zero_fraction(seen["attn"]) < 0.65
    assert 0.35 < _zero_fraction(seen["mlp"]) < 0.65
    assert _zero_fraction(proj.embed(x)) == 0  # pos_drop_rate stays 0
    proj.eval()
    assert torch.equal(proj(x), proj(x))
    assert _zero_fraction(proj.blocks[0].attn(proj.embed(x))) == 0

    attn = _tiny(depth=2, attn_drop_rate=0.5).train()
    assert not torch.equal(attn(x), attn(x))
    attn.eval()
    assert torch.equal(attn(x), attn(x))


def check_dynamic_img_size_equals_model_built_at_that_size(name: str) -> None:
    dyn = _tiny(name, dynamic_img_size=True, num_classes=5).eval()
    assert dyn.accepts_any_size and not _tiny(name).accepts_any_size
    x = torch.randn(2, 3, 48, 64)  # 3x4 patches instead of the 2x2 the model was built for
    fixed = vitkit.create_model(name, **tiny_overrides(name, img_size=(48, 64), num_classes=5)).eval()
    state = dyn.state_dict()
    state["pos_embed"] = resample_pos_embed(state["pos_embed"], (3, 4), (2, 2), dyn.num_prefix_tokens)
    fixed.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(dyn(x), fixed(x), atol=1e-5, rtol=0)
        small = torch.randn(2, 3, 32, 32)  # at the built size nothing is resampled
        static = vitkit.create_model(name, **tiny_overrides(name, num_classes=5)).eval()
        static.load_state_dict(dyn.state_dict())
        torch.testing.assert_close(dyn(small), static(small), atol=0, rtol=0)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        dyn(torch.randn(1, 3, 40, 32))


def test_dynamic_img_size_equals_model_built_at_that_size():
    check_dynamic_img_size_equals_model_built_at_that_size("vit_tiny_patch16_224")


def test_non_square_image_size():
    model = _tiny(img_size=(224, 160), num_classes=3).eval()
    assert model.patch_embed.grid_size == (14, 10)
    assert model.pos_embed.shape == (1, 1 + 140, 48)
    assert model.data_cfg.input_size == (3, 224, 160)
    x = torch.randn(1, 3, 224, 160)
    assert model(x).shape == (1, 3)
    (fmap,) = model.forward_intermediates(x, indices=1, reshape=True)
    assert fmap.shape == (1, 48, 14, 10)
    with pytest.raises(ValueError, match="224x160"):
        model(torch.randn(1, 3, 160, 224))


def test_init_follows_the_paper():
    """Zero class token and zero head kernel (JAX initialisers), trunc-normal(0.02) position embedding."""
    model = vitkit.create_model("vit_small_patch16_224", depth=1)
    assert not model.cls_token.any()
    assert not model.head.weight.any() and not model.head.bias.any()
    std = model.pos_embed.std().item()
    assert 0.015 < std < 0.025  # torch and timm truncate at ±2 absolute, i.e. effectively not at all
    w = model.blocks[0].mlp.fc1.weight
    assert 0.015 < w.std().item() < 0.025 and not model.blocks[0].mlp.fc1.bias.any()


def test_layer_ids_for_layer_decay():
    model = _tiny(depth=3)
    assert model.num_layer_ids == 5
    ids = {n: model.layer_id(n) for n, _ in model.named_parameters()}
    assert ids["cls_token"] == ids["pos_embed"] == ids["patch_embed.proj.weight"] == 0
    assert ids["blocks.0.attn.qkv.weight"] == 1 and ids["blocks.2.mlp.fc2.bias"] == 3
    assert ids["norm.weight"] == ids["head.weight"] == 4
