"""BEiT's masked-image-modelling model (BEiT §2.3; microsoft/unilm ``beit/modeling_pretrain.py``@768a3c8,
``VisionTransformerForMaskedImageModeling``) against the official code's own logits (``data/official_mim_shrunk``,
made by ``data/make_mim_case.py``: the released pt22k and pt1k configurations on seeded random weights, masks from
the official blockwise ``MaskingGenerator``), against transformers' ``BeitForMaskedImageModeling`` on random weights
(4.x and 5.x layouts, and the twin), and the pre-training checkpoint loaded into a classification model as
``run_class_finetuning.py`` loads it."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import vitkit
from vitkit.config import ConfigError
from vitkit.families.beit.formats import to_transformers, to_transformers_mim
from vitkit.weights import CheckpointError, CheckpointMismatchError

from conftest import max_diff, randomize_

DATA = Path(__file__).parent / "data" / "official_mim_shrunk"
MIM = "beit_base_patch16_224_8k_vocab"
DIMS = dict(embed_dim=48, depth=2, num_heads=3, img_size=64)  # the shape of the official case (4x4 patch grid)
SHRUNK = dict(DIMS, mim_vocab_size=64)
IO = load_file(str(DATA / "io.safetensors"))
X, MASK = IO["pixel_values"].float(), IO["bool_masked_pos"]


def _mim(model, x=X, mask=MASK):
    with torch.no_grad():
        return model.eval().masked_token_logits(x, mask)


# ============================================================================================== the official code
@pytest.mark.parametrize("case", ["pt22k", "pt1k"])
def test_official_masked_token_logits(case):
    """``model(x, bool_masked_pos, return_all_tokens=False)`` of the official model = ``masked_token_logits``, for the
    released pre-training configuration (shared table, layer scale 0.1) and the pt1k_800ep one (absolute embedding,
    no table, no layer scale: taken from the checkpoint's tensors)."""
    model = vitkit.create_model(MIM, pretrained=str(DATA / f"{case}.pth"), **SHRUNK)
    ref = IO[f"{case}_logits"]
    assert ref.shape == (int(MASK.sum()), 64) and ref.std() > 0.5 and MASK.any(1).all() and not MASK.all()
    assert max_diff(_mim(model), ref) <= 1e-4
    report = model.load_report
    assert report.format == "official" and not report.reinitialized and not report.ignored
    if case == "pt22k":
        assert model.rel_pos_bias is not None and all(blk.attn.rel_pos is None for blk in model.blocks)
        assert "1 computed buffer(s) in the checkpoint checked equal to vitkit's" in report.notes
    else:
        for hint in ("use_abs_pos_emb=True", "use_rel_pos_bias=False", "use_shared_rel_pos_bias=False",
                     "init_values=None"):
            assert f"config {hint} taken from the checkpoint" in report.notes


def test_a_masked_patch_is_the_mask_token_whatever_its_pixels():
    """x·(1 − w) + mask_token·w: new pixels in a masked patch change nothing, in an unmasked one they do."""
    model = vitkit.create_model(MIM, pretrained=str(DATA / "pt22k.pth"), **SHRUNK)
    masked, kept = int(MASK[0].nonzero()[0]), int((~MASK[0]).nonzero()[0])
    ref = _mim(model)
    for index, changes in ((masked, False), (kept, True)):
        r, c = divmod(index, 4)
        y = X.clone()
        y[0, :, 16 * r:16 * r + 16, 16 * c:16 * c + 16] += 1.0
        assert torch.equal(_mim(model, y), ref) != changes


def test_bad_mask_is_a_value_error():
    model = vitkit.create_model(MIM, **SHRUNK)
    for bad in (MASK.float(), MASK[:, :8], MASK[0]):
        with pytest.raises(ValueError, match=r"mask must be a \(B, N\) = \(2, 16\) bool tensor over the 4x4"):
            model.masked_token_logits(X, bad)


# ====================================================================== pre-training checkpoint → classification
def test_pretraining_checkpoint_into_a_classification_model():
    """run_class_finetuning.py: mask_token and lm_head unused, the shared table copied into every block, each noted;
    the encoder then computes what the pre-training model's does."""
    cls = vitkit.create_model("beit_base_patch16_224", pretrained=str(DATA / "pt22k.pth"), num_classes=10, **DIMS)
    mim = vitkit.create_model(MIM, pretrained=str(DATA / "pt22k.pth"), **SHRUNK)
    report = cls.load_report
    ignored = " ".join(report.ignored)
    assert "mask_token" in ignored and "lm_head.weight" in ignored and "lm_head.bias" in ignored
    assert any("copied into each of the 2 blocks' tables" in n and "run_class_finetuning.py" in n
               for n in report.notes)
    shared = mim.rel_pos_bias.relative_position_bias_table
    assert all(torch.equal(blk.attn.rel_pos.relative_position_bias_table, shared) for blk in cls.blocks)
    assert cls.lm_head is None and cls.mask_token is None and cls.mim_vocab_size == 0
    with torch.no_grad():
        for a, b in zip(cls.eval().forward_intermediates(X), mim.eval().forward_intermediates(X)):
            assert max_diff(a, b) <= 1e-5
    with pytest.raises(ValueError, match="no masked-image-modelling head"):
        cls.masked_token_logits(X, MASK)


def test_another_vocabulary_is_refused_naming_the_setting():
    with pytest.raises(CheckpointMismatchError, match=r"predicts 64 visual tokens, the model 8192: build it with "
                                                      r"mim_vocab_size=64"):
        vitkit.create_model(MIM, pretrained=str(DATA / "pt22k.pth"), **DIMS)


def test_checkpoint_without_the_mim_parts_keeps_their_initialisation(tmp_path):
    """A checkpoint with no mask token or lm_head (here a vitkit classification folder of the pre-training layout):
    the encoder loads, the MIM parts keep the pre-training initialisation, and the report says so."""
    trunk = randomize_(vitkit.create_model("beit_base_patch16_224", use_rel_pos_bias=False,
                                           use_shared_rel_pos_bias=True, global_pool="token", num_classes=0, **DIMS))
    vitkit.save_pretrained(trunk, tmp_path / "trunk")
    model = vitkit.create_model(MIM, pretrained=str(tmp_path / "trunk"), mim_vocab_size=64)
    assert any(r.startswith("mask_token, lm_head.weight, lm_head.bias: absent from the checkpoint")
               for r in model.load_report.reinitialized)
    assert torch.equal(model.blocks[1].mlp.fc2.weight, trunk.blocks[1].mlp.fc2.weight)
    assert model.lm_head.weight.abs().max() <= 0.02 and not model.lm_head.bias.any()


# =================================================================================================== transformers
HF_KW = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=192, image_size=64,
             patch_size=16, vocab_size=64, layer_norm_eps=1e-6, hidden_dropout_prob=0.0, drop_path_rate=0.0,
             use_mask_token=True)
