"""The family contract, checked for every registered variant of every family (parametrised over ``list_models()``,
so a family cannot register and skip it): every variant's published size; then, once per distinct tiny model that
the variants build (``DISTINCT``), tiny forward/backward, the head, attention recording, layer ids, weight-decay names,
intermediates, save/load and ``vitkit convert`` round trips, another input size and the backbone checks."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import vitkit
from vitkit.config import ConfigError
from vitkit.weights.load_report import CheckpointMismatchError
from vitkit.bench.flops import count_macs, count_params
from vitkit.layers import RecordsAttention
from vitkit.families import stats
from vitkit.families.backbone import FeatureExtractor
from vitkit.families.contract import Family, FamilyModel, check_contract
from vitkit.registry import PreprocessConfig, register

from conftest import max_diff, randomize_

NAMES = vitkit.list_models()


def _distinct_models(names: list[str]) -> list[str]:
    """One name per distinct tiny model (model class and resolved config): names whose tiny configurations build the
    same model (e.g. ViT-S/16 at 224 and 384 once shrunk) would repeat the same computation, so they share the checks
    of tiny models below."""
    import json
    seen: dict[tuple[str, str], str] = {}
    for name in names:
        spec = vitkit.get_spec(name)
        key = (spec.model_cls.__qualname__, json.dumps({**spec.config, **spec.tiny}, sort_keys=True, default=str))
        seen.setdefault(key, name)
    return sorted(seen.values())


DISTINCT = _distinct_models(NAMES)
STATS = {name: entry for data in stats.read_all().values() for name, entry in data["variants"].items()}


def _tiny(name: str, **extra) -> FamilyModel:
    spec = vitkit.get_spec(name)
    return randomize_(vitkit.create_model(name, **{**spec.tiny, **extra}))


def _input(model: FamilyModel, batch: int = 2, scale: int = 1) -> torch.Tensor:
    C, H, W = model.data_cfg.input_size
    return torch.randn(batch, C, H * scale, W * scale, generator=torch.Generator().manual_seed(1))


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


# ------------------------------------------------------------------------------------------------- full size
@pytest.mark.parametrize("name", NAMES)
def test_size_matches_the_published_reference(name):
    """Built on the meta device (nothing allocated): parameters and forward MACs equal the family's reference table
    (papers or official code) within its precision."""
    ref = vitkit.get_spec(name).reference
    assert ref is not None, f"{name}: the family registers no reference size for it"
    with torch.device("meta"):
        model = vitkit.create_model(name)
    params, macs = count_params(model), count_macs(model)
    params_m, gmacs = params / 1e6, macs / 1e9
    assert abs(params_m - ref.params_m) <= ref.params_tol, f"{params_m:.4f} M vs {ref.params_m} M ({ref.source})"
    assert math.isclose(gmacs, ref.gmacs, rel_tol=ref.macs_rtol), f"{gmacs:.4f} G vs {ref.gmacs} G ({ref.source})"
    listed = STATS.get(name)  # what `vitkit models` prints without building the model
    assert listed is not None and (listed["params"], listed["macs"], tuple(listed["input_size"])) == (
        params, macs, tuple(model.data_cfg.input_size)), \
        f"{name}: the family's stats.json says {listed}; run `python -m vitkit.bench.flops --update`"


# ----------------------------------------------------------------------------------------------- tiny size
@pytest.mark.parametrize("name", DISTINCT)
def test_tiny_forward_backward(name):
    model = _tiny(name, num_classes=7).train()
    x = _input(model)
    logits = model(x)
    logits = logits[0] if isinstance(logits, tuple) else logits
    assert logits.shape == (2, 7)
    loss = logits.pow(2).sum()
    if model.mim_vocab_size:  # the masked-image-modelling head's parameters train through masked_token_logits
        loss = loss + model.masked_token_logits(x, _mask(model, x)).pow(2).sum()
    loss.backward()
    for pname, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{pname} got no gradient"
            assert torch.isfinite(p.grad).all(), pname
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


@pytest.mark.parametrize("name", DISTINCT)
def test_head_and_pre_logits(name):
    model = _tiny(name, num_classes=5).eval()
    x = _input(model)
    with torch.no_grad():  # all under no_grad: SDPA picks its kernel by autograd state (a bias that needs a gradient
        feats = model.forward_features(x)  # takes the math kernel), which would differ in the last bit
        logits, pre = model.forward_head(feats), model.forward_head(feats, pre_logits=True)
        assert torch.equal(logits, model(x))
    assert pre.ndim == 2 and pre.shape[0] == 2
    heads = model.classifiers()
    assert heads and all(h.out_features == 5 for h in heads)
    if len(heads) == 1:
        torch.testing.assert_close(heads[0](pre), logits)
    model.reset_classifier(3)
    assert all(h.out_features == 3 and not h.weight.any() for h in model.classifiers())
    assert model(x).shape == (2, 3) and model.num_classes == 3


def _mask(model: FamilyModel, x: torch.Tensor) -> torch.Tensor:
    """A (B, N) bool mask over the patch positions of ``forward_features``' tokens: a different third per image."""
    with torch.no_grad():
        n = model.forward_features(x).shape[1] - model.num_prefix_tokens
    return torch.stack([torch.arange(n) % 3 == b % 3 for b in range(x.shape[0])])


