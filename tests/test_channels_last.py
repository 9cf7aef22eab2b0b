"""``train.channels_last`` and ``vitkit bench --channels-last``: NHWC memory order for the weights and inputs of the
families with overlapping convolutions (``FamilyModel.convolutional``).

- the declaration agrees with the modules: a model declares ``convolutional`` exactly when it holds a convolution
  whose windows overlap (kernel larger than stride), checked on every distinct tiny model;
- for each such tiny model, the NHWC copy computes the contiguous model's logits and gradients (fp32);
- a `vitkit train` run converts the model and every training batch, saves ``model.safetensors`` equal to the weights
  it trained, and `vitkit eval` reproduces the run's own test report from it;
- a family without such convolutions is warned (once) and converted all the same; FSDP is refused (FSDP2 does not
  shard NHWC parameters, shown here);
- the benchmark converts the model and the batch of the step it times, and the CLI passes the flag through.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch import nn

import vitkit
from vitkit.bench.runner import BenchSettings, make_step
from vitkit.cli.main import main
from vitkit.config import ConfigError
from vitkit.families.contract import FamilyModel
from vitkit.train import Trainer, resolve
from vitkit.train.distributed import DistInfo

from test_contract import DISTINCT, _input, _tiny

CONVOLUTIONAL = [name for name in DISTINCT if vitkit.get_spec(name).model_cls.convolutional]
NHWC = torch.channels_last

# Measured on the tiny models (fp32, one thread): logits differ by at most 2.7e-6 (DAT++), gradients by at most
# 1.7e-5 of the model's largest gradient entry (CvT: its patch-embedding kernels' gradients sum over every pixel, in
# another order under NHWC). The tolerances are ~4x and ~6x those.
LOGITS_TOL, GRAD_TOL = 1e-5, 1e-4


def _overlapping_convs(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)
            and any(k > s for k, s in zip(m.kernel_size, m.stride))]


def _conv_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: m.weight for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def _nhwc(t: torch.Tensor) -> bool:
    return t.is_contiguous(memory_format=NHWC)


def test_the_convolutional_families_are_the_expected_ones():
    """CCT, CvT, DAT, DAT++, MobileViT, PVT v2 and ViT's ResNet hybrids (PVT v1, Swin, BEiT, DeiT, T2T-ViT and the
    plain ViTs embed patches without overlap), each with tiny models in the tests below."""
    assert {vitkit.get_spec(n).family for n in CONVOLUTIONAL} == {"cct", "cvt", "dat", "dat_pp", "mobilevit",
                                                                   "pvt_v2", "vit"}
    assert [n for n in CONVOLUTIONAL if vitkit.get_spec(n).family == "vit"] == ["vit_base_r50_s16_224"]


@pytest.mark.parametrize("name", DISTINCT)
def test_convolutional_is_declared_exactly_when_convolutions_overlap(name):
    """The independent reference is the module tree: a patchify stem (kernel = stride) is a linear map of patches
    in any memory order; an overlapping convolution is where NHWC matters."""
    model = _tiny(name)
    overlapping = _overlapping_convs(model)
    assert model.convolutional == bool(overlapping), (
        f"{type(model).__name__}.convolutional is {model.convolutional}, overlapping convolutions: {overlapping[:3]}")


def _logits_and_grads(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
    model.eval()
    with torch.no_grad():
        logits = model(x)
    model.train()
    torch.manual_seed(0)  # the same dropout / drop-path draws in both copies
    out = model(x)
    out = out[0] if isinstance(out, tuple) else out
    out.pow(2).sum().backward()
    grads = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    return logits, out.detach(), grads


@pytest.mark.parametrize("name", CONVOLUTIONAL)
def test_nhwc_model_computes_the_contiguous_logits_and_gradients(name):
    model = _tiny(name, num_classes=7)
    nhwc = copy.deepcopy(model).to(memory_format=NHWC)
    weights = _conv_weights(nhwc)
    assert weights and all(_nhwc(w) for w in weights.values())
    spatial = [k for k, w in weights.items() if w.shape[1] > 1 and w.shape[2:].numel() > 1]
    assert spatial and not any(weights[k].is_contiguous() for k in spatial), "the kernels were not reordered"
    x = _input(model)
    ref_logits, ref_out, ref_grads = _logits_and_grads(model, x)
    logits, out, grads = _logits_and_grads(nhwc, x.contiguous(memory_format=NHWC))
    assert ref_logits.abs().max() > 0.01  # randomised weights (MobileViT-S eval: 0.06): not a vacuous comparison
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=LOGITS_TOL)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=LOGITS_TOL)
    assert grads.keys() == ref_grads.keys()
    scale = max(g.abs().max().item() for g in ref_grads.values())
    worst = max(((grads[k] - ref_grads[k]).abs().max().item(), k) for k in ref_grads)
    assert worst[0] <= GRAD_TOL * scale, f"{worst[1]}: |Δ| {worst[0]:.2e} of a largest gradient {scale:.2e}"


# ----------------------------------------------------------------------------------------------- training
def _recipe(name: str = "cvt_13", **train) -> dict:
    tiny = {k: v for k, v in vitkit.get_spec(name).tiny.items() if k != "img_size"}
    return {"model": {"name": name, "overrides": tiny},
            "data": {"name": "fake", "img_size": 32, "train_limit": 32, "test_limit": 16, "val_fraction": 0.25,
                     "num_workers": 0},
            "train": {"steps": 2, "batch_size": 8, "seed": 0, "threads": 1, "amp": "none", "device": "cpu",
                      "channels_last": True, **train},
            "log": {"progress": False, "plots": False, "tensorboard": False}}


def test_vitkit_train_converts_model_and_batches_and_saves_what_it_trained(tmp_path, capsys):
    """During a 2-step `vitkit train` of a tiny CvT, every training forward gets an NHWC batch and NHWC conv kernels;
    the saved ``model.safetensors`` equals the trained weights, the weights loader reads it back equal, and
    `vitkit eval` reproduces the run's own test report (computed on the NHWC model in memory)."""
    seen: list[tuple[bool, bool]] = []
    trained: list[FamilyModel] = []

    def hook(module, args):
        if isinstance(module, FamilyModel) and module.training:
            trained[:] = [module]
            seen.append((_nhwc(args[0]), all(_nhwc(w) for w in _conv_weights(module).values())))

    (tmp_path / "r.yaml").write_text(yaml.safe_dump(_recipe()))
    run = tmp_path / "run"
    threads = torch.get_num_threads()
    handle = nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        assert main(["train", str(tmp_path / "r.yaml"), "--out", str(run)]) == 0
    finally:
        handle.remove()
        torch.set_num_threads(threads)
    assert seen == [(True, True)] * 2  # two steps, one micro-batch each
    model, = trained
    saved = load_file(str(run / "checkpoints" / "last" / "model.safetensors"))
    state = model.state_dict()
    assert saved.keys() == state.keys()
    assert all(torch.equal(saved[k], state[k]) for k in state), "the saved weights are not the trained ones"
    loaded = vitkit.load_model(run / "checkpoints" / "last").state_dict()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    reference = json.loads((run / "eval" / "test" / "metrics.json").read_text())  # the train loop's NHWC model
    capsys.readouterr()
    assert main(["eval", str(run), "--amp", "none", "--out", str(tmp_path / "ev")]) == 0
    ours = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert ours["num_samples"] == reference["num_samples"] == 16
    assert ours["top1"] == reference["top1"] and ours["loss"] == pytest.approx(reference["loss"], rel=1e-5)


