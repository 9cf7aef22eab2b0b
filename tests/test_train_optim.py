"""Optimiser parameter groups (weight-decay exclusions, BEiT/MAE layer-wise decay), the warm-up + cosine schedule and
the weight EMA, each against values worked out independently of the code under test."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import vitkit
from vitkit.train.config import OptimConfig
from vitkit.train.ema import ModelEma
from vitkit.train.optim import build_optimizer, param_groups
from vitkit.train.schedule import WarmupSchedule, set_lr

DEPTH = 3


@pytest.fixture
def model():
    return vitkit.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, depth=DEPTH, embed_dim=24,
                               num_heads=2, num_classes=5)


def _group_of(groups):
    return {name: g for g in groups for name in g["param_names"]}


def test_every_trainable_parameter_is_in_exactly_one_group(model):
    groups = param_groups(model, weight_decay=0.05)
    names = [n for g in groups for n in g["param_names"]]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    for g in groups:  # the names and tensors line up
        params = dict(model.named_parameters())
        assert all(params[n] is p for n, p in zip(g["param_names"], g["params"]))


def test_weight_decay_exclusions(model):
    by_name = _group_of(param_groups(model, weight_decay=0.05))
    decayed = {n for n, g in by_name.items() if g["weight_decay"] == 0.05}
    # the rule written out by hand: matrices and the patch-embedding kernel decay; biases, LayerNorm weights,
    # the position embedding and the class token do not
    expected = {"patch_embed.proj.weight", "head.weight"} | {
        f"blocks.{i}.{m}.weight" for i in range(DEPTH) for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}
    assert decayed == expected
    assert by_name["pos_embed"]["weight_decay"] == 0.0 and by_name["cls_token"]["weight_decay"] == 0.0
    assert by_name["blocks.0.norm1.weight"]["weight_decay"] == 0.0


def test_layer_decay_scales_follow_beit(model):
    d = 0.75
    by_name = _group_of(param_groups(model, weight_decay=0.05, layer_decay=d))
    # BEiT / MAE: num_layers = depth + 1; embeddings get d^(depth+1), block i gets d^(depth-i), the head gets 1
    assert by_name["pos_embed"]["lr_scale"] == pytest.approx(d ** (DEPTH + 1))
    assert by_name["patch_embed.proj.weight"]["lr_scale"] == pytest.approx(d ** (DEPTH + 1))
    for i in range(DEPTH):
        assert by_name[f"blocks.{i}.mlp.fc1.weight"]["lr_scale"] == pytest.approx(d ** (DEPTH - i))
    assert by_name["head.weight"]["lr_scale"] == 1.0 and by_name["norm.bias"]["lr_scale"] == 1.0


def test_set_lr_applies_each_groups_scale(model):
    opt = build_optimizer(model, OptimConfig(layer_decay=0.5), lr=1.0)
    set_lr(opt, 0.2)
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(0.2 * g["lr_scale"])


def test_the_recipes_weight_decay_and_layer_decay_reach_the_optimizer(tmp_path):
    """Through ``train()``: the parameter groups saved by a one-step run give every parameter the weight decay and
    learning-rate scale the recipe implies, written out here for a 2-block ViT. Decay 0.03 for the matrices but the
    position embedding and class token, 0 for the rest; lr scale 0.6^(3 - layer), layer 0 for the embeddings, i + 1
    for block i, 3 for the final norm and the head."""
    import json

    from safetensors.torch import load_file

    from vitkit.train import train
    wd, ld, depth = 0.03, 0.6, 2  # not the defaults (0.05, none)
    recipe = {"model": {"name": "vit_tiny_patch16_224",
                        "overrides": {"patch_size": 4, "depth": depth, "embed_dim": 24, "num_heads": 2}},
              "data": {"name": "fake", "img_size": 16, "train_limit": 32, "test_limit": 8, "num_workers": 0},
              "optim": {"weight_decay": wd, "layer_decay": ld},
              "train": {"steps": 1, "batch_size": 16, "threads": 1},
              "log": {"progress": False, "plots": False, "tensorboard": False}}
    last = train(recipe, tmp_path / "run").run_dir / "checkpoints" / "last"
    groups = json.loads((last / "train_state.json").read_text())["optimizer"]["param_groups"]
    got = {name: (g["weight_decay"], g["lr_scale"]) for g in groups for name in g["param_names"]}

    def layer(name: str) -> int:
        if name.startswith(("cls_token", "pos_embed", "patch_embed.")):
            return 0
        return int(name.split(".")[1]) + 1 if name.startswith("blocks.") else depth + 1

    shapes = {name: t.shape for name, t in load_file(str(last / "model.safetensors")).items()}
    expected = {name: (wd if len(shape) >= 2 and name not in ("pos_embed", "cls_token") else 0.0,
                       ld ** (depth + 1 - layer(name))) for name, shape in shapes.items()}
    assert got.keys() == expected.keys()
    wrong = {n: (got[n], expected[n]) for n in got if got[n] != pytest.approx(expected[n], rel=1e-12)}
    assert not wrong, (f"{len(wrong)} of {len(got)} parameters: (weight_decay, lr_scale) in the optimizer, then as "
                       f"the recipe implies: {dict(list(wrong.items())[:3])}")


def test_build_optimizer_kinds(model):
    sgd = build_optimizer(model, OptimConfig(name="sgd", momentum=0.9, weight_decay=0.0), lr=0.01)
    assert isinstance(sgd, torch.optim.SGD) and all(g["momentum"] == 0.9 for g in sgd.param_groups)
    adamw = build_optimizer(model, OptimConfig(name="adamw", betas=(0.8, 0.99)), lr=0.01)
    assert isinstance(adamw, torch.optim.AdamW) and adamw.param_groups[0]["betas"] == (0.8, 0.99)


def test_warmup_then_cosine():
    s = WarmupSchedule(lr=1.0, total_steps=110, warmup_steps=10, min_lr=0.1)
    assert [s(i) for i in range(3)] == pytest.approx([0.1, 0.2, 0.3])  # linear, first step non-zero
    assert s(9) == pytest.approx(1.0) and s(10) == pytest.approx(1.0)
    assert s(60) == pytest.approx(0.55)  # half-way through the cosine: the mean of lr and min_lr
    assert s(110) == pytest.approx(0.1) and s(500) == pytest.approx(0.1)  # clamped at min_lr
    decay = [s(i) for i in range(10, 111)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))


def test_linear_and_constant_schedules():
    lin = WarmupSchedule(lr=2.0, total_steps=100, warmup_steps=0, kind="linear")
    assert lin(0) == 2.0 and lin(50) == pytest.approx(1.0) and lin(100) == 0.0
    const = WarmupSchedule(lr=2.0, total_steps=100, warmup_steps=4, kind="constant")
    assert const(1) == pytest.approx(1.0) and const(99) == 2.0


def test_ema_matches_the_recursion():
    model = nn.Linear(3, 2)
    ema = ModelEma(model, decay=0.9, warmup=False)
    expected = {k: v.double().clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
        ema.update(model)
        for k, v in model.state_dict().items():
            expected[k] = 0.9 * expected[k] + 0.1 * v.double()
    for k, v in ema.module.state_dict().items():
        torch.testing.assert_close(v.double(), expected[k], rtol=1e-6, atol=1e-6)
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_ema_warmup_decay():
    ema = ModelEma(nn.Linear(1, 1), decay=0.9999, warmup=True)
    assert ema.decay_at(0) == pytest.approx(0.1) and ema.decay_at(90) == pytest.approx(0.91)
    assert ema.decay_at(10**7) == 0.9999
    assert math.isclose(ModelEma(nn.Linear(1, 1), decay=0.99, warmup=False).decay_at(0), 0.99)


def test_freeze_layers_keeps_the_first_layer_ids_as_loaded_and_trains_the_rest(tmp_path):
    """``optim.freeze_layers: 2`` on a 2-block ViT: the embeddings (layer id 0) and block 0 (id 1) end the run as
    they started, bitwise, and the optimizer never held them; block 1, the final norm and the head moved."""
    from safetensors.torch import load_file
    from test_train_loop import recipe
    from vitkit.train import train
    from vitkit.train.distributed import stream_seed
    from vitkit.train.optim import freeze_layers

    overrides = {"patch_size": 4, "depth": 2, "embed_dim": 24, "num_heads": 2}
    run = tmp_path / "run"
    train(recipe(model={"overrides": overrides}, optim={"freeze_layers": 2}, train={"steps": 3, "eval_every": 3}),
          run)
    torch.manual_seed(stream_seed(0, "init"))  # the loop's initial weights depend on the seed only
    init = vitkit.create_model("vit_tiny_patch16_224", img_size=16, num_classes=10, **overrides)
    after = load_file(str(run / "checkpoints" / "last" / "model.safetensors"))
    frozen = {k for k in after if init.layer_id(k) < 2}
    assert {"pos_embed", "cls_token", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight"} <= frozen
    assert all(torch.equal(after[k], init.state_dict()[k]) for k in frozen)
    moved = [k for k in after if k not in frozen and not torch.equal(after[k], init.state_dict()[k])]
    assert "blocks.1.attn.qkv.weight" in moved and "head.weight" in moved
    model = vitkit.create_model("vit_tiny_patch16_224", img_size=16, num_classes=10, **overrides)
    assert sorted(freeze_layers(model, 2)) == sorted(frozen)
    groups = param_groups(model, 0.05)
    assert not frozen & {n for g in groups for n in g["param_names"]}
    with pytest.raises(ValueError, match="freeze every layer"):
        freeze_layers(model, model.num_layer_ids)


def test_freeze_layers_must_not_be_negative():
    from vitkit.train.config import ConfigError
    with pytest.raises(ConfigError, match="optim.freeze_layers"):
        OptimConfig(freeze_layers=-1).validate()