@pytest.mark.parametrize("name", DISTINCT)
def test_masked_token_logits_or_a_one_line_refusal(name):
    """The optional masked-image-modelling capability: (M, mim_vocab_size) logits, one row per masked position; a
    model without the head refuses in one line."""
    model = _tiny(name).eval()
    x = _input(model)
    mask = _mask(model, x)
    if not model.mim_vocab_size:
        with pytest.raises(ValueError, match="masked-image-modelling head") as err:
            model.masked_token_logits(x, mask)
        assert "\n" not in str(err.value)
        return
    with torch.no_grad():
        logits = model.masked_token_logits(x, mask)
        assert logits.shape == (int(mask.sum()), model.mim_vocab_size) and torch.isfinite(logits).all()
        assert torch.equal(model.masked_token_logits(x, mask), logits)


@pytest.mark.parametrize("name", DISTINCT)
def test_bad_input_is_a_value_error(name):
    model = _tiny(name)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(_input(model)[0])


@pytest.mark.parametrize("name", DISTINCT)
def test_record_attention_every_layer(name):
    model = _tiny(name).eval()
    x = _input(model)
    layers = [n for n, m in model.named_modules() if isinstance(m, RecordsAttention)]
    assert layers, f"{name} has no attention layer vitkit can record"
    with torch.no_grad(), vitkit.record_attention(model) as maps:
        recorded = model(x)
    assert sorted(maps) == sorted(layers)
    for layer, attn in maps.items():
        assert attn.ndim == 4 and maps.layouts[layer], layer
        torch.testing.assert_close(attn.sum(-1), torch.ones_like(attn.sum(-1)), atol=1e-5, rtol=0)
    assert max_diff(recorded, _logits(model, x)) < 1e-4  # recording does not change the function


@pytest.mark.parametrize("name", DISTINCT)
def test_layer_ids_and_weight_decay_names(name):
    model = _tiny(name)
    ids = [model.layer_id(n) for n, _ in model.named_parameters()]
    assert all(0 <= i < model.num_layer_ids for i in ids)
    assert ids == sorted(ids), "layer ids must not decrease from input to output"
    assert ids[0] == 0 and model.layer_id(next(n for n, _ in reversed(list(model.named_parameters())))) \
        == model.num_layer_ids - 1
    assert set(ids) == set(range(model.num_layer_ids)), "every layer id is used"
    names = [n for n, _ in model.named_parameters()]
    for entry in model.no_weight_decay():
        assert any(n == entry or n.rsplit(".", 1)[-1] == entry or n.startswith(entry + ".") for n in names), \
            f"no_weight_decay() names {entry!r}, which is no parameter"