def _trainer(recipe: dict, tmp_path) -> Trainer:
    threads = torch.get_num_threads()
    try:
        return Trainer(resolve(recipe), tmp_path / "run", DistInfo(), torch.device("cpu"), threads=1)
    finally:
        torch.set_num_threads(threads)


def test_a_family_without_overlapping_convolutions_is_warned_and_converted(tmp_path, caplog):
    warning = "has no convolution beyond a patchify stem"
    with caplog.at_level("WARNING", logger="vitkit"):
        vit = _trainer(_recipe("vit_tiny_patch16_224", ema=True), tmp_path / "vit")
    lines = [r.getMessage() for r in caplog.records if warning in r.getMessage()]
    assert lines == [f"train.channels_last: vit_tiny_patch16_224 {warning} (FamilyModel.convolutional), so the "
                     f"NHWC memory order gains it little"]
    for model in (vit.model, vit.ema.module):  # the EMA copy is taken after the conversion
        kernel = model.patch_embed.proj.weight
        assert _nhwc(kernel) and not kernel.is_contiguous()
    caplog.clear()
    with caplog.at_level("WARNING", logger="vitkit"):
        _trainer(_recipe(), tmp_path / "cvt")
    assert warning not in caplog.text


def test_channels_last_is_a_typed_key_refused_with_fsdp():
    assert resolve(_recipe()).train.channels_last is True
    assert resolve({**_recipe(), "train": {"steps": 2}}).train.channels_last is False
    with pytest.raises(ConfigError, match=r"^train\.channels_last: FSDP2 shards contiguous parameters only"):
        resolve(_recipe(strategy="fsdp"))
    with pytest.raises(ConfigError, match=r"train\.channels_last"):
        resolve(_recipe(channels_last="sometimes"))


