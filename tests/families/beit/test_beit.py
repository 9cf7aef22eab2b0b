"""BEiT against its references: the golden timm case, the official code's own outputs (tests/families/beit/data, made by
microsoft/unilm beit/ at the golden commit: a release file, a pre-training checkpoint loaded by the fine-tuning
script, and its geometric-progression table resize), transformers (4.x and 5.x layouts, shared and per-block
tables, and the twin), brute-force versions of the relative-position bias, the published sizes, and BEiT's
layer-wise learning-rate decay through the recipe layer."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import vitkit
from vitkit.layers import RelativePositionBias, resize_rel_pos_bias_table
from vitkit.families.beit.catalog import closed_form_size
from vitkit.train.config import resolve
from vitkit.train.optim import param_groups
from vitkit.weights import CheckpointMismatchError

from conftest import max_diff, randomize_
from test_golden import test_golden_logits, test_golden_pre_logits  # noqa: F401  (collected here for BEiT)

GOLDEN_FAMILIES = {"beit"}
DATA = Path(__file__).parent / "data"
SHRUNK = dict(embed_dim=48, depth=2, num_heads=3)  # the shape of the official reference cases


def _eval(model, x):
    with torch.no_grad():
        out = model.eval()(x)
    return out.logits if hasattr(out, "logits") else out


def _pre_logits(model, x):
    with torch.no_grad():
        return model.eval().forward_head(model.forward_features(x), pre_logits=True)


def _close(out, ref, tol=1e-4):
    """The golden criterion: |out - ref| <= atol + rtol |ref| elementwise."""
    return bool(((out - ref).abs() <= tol + tol * ref.abs()).all())


# ============================================================================================== the official code
def test_official_release_file_matches_the_official_logits():
    io = load_file(str(DATA / "finetuned_112_io.safetensors"))
    model = vitkit.create_model("beit_base_patch16_224", pretrained=str(DATA / "finetuned_112.pth"), img_size=112,
                                **SHRUNK)
    x = io["pixel_values"].float()
    assert _close(_eval(model, x), io["logits"]) and _close(_pre_logits(model, x), io["pre_logits"])
    report = model.load_report
    assert report.format == "official" and report.container == "{'model': state_dict}"
    assert "2 computed buffer(s) in the checkpoint checked equal to vitkit's" in report.notes  # not just dropped
    assert model.num_classes == 10


def test_official_index_buffer_that_differs_is_refused(tmp_path):
    state = torch.load(DATA / "finetuned_112.pth", weights_only=True)
    index = state["model"]["blocks.1.attn.relative_position_index"]
    index[0, 0], index[0, 1] = index[0, 1].item(), index[0, 0].item()  # class-to-class and class-to-token swapped
    torch.save(state, tmp_path / "tampered.pth")
    with pytest.raises(CheckpointMismatchError, match=r"blocks\.1\.attn\.rel_pos\.relative_position_index"):
        vitkit.create_model("beit_base_patch16_224", pretrained=str(tmp_path / "tampered.pth"), img_size=112, **SHRUNK)


def test_pretraining_checkpoint_loads_as_the_official_fine_tuning_code_loads_it():
    """run_class_finetuning.py on a MIM checkpoint at another size: shared table copied into every block, resized
    7x7 → 10x10 by BEiT's geometric cubic method, mask_token / norm / lm_head unused, fresh fc_norm and head."""
    io = load_file(str(DATA / "pretrained_112_to_160_io.safetensors"))
    model = vitkit.create_model("beit_base_patch16_224", pretrained=str(DATA / "pretrained_112.pth"), img_size=160,
                                num_classes=10, **SHRUNK)
    x = io["pixel_values"].float()
    assert _close(_pre_logits(model, x), io["pre_logits"])
    with torch.no_grad():  # the official head is a fresh random one; with it copied in, the logits agree too
        model.head.weight.copy_(io["head.weight"]), model.head.bias.copy_(io["head.bias"])
    assert _close(_eval(model, x), io["logits"])
    report = model.load_report
    assert any("copied into each of the 2 blocks' tables" in n and "run_class_finetuning.py" in n
               for n in report.notes)
    assert [r.endswith("(window 7x7 → 10x10, geometric: microsoft/unilm beit/run_class_finetuning.py@768a3c8)")
            for r in report.resized] == [True, True]
    assert any(n.startswith("2 computed buffer(s) (relative_position_index) recomputed: the patch grid changed")
               for n in report.notes)
    ignored = " ".join(report.ignored)
    assert "mask_token" in ignored and "lm_head.weight" in ignored and "norm.weight" in ignored
    assert any(r.startswith("fc_norm") for r in report.reinitialized)
    assert any(r.startswith("head: absent") for r in report.reinitialized)