@pytest.mark.parametrize("name", DISTINCT)
def test_forward_intermediates(name):
    model = _tiny(name).eval()
    x = _input(model)
    with torch.no_grad():
        every = model.forward_intermediates(x)
        last = model.forward_intermediates(x, indices=1)
    assert len(every) >= 2 and len(last) == 1
    torch.testing.assert_close(last[0], every[-1])
    if model.intermediates == "pyramid":  # (B, C_i, H_i, W_i), coarser at every stage
        assert all(t.ndim == 4 and t.shape[0] == 2 for t in every)
        sizes = [t.shape[-2] * t.shape[-1] for t in every]
        assert sizes == sorted(sizes, reverse=True) and sizes[0] > sizes[-1]
    else:  # (B, N, D) per block
        assert all(t.ndim == 3 and t.shape[0] == 2 for t in every)
    with pytest.raises(ValueError):
        model.forward_intermediates(x, indices=[len(every)])


@pytest.mark.parametrize("name", DISTINCT)
def test_save_pretrained_and_convert_round_trips(name, tmp_path):
    from vitkit.cli.main import main
    model = _tiny(name).eval()
    x = _input(model)
    vitkit.save_pretrained(model, tmp_path / "saved")
    back = vitkit.load_model(tmp_path / "saved")
    assert torch.equal(_logits(back, x), _logits(model, x))
    assert main(["convert", str(tmp_path / "saved"), str(tmp_path / "converted")]) == 0
    converted = vitkit.load_model(tmp_path / "converted")
    assert torch.equal(_logits(converted, x), _logits(model, x))


@pytest.mark.parametrize("name", DISTINCT)
def test_another_input_size_builds_runs_and_loads(name, tmp_path):
    """A tiny model at twice its input size runs, and the smaller model's weights load into it (position embeddings
    and bias tables resized and reported, where the family has any)."""
    small = _tiny(name)
    vitkit.save_pretrained(small, tmp_path / "small")
    C, H, W = small.data_cfg.input_size
    spec = vitkit.get_spec(name)
    big = vitkit.create_model(name, pretrained=str(tmp_path / "small"), img_size=(2 * H, 2 * W),
                              **{k: v for k, v in spec.tiny.items() if k != "img_size"})
    assert big.data_cfg.input_size == (C, 2 * H, 2 * W)
    x = _input(small, scale=2)
    out = _logits(big, x)
    assert out.shape == _logits(small, _input(small)).shape and torch.isfinite(out).all()  # (2, classes or features)
    if big.mim_vocab_size:
        with torch.no_grad():
            mask = _mask(big, x)
            assert big.masked_token_logits(x, mask).shape == (int(mask.sum()), big.mim_vocab_size)
    report = big.load_report
    assert report.resized or report.notes, "the load report says nothing about the new input size"


# -------------------------------------------------------------------------------------------------- backbone
@pytest.mark.parametrize("name", DISTINCT)
def test_feature_info_and_features_only(name, tmp_path):
    """``feature_info`` (channels, reduction, module) describes exactly what ``features_only=True`` returns: NCHW
    maps for every family, token models included; ``out_indices`` picks them (negative from the end)."""
    model = _tiny(name)
    info = model.feature_info
    names = dict(model.named_modules())
    assert info and all(entry["module"] in names for entry in info), info
    folder = vitkit.save_pretrained(model, tmp_path / "m")
    every = list(range(len(info)))
    backbone = vitkit.create_model(name, pretrained=folder, features_only=True, out_indices=every).eval()
    x = _input(model)
    with torch.no_grad():
        maps = backbone(x)
    H, W = x.shape[-2:]
    assert len(maps) == len(info)
    for entry, m in zip(info, maps):
        assert m.ndim == 4 and m.shape[:2] == (x.shape[0], entry["num_chs"]), (entry, m.shape)
        assert m.shape[-2] == H // entry["reduction"] or m.shape[-2] == -(-H // entry["reduction"]), (entry, m.shape)
    last = FeatureExtractor(vitkit.load_model(folder), out_indices=[-1]).eval()
    with torch.no_grad():
        assert torch.equal(last(x)[0], maps[-1])
    assert last.feature_info == [info[-1]]