HF_CASES = {  # transformers' convert_beit_unilm_to_pytorch.py: pt22k = shared table + mask token; and pt1k's layout
    "pt22k": dict(use_shared_relative_position_bias=True, use_relative_position_bias=False,
                  layer_scale_init_value=0.1),
    "pt1k": dict(use_shared_relative_position_bias=False, use_relative_position_bias=False,
                 use_absolute_position_embeddings=True, layer_scale_init_value=0.0),
}


def _hf_mim(**kw):
    transformers = pytest.importorskip("transformers")
    hf = transformers.BeitForMaskedImageModeling(transformers.BeitConfig(**{**HF_KW, **kw}))
    return randomize_(hf, seed=13).eval()


def _hf_logits(hf, x=X, mask=MASK):
    with torch.no_grad():
        return hf(pixel_values=x, bool_masked_pos=mask).logits[mask]


@pytest.mark.parametrize("layout", ["4.x", "5.x"])
@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_transformers_masked_image_modeling_parity(tmp_path, case, layout):
    hf = _hf_mim(**HF_CASES[case])
    folder = tmp_path / "hf"
    if layout == "4.x":
        hf.save_pretrained(folder)
        saved = load_file(str(folder / "model.safetensors"))
        assert "beit.embeddings.mask_token" in saved and "layernorm.weight" in saved and "lm_head.weight" in saved
    else:  # a live 5.x state_dict (beit.layers.i, q/k/v/o_proj, shared_position_bias) beside its config.json
        state = {k: v.contiguous() for k, v in hf.state_dict().items()}
        assert "beit.layers.0.attention.q_proj.bias" in state
        folder.mkdir()
        save_file(state, str(folder / "model.safetensors"))
        hf.config.to_json_file(str(folder / "config.json"))
    model = vitkit.create_model(MIM, pretrained=str(folder), img_size=64, mim_vocab_size=64)
    ref = _hf_logits(hf)
    assert ref.shape == (int(MASK.sum()), 64) and ref.std() > 0.1
    assert max_diff(_mim(model), ref) <= 1e-4
    assert not model.load_report.reinitialized and not model.load_report.ignored