def test_pretraining_checkpoint_at_its_own_size_expands_without_resizing():
    model = vitkit.create_model("beit_base_patch16_224", pretrained=str(DATA / "pretrained_112.pth"), img_size=112,
                                **SHRUNK)
    shared = torch.load(DATA / "pretrained_112.pth", weights_only=True)["model"][
        "rel_pos_bias.relative_position_bias_table"].float()
    for blk in model.blocks:
        assert torch.equal(blk.attn.rel_pos.relative_position_bias_table, shared)
    assert model.rel_pos_bias is None and not model.load_report.resized
    assert "2 computed buffer(s) in the checkpoint checked equal to vitkit's" in model.load_report.notes


def test_pretraining_checkpoint_into_a_shared_table_model_keeps_it_shared():
    """use_shared_rel_pos_bias=True builds the pre-training layout: the table loads as it is, nothing is copied."""
    model = vitkit.create_model("beit_base_patch16_224", pretrained=str(DATA / "pretrained_112.pth"), img_size=112,
                                use_rel_pos_bias=False, use_shared_rel_pos_bias=True, **SHRUNK)
    assert model.rel_pos_bias is not None and all(blk.attn.rel_pos is None for blk in model.blocks)
    assert not any("copied into" in n for n in model.load_report.notes)


@pytest.mark.parametrize("src,dst", [(14, 24), (14, 32), (24, 14)])
def test_geometric_resize_equals_the_official_interp2d(src, dst):
    """resize_rel_pos_bias_table(method='geometric') against the tables run_class_finetuning.py produced with
    scipy's interp2d(kind='cubic') (BEiT-B 224 → 384, 224 → 512 and 384 → 224); the other methods differ by ~0.1-0.5
    on these N(0, 0.1) tables, which is why the load report names the method."""
    ref = load_file(str(DATA / "geometric_resize.safetensors"))
    table, expected = ref[f"src_{src}_to_{dst}"], ref[f"dst_{src}_to_{dst}"]
    out = resize_rel_pos_bias_table(table, (src, src), (dst, dst), extra_rows=3, method="geometric")
    assert out.shape == expected.shape and max_diff(out, expected) < 1e-5
    assert torch.equal(out[-3:], table[-3:])  # the class-token rows are kept
    for other in ("bicubic", "geometric_linear"):
        assert max_diff(resize_rel_pos_bias_table(table, (src, src), (dst, dst), 3, other), expected) > 0.05


def test_geometric_resize_of_a_too_small_table_is_a_clear_error():
    with pytest.raises(ValueError, match="at least 3x3"):
        resize_rel_pos_bias_table(torch.zeros(9 + 3, 2), (2, 2), (4, 4), extra_rows=3, method="geometric")


# =================================================================================================== transformers
HF_KW = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=96, image_size=48,
             patch_size=16, num_labels=5, layer_norm_eps=1e-6, hidden_dropout_prob=0.0, drop_path_rate=0.0)
X48 = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(5))
HF_SWITCHES = {  # BeitConfig switches → the config hints vitkit must take from the checkpoint
    "per_block": (dict(use_relative_position_bias=True, use_mean_pooling=True, layer_scale_init_value=0.1), {}),
    "shared_abs_cls": (dict(use_relative_position_bias=False, use_shared_relative_position_bias=True,
                            use_absolute_position_embeddings=True, use_mean_pooling=False,
                            layer_scale_init_value=0.0),
                       dict(use_abs_pos_emb=True, init_values=None, global_pool="token")),
    "both_tables": (dict(use_relative_position_bias=True, use_shared_relative_position_bias=True),
                    dict(use_shared_rel_pos_bias=True)),
}


def _hf_beit(**kw):
    transformers = pytest.importorskip("transformers")
    hf = transformers.BeitForImageClassification(transformers.BeitConfig(**{**HF_KW, **kw}))
    return randomize_(hf, seed=11).eval()