def test_fsdp2_refuses_nhwc_parameters_which_is_why_the_recipe_does():
    """The reason for the refusal above, in a one-process gloo group: when a torch release shards NHWC parameters,
    this fails and the refusal can go."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("this torch build has no gloo backend")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with pytest.raises(NotImplementedError, match="non-contiguous parameters"):
            fully_shard(nn.Conv2d(3, 4, 3).to(memory_format=NHWC))
        fully_shard(nn.Conv2d(3, 4, 3))  # the same layer, contiguous, shards
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------ benchmark
@pytest.mark.parametrize("mode", ["infer", "train"])
def test_bench_step_runs_nhwc_weights_on_an_nhwc_batch(mode):
    model = _tiny("pvt_v2_b0", num_classes=10)
    x = _input(model)
    seen = []
    handle = model.register_forward_pre_hook(lambda m, args: seen.append(_nhwc(args[0])))
    try:
        make_step(model, x, BenchSettings(mode=mode), num_classes=10)()
        make_step(model, x, BenchSettings(mode=mode, channels_last=True), num_classes=10)()
    finally:
        handle.remove()
    assert seen == [False, True]
    assert all(_nhwc(w) for w in _conv_weights(model).values())
    assert not model.patch_embed.proj.weight.is_contiguous()  # a 7x7 kernel over 3 channels: really reordered


def test_bench_cli_passes_channels_last_and_warns_a_patchify_model(monkeypatch, capsys):
    import vitkit.bench.memory as memory
    import vitkit.bench.runner as runner
    taken = []

    def fake_benchmark(model, settings, input_size, **kw):  # the settings the CLI built; nothing is timed
        taken.append(settings)
        return runner.summarize("vitkit", [0.1], settings.batch_size)

    monkeypatch.setattr(runner, "benchmark", fake_benchmark)
    monkeypatch.setattr(memory, "measure", lambda *a, **kw: pytest.fail("--memory ran with --channels-last"))
    tiny = ["--set", "depth=1", "--set", "embed_dim=16", "--set", "num_heads=2", "--img-size", "32"]
    assert main(["bench", "vit_tiny_patch16_224", *tiny, "--batch-size", "2", "--probes", "0",
                 "--channels-last"]) == 0
    out = capsys.readouterr().out
    assert "eager, infer, channels_last," in out
    assert "warning: --channels-last: vit_tiny_patch16_224 has no convolution beyond a patchify stem" in out
    assert main(["bench", "vit_tiny_patch16_224", *tiny, "--batch-size", "2", "--probes", "0"]) == 0
    assert "channels_last" not in capsys.readouterr().out
    assert [s.channels_last for s in taken] == [True, False]
    assert main(["bench", "vit_tiny_patch16_224", "--memory", "ddp", "--channels-last"]) == 2
    assert "drop --channels-last" in capsys.readouterr().err