def test_transformers_double_norm_is_refused(tmp_path):
    """use_mean_pooling=False gives BeitForMaskedImageModeling two final LayerNorms (the trunk's and its own), which
    would both be read as the one norm: refused, not silently merged."""
    _hf_mim(**HF_CASES["pt22k"], use_mean_pooling=False).save_pretrained(tmp_path / "hf")
    with pytest.raises(CheckpointError, match="norms the tokens twice"):
        vitkit.create_model(MIM, pretrained=str(tmp_path / "hf"), img_size=64, mim_vocab_size=64)


def test_transformers_twins_and_folder_inference(tmp_path):
    """vitkit → BeitForMaskedImageModeling computes the same masked logits; the classification twin of a MIM model
    the same ``forward``; a BeitForMaskedImageModeling folder names the pre-training variant and its vocabulary."""
    model = randomize_(vitkit.create_model(MIM, **SHRUNK)).eval()
    hf = to_transformers_mim(model)
    assert max_diff(_hf_logits(hf), _mim(model)) <= 1e-4
    twin = to_transformers(model)
    with torch.no_grad():
        ours, theirs = model(X), twin(pixel_values=X).logits
    assert ours.std() > 0.1 and max_diff(ours, theirs) <= 1e-4
    hf.save_pretrained(tmp_path / "hf")
    name, overrides = vitkit.registry.infer_variant(tmp_path / "hf")
    assert (name, overrides) == (MIM, {"img_size": (64, 64), "mim_vocab_size": 64})


# =========================================================================================== model and training
def test_pretraining_initialisation():
    """modeling_pretrain.py draws every kernel, the tokens and lm_head from trunc_normal_(std=0.02, a=-0.02, b=0.02):
    normal truncated at ±1σ, whose std is σ·√(1 − 2φ(1) / (2Φ(1) − 1)) ≈ 0.54 σ; biases 0, layer scale 0.1, the shared
    table 0, and fix_init_weight divides block l's proj and fc2 by √(2l)."""
    model = vitkit.create_model(MIM, **DIMS)  # an 8192-token lm_head: 393,216 draws
    phi, Phi = math.exp(-0.5) / math.sqrt(2 * math.pi), 0.5 * (1 + math.erf(1 / math.sqrt(2)))
    expected = 0.02 * math.sqrt(1 - 2 * phi / (2 * Phi - 1))
    w = model.lm_head.weight
    assert w.abs().max() <= 0.02 and abs(w.std().item() / expected - 1) < 0.01 and not model.lm_head.bias.any()
    assert model.mask_token.abs().max() <= 0.02 and model.mask_token.std() > 0.005
    assert model.cls_token.abs().max() <= 0.02 and model.patch_embed.proj.weight.abs().max() <= 0.02
    assert not model.rel_pos_bias.relative_position_bias_table.any()
    for layer, blk in enumerate(model.blocks, start=1):
        assert blk.attn.proj.weight.abs().max() <= 0.02 / math.sqrt(2 * layer) + 1e-9
        assert torch.equal(blk.ls1.gamma, torch.full_like(blk.ls1.gamma, 0.1))
    wide = vitkit.create_model(MIM, init_std=0.05, **DIMS)
    assert 0.02 < wide.lm_head.weight.abs().max() <= 0.05
    fine = vitkit.create_model("beit_base_patch16_224", **DIMS)  # the fine-tuning init: truncated at ±2, not ±σ
    assert fine.blocks[0].attn.qkv.weight.abs().max() > 0.03


def test_layer_ids_and_weight_decay_follow_the_official_code():
    """optim_factory.py get_num_layer_for_vit: mask_token with the embeddings (0), the rest after the blocks; the
    official no_weight_decay is {pos_embed, cls_token}: the (1, 1, D) mask token is decayed."""
    model = vitkit.create_model(MIM, **SHRUNK)
    assert model.layer_id("mask_token") == 0 and model.layer_id("lm_head.weight") == 3
    assert model.layer_id("rel_pos_bias.relative_position_bias_table") == 3 and model.num_layer_ids == 4
    assert "mask_token" not in model.no_weight_decay()


def test_config_errors_name_the_setting():
    with pytest.raises(ConfigError, match="mim_vocab_size must be >= 0"):
        vitkit.create_model(MIM, mim_vocab_size=-1)
    with pytest.raises(ConfigError, match="fc_norm=False or global_pool='token'"):
        vitkit.create_model("beit_base_patch16_224", mim_vocab_size=64)  # mean pooling's fc_norm replaces the norm
    with pytest.raises(ConfigError, match="vocab_size.*mim_vocab_size"):
        vitkit.create_model(MIM, vocab_size=64)
    with pytest.raises(ConfigError, match="init_std must be positive"):
        vitkit.create_model(MIM, init_std=0.0)