def _save_v5(hf, folder: Path) -> str:
    """A live transformers 5.x state_dict (beit.layers.i, q/k/v/o_proj, layers.i.relative_position_bias,
    shared_position_bias) written as it is, beside its config.json."""
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert "beit.layers.0.attention.q_proj.bias" in state and "beit.layers.0.attention.k_proj.bias" not in state
    folder.mkdir()
    save_file(state, str(folder / "model.safetensors"))
    hf.config.to_json_file(str(folder / "config.json"))
    return str(folder)


@pytest.mark.parametrize("layout", ["4.x", "5.x"])
@pytest.mark.parametrize("switches", sorted(HF_SWITCHES))
def test_transformers_parity(tmp_path, switches, layout):
    kw, hints = HF_SWITCHES[switches]
    hf = _hf_beit(**kw)
    if layout == "4.x":
        hf.save_pretrained(tmp_path / "hf")
        saved = load_file(str(tmp_path / "hf" / "model.safetensors"))
        assert "beit.encoder.layer.0.attention.attention.query.bias" in saved  # the 4.x (Hub) layout
        assert not any(k.endswith("attention.attention.key.bias") for k in saved)  # BEiT: no key bias
        folder = str(tmp_path / "hf")
    else:
        folder = _save_v5(hf, tmp_path / "v5")
    model = vitkit.create_model("beit_base_patch16_224", pretrained=folder, img_size=48)
    ref = _eval(hf, X48)
    assert ref.std() > 0.1 and max_diff(_eval(model, X48), ref) <= 1e-4
    notes = model.load_report.notes
    for key, value in dict(embed_dim=48, depth=2, num_heads=3, mlp_ratio=2.0, num_classes=5, **hints).items():
        assert f"config {key}={value!r} taken from the checkpoint" in notes, (key, notes)
    expanded = any("copied into each of the 2 blocks' tables" in n for n in notes)
    assert expanded == (switches == "shared_abs_cls")


def test_transformers_file_with_index_buffers_is_checked(tmp_path):
    """Older Hub checkpoints carry relative_position_index buffers: checked against vitkit's, not dropped."""
    hf = _hf_beit(**HF_SWITCHES["per_block"][0])
    hf.save_pretrained(tmp_path / "v4")
    old = load_file(str(tmp_path / "v4" / "model.safetensors"))
    model = vitkit.create_model("beit_base_patch16_224", **{**SHRUNK, "img_size": 48})
    for i, blk in enumerate(model.blocks):
        old[f"beit.encoder.layer.{i}.attention.attention.relative_position_bias.relative_position_index"] = \
            blk.attn.rel_pos.relative_position_index.clone()
    save_file(old, str(tmp_path / "v4" / "model.safetensors"))
    with_index = vitkit.create_model("beit_base_patch16_224", pretrained=str(tmp_path / "v4"), img_size=48)
    assert max_diff(_eval(with_index, X48), _eval(hf, X48)) <= 1e-4
    assert "2 computed buffer(s) in the checkpoint checked equal to vitkit's" in with_index.load_report.notes


@pytest.mark.parametrize("overrides", [{}, dict(use_rel_pos_bias=False, use_shared_rel_pos_bias=True,
                                                use_abs_pos_emb=True, global_pool="token", init_values=None)])
def test_transformers_twin_computes_the_same_function(overrides):
    from vitkit.bench.compare import to_transformers
    model = randomize_(vitkit.create_model("beit_base_patch16_224", num_classes=5, **{**SHRUNK, "img_size": 48},
                                           **overrides)).eval()
    hf = to_transformers(model)
    ref = _eval(model, X48)
    assert ref.std() > 0.1 and max_diff(_eval(hf, X48), ref) <= 1e-4