def _saved_bytes(model: nn.Module, x: torch.Tensor) -> tuple[int, dict[str, torch.Tensor]]:
    """Bytes of the tensors autograd keeps for the backward pass of one step, and the gradients of that step."""
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    model.train()
    torch.manual_seed(0)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
        loss = (out[0] if isinstance(out, tuple) else out).square().mean()
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return sum(saved), grads


@pytest.mark.parametrize("name", DISTINCT)
def test_grad_checkpointing_keeps_gradients_and_saves_memory(name):
    """``set_grad_checkpointing(True)`` gives the same gradients (dropout and drop-path replayed) while autograd
    keeps fewer activation bytes; ``False`` restores the plain forward."""
    try:
        model = _tiny(name, drop_path_rate=0.1)
    except ConfigError:  # a family whose stochastic depth is set otherwise (per stage, or another name)
        model = _tiny(name)
    x = _input(model)
    plain_bytes, plain = _saved_bytes(model, x)
    model.set_grad_checkpointing(True)
    ckpt_bytes, ckpt = _saved_bytes(model, x)
    assert plain.keys() == ckpt.keys()
    for k in plain:
        torch.testing.assert_close(ckpt[k], plain[k], atol=1e-5, rtol=1e-4, msg=lambda m: f"{k}: {m}")
    assert ckpt_bytes < plain_bytes, (ckpt_bytes, plain_bytes)
    model.set_grad_checkpointing(False)
    assert _saved_bytes(model, x)[0] == plain_bytes


@pytest.mark.parametrize("name", DISTINCT)
def test_in_chans_adapts_the_first_layer_of_rgb_weights(name, tmp_path):
    """RGB weights loaded with ``in_chans=1`` answer a grey image as the RGB model answers it in three equal
    channels; with ``in_chans=6`` (RGB repeated twice, scaled by 3/6: timm's ``adapt_input_conv``), six equal
    channels as three."""
    model = _tiny(name, num_classes=4)
    folder = vitkit.save_pretrained(model, tmp_path / "rgb")
    if type(model).fixed_input_channels:  # a family that says why it cannot: refused, with the reason
        with pytest.raises(CheckpointMismatchError, match="input channels"):
            vitkit.create_model(name, pretrained=folder, in_chans=1)
        return
    grey = _input(model)[:, :1]
    reference = _logits(model, grey.expand(-1, 3, -1, -1))
    for chans in (1, 6):
        adapted = vitkit.create_model(name, pretrained=folder, in_chans=chans)
        assert any("input channels" in n for n in adapted.load_report.notes), adapted.load_report.notes
        torch.testing.assert_close(_logits(adapted, grey.expand(-1, chans, -1, -1)), reference, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_torch_compile(name):
    model = _tiny(name).eval()
    x = _input(model)
    compiled = torch.compile(model)
    with torch.no_grad():
        assert max_diff(compiled(x), model(x)) < 1e-4


# ------------------------------------------------------------------------------------------ the contract itself
def test_a_family_missing_a_piece_fails_at_registration():
    from vitkit.families.vit.model import VisionTransformer

    class NoLayerIds(VisionTransformer):
        layer_id = None  # removes an abstract method's implementation

    class Incomplete(FamilyModel):
        config_cls = VisionTransformer.config_cls
        intermediates = "tokens"

        def forward_features(self, x):
            return x

    with pytest.raises(TypeError, match="Incomplete does not meet the family contract: classifiers"):
        check_contract(Incomplete)
    with pytest.raises(TypeError, match="must derive from"):
        register(Family("zz", "ZZ", "", nn.Linear, {}, PreprocessConfig()))
    assert "zz" not in vitkit.registry.list_families()


def test_every_family_registers_formats_tiny_and_references():
    for name in NAMES:
        spec = vitkit.get_spec(name)
        assert spec.formats, f"{name}: no checkpoint format"
        assert spec.tiny, f"{name}: no tiny configuration"
        assert spec.reference is not None, f"{name}: no reference size"