def test_transformers_folder_names_its_variant(tmp_path):
    _hf_beit(image_size=384, hidden_size=1024 // 16, num_attention_heads=4).save_pretrained(tmp_path / "hf")
    name, overrides = vitkit.registry.infer_variant(tmp_path / "hf")
    assert (name, overrides) == ("beit_base_patch16_384", {"img_size": 384})


# ============================================================================================= input size changes
def test_release_file_at_another_input_size():
    model = vitkit.create_model("beit_base_patch16_224", pretrained=str(DATA / "finetuned_112.pth"), img_size=160,
                                **SHRUNK)
    report = model.load_report
    assert [r.rsplit(" (window", 1)[0] for r in report.resized] == [
        f"blocks.{i}.attn.rel_pos.relative_position_bias_table (172, 3) → (364, 3)" for i in range(2)]
    assert all(r.endswith("(window 7x7 → 10x10, geometric: microsoft/unilm beit/run_class_finetuning.py@768a3c8)")
               for r in report.resized)
    assert any("recomputed: the patch grid changed from 7x7 to 10x10" in n for n in report.notes)
    x = torch.randn(2, 3, 160, 160)
    assert torch.isfinite(_eval(model, x)).all()


def test_absolute_position_embedding_and_tables_resize_together(tmp_path):
    """A BEiT with an absolute position embedding (official --abs_pos_emb) at twice its size: the embedding is
    resampled bicubically (prefix kept) and the per-block tables geometrically, as the official fine-tuning does for
    vitkit's folders (tests/test_pos_embed_resize.py checks the numbers)."""
    small = randomize_(vitkit.create_model("beit_base_patch16_224", use_abs_pos_emb=True,
                                           **{**SHRUNK, "img_size": 48}))
    vitkit.save_pretrained(small, tmp_path / "small")
    big = vitkit.create_model("beit_base_patch16_224", pretrained=str(tmp_path / "small"), img_size=96, **SHRUNK)
    resized = big.load_report.resized
    assert any(r.startswith("pos_embed (1, 10, 48) → (1, 37, 48)") and "bicubic without antialias" in r
               for r in resized)
    assert sum("(window 3x3 → 6x6, geometric: microsoft/unilm" in r for r in resized) == 2
    assert big.pos_embed.shape == (1, 37, 48)


# ================================================================================================ the architecture
def test_relative_position_bias_brute_force():
    """B[h, i, j] for a 3x4 grid with the class token, written out by offsets: patch pairs read row
    (dy + Wh - 1)(2Ww - 1) + (dx + Ww - 1); the class token's rows are L-3 (to tokens), L-2 (from tokens), L-1."""
    Wh, Ww, heads = 3, 4, 2
    rel = RelativePositionBias((Wh, Ww), heads, class_token=True)
    with torch.no_grad():
        rel.relative_position_bias_table.normal_()
    table, L = rel.relative_position_bias_table, rel.relative_position_bias_table.shape[0]
    assert L == (2 * Wh - 1) * (2 * Ww - 1) + 3
    coords = [(None, None)] + [(y, x) for y in range(Wh) for x in range(Ww)]  # token 0 = the class token
    expected = torch.empty(heads, len(coords), len(coords))
    for i, (yi, xi) in enumerate(coords):
        for j, (yj, xj) in enumerate(coords):
            if i == 0 and j == 0:
                row = L - 1
            elif i == 0:
                row = L - 3
            elif j == 0:
                row = L - 2
            else:
                row = (yi - yj + Wh - 1) * (2 * Ww - 1) + (xi - xj + Ww - 1)
            expected[:, i, j] = table[row]
    with torch.no_grad():
        assert torch.equal(rel(), expected)


def test_q_and_v_biases_without_a_key_bias():
    model = vitkit.create_model("beit_base_patch16_224", **{**SHRUNK, "img_size": 48})
    attn = model.blocks[0].attn
    names = {n for n, _ in model.named_parameters()}
    assert {"blocks.0.attn.q_bias", "blocks.0.attn.v_bias"} <= names and attn.qkv.bias is None
    assert not any("k_bias" in k for k in model.state_dict())  # a zero buffer, never saved
    with torch.no_grad():
        attn.q_bias.normal_(), attn.v_bias.normal_()
        x = torch.randn(2, 10, 48)
        D = 48
        q, k, v = (x @ attn.qkv.weight[s * D:(s + 1) * D].t() for s in range(3))
        torch.testing.assert_close(attn.project_qkv(x), torch.cat([q + attn.q_bias, k, v + attn.v_bias], -1))


def test_layer_scale_and_mean_pooling():
    model = randomize_(vitkit.create_model("beit_base_patch16_224", **{**SHRUNK, "img_size": 48})).eval()
    large = vitkit.create_model("beit_large_patch16_224", **SHRUNK)
    assert torch.equal(large.blocks[0].ls1.gamma.detach(), torch.full((48,), 1e-5))  # official: 0.1 base, 1e-5 large
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        tokens = model.forward_features(x)  # (B, 1 + 9, D), no final norm (mean pooling)
        pooled = model.fc_norm(tokens[:, 1:].mean(1))  # the class token is left out of the mean
        torch.testing.assert_close(model.forward_head(tokens, pre_logits=True), pooled)
        model.blocks[1].ls2.gamma.zero_(), model.blocks[1].ls1.gamma.zero_()
        torch.testing.assert_close(model.forward_intermediates(x, indices=[0, 1])[1],
                                   model.forward_intermediates(x, indices=[0])[0])  # γ = 0: block 1 is the identity


def test_published_sizes():
    """The closed form (the contract test's reference) equals the counts measured on the official model
    (microsoft/unilm@768a3c8 beit/modeling_finetune.py) and rounds to beit/README.md's parameter column at 384 / 512."""
    refs = {n: closed_form_size(vitkit.get_spec(n).config) for n in vitkit.list_models("beit*")}
    assert (round(refs["beit_base_patch16_224"].params_m, 2), round(refs["beit_base_patch16_224"].gmacs, 2)) \
        == (86.53, 17.56)
    assert (round(refs["beit_large_patch16_224"].params_m, 2), round(refs["beit_large_patch16_224"].gmacs, 2)) \
        == (304.43, 61.55)
    readme = {"beit_base_patch16_384": 87, "beit_large_patch16_384": 305, "beit_large_patch16_512": 306}
    assert {n: round(refs[n].params_m) for n in readme} == readme


def test_data_configs_follow_the_official_evaluation():
    for name in vitkit.list_models("beit*"):
        cfg = vitkit.get_spec(name).data_cfg
        assert cfg.mean == cfg.std == (0.5, 0.5, 0.5) and cfg.interpolation == "bicubic"
        assert cfg.crop_pct == (0.875 if cfg.input_size[-1] == 224 else 1.0)


def test_named_weights_are_timm_hub_repositories():
    for name in vitkit.list_models("beit*"):
        w = vitkit.get_spec(name).weights
        if name.endswith("_8k_vocab"):  # the pre-training releases carry no hash and timm does not port them
            assert w is None
            continue
        assert w.url == f"hf-hub:timm/{name}.in22k_ft_in22k_in1k" and vitkit.get_spec(name).format(w.source_format)


# ======================================================================================= layer-wise learning rate
def test_layer_decay_scales_follow_beit():
    """0.65^(L + 1 - layer_id): cls/pos/patch embedding 0, block i → i + 1, the shared table (rel_pos_bias), final
    norm and head → L + 1 (optim_factory.py get_num_layer_for_vit, run_class_finetuning.py)."""
    model = vitkit.create_model("beit_base_patch16_224", use_shared_rel_pos_bias=True, use_abs_pos_emb=True,
                                **{**SHRUNK, "img_size": 48, "depth": 3})
    L = 3
    groups = {n: g for g in param_groups(model, weight_decay=0.05, layer_decay=0.65) for n in g["param_names"]}
    expected = {"cls_token": 0, "pos_embed": 0, "patch_embed.proj.weight": 0,
                "rel_pos_bias.relative_position_bias_table": L + 1, "fc_norm.weight": L + 1, "head.weight": L + 1,
                **{f"blocks.{i}.{p}": i + 1 for i in range(L)
                   for p in ("attn.q_bias", "attn.rel_pos.relative_position_bias_table", "ls1.gamma",
                             "mlp.fc2.weight")}}
    for name, layer in expected.items():
        assert groups[name]["lr_scale"] == pytest.approx(0.65 ** (L + 1 - layer)), name
    assert groups["rel_pos_bias.relative_position_bias_table"]["weight_decay"] == 0.05  # official: decayed


@pytest.mark.parametrize("name,recipe_optim,expected", [
    ("beit_base_patch16_224", {}, 0.65), ("beit_large_patch16_384", {}, 0.75),
    ("beit_base_patch16_224", {"layer_decay": 0.8}, 0.8), ("beit_base_patch16_224", {"layer_decay": None}, None),
    ("vit_tiny_patch16_224", {}, None)])
def test_recipe_takes_the_family_layer_decay(name, recipe_optim, expected):
    cfg = resolve({"model": {"name": name}, "data": {"name": "fake"}, "optim": recipe_optim, "train": {"steps": 1}})
    assert cfg.optim.layer_decay == expected
    assert resolve(cfg).optim.layer_decay == expected  # a resolved config (a run's config.yaml) stays as it is
