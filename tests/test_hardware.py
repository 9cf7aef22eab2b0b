"""Mixed precision chosen by the hardware (issue 9, item 2): ``auto`` is bf16 where the device runs it natively and
fp32 elsewhere, in train, eval, predict and bench alike; both branches are tested by replacing the probe. Devices
that do not exist are one-line errors naming the flag (item 7)."""
from __future__ import annotations

import argparse
import json
import logging

import pytest
import torch

from vitkit import hardware
from vitkit.hardware import amp_dtype, machine_line, parse_device, resolve_amp


@pytest.fixture
def native_bf16(monkeypatch):
    """Make the probe answer ``value`` (as if on a CPU with / without native bf16)."""
    def set_to(value: bool):
        monkeypatch.setattr(hardware, "bf16_native", lambda device="cpu": value)
    return set_to


def test_probe_is_torch_onednn_check_on_this_cpu():
    assert hardware.bf16_native("cpu") == bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert hardware.bf16_native("meta") is False


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "none")])
def test_auto_follows_the_probe(native_bf16, native, expected):
    native_bf16(native)
    assert resolve_amp("auto", "cpu") == expected
    for explicit in ("bf16", "fp16", "none"):  # an explicit choice is kept whatever the hardware
        assert resolve_amp(explicit, "cpu") == explicit
    with pytest.raises(ValueError, match="fp8"):
        resolve_amp("fp8", "cpu")


def test_amp_dtypes():
    assert amp_dtype("none") is None
    assert amp_dtype("bf16") is torch.bfloat16 and amp_dtype("fp16") is torch.float16


def test_machine_line_names_cpu_cores_bf16_and_avx512():
    line = machine_line()
    info = hardware.cpu_info()
    assert line.startswith(str(info["model"]))
    assert f"{info['cores']} core" in line
    assert f"bf16 native: {'yes' if info['bf16_native'] else 'no'}" in line
    assert f"AVX-512: {'yes' if info['avx512'] else 'no'}" in line


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "fp32")])
def test_training_default_is_auto_and_logged_once(tmp_path, native_bf16, caplog, native, expected):
    from vitkit.train import load_recipe, train
    native_bf16(native)
    cfg = load_recipe(None, ["data.name=fake", "data.img_size=16", "data.train_limit=32", "data.test_limit=8",
                             "data.num_workers=0", "model.overrides={patch_size: 4, depth: 1, embed_dim: 24, "
                             "num_heads: 2}", "train.steps=1", "train.batch_size=8", "log.plots=false",
                             "log.tensorboard=false", "log.progress=false"])
    assert cfg.train.amp == "auto"
    with caplog.at_level(logging.INFO, logger="vitkit"):
        result = train(cfg, tmp_path / "run")
    assert result.summary["environment"]["precision"] == expected
    assert result.summary["environment"]["cpu"] == machine_line()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("precision:")]
    assert lines == [f"precision: auto -> {expected} (bf16 is {'native' if native else 'not native'} on "
                     f"{machine_line()})"]


@pytest.mark.parametrize("native", [True, False])
def test_eval_and_predict_amp_default_auto(native_bf16, native):
    from vitkit.cli import eval as eval_cli
    from vitkit.cli import predict as predict_cli
    native_bf16(native)
    for module, argv in ((eval_cli, []), (predict_cli, ["x.png"])):
        parser = argparse.ArgumentParser()
        module.add_arguments(parser)
        args = parser.parse_args(argv)
        assert args.amp == "auto"
        assert eval_cli.precision(args, torch.device("cpu")) is (torch.bfloat16 if native else None)


@pytest.mark.parametrize("native", [True, False])
def test_bench_dtype_auto(native_bf16, native):
    from vitkit.cli import bench
    native_bf16(native)
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["vit_tiny_patch16_224"])
    assert args.dtype == "auto"
    assert bench._dtype(args) == ("bf16" if native else "fp32")
    assert bench._dtype(parser.parse_args(["m", "--dtype", "fp32"])) == "fp32"


def test_bench_prints_the_machine_line(tmp_path, capsys):
    from vitkit.cli.main import main
    out = tmp_path / "b.json"
    assert main(["bench", "vit_tiny_patch16_224", "--img-size", "32", "--set", "patch_size=16", "--set", "depth=1",
                 "--batch-size", "1", "--iters", "1", "--warmup", "0", "--probes", "0", "--threads", "1",
                 "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"machine: {machine_line()}")
    report = json.loads(out.read_text())
    assert report["env"]["cpu"] == machine_line()
    assert report["settings"]["dtype"] == ("bf16" if hardware.bf16_native("cpu") else "fp32")


def test_parse_device():
    assert parse_device("cpu") == torch.device("cpu")
    assert parse_device(None).type in ("cpu", "cuda", "mps")
    with pytest.raises(ValueError, match=r"^--device gpu0: not a device name"):
        parse_device("gpu0")
    with pytest.raises(ValueError, match=r"^train.device xla: vitkit runs on cpu, cuda or mps"):
        parse_device("xla", what="train.device")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"^--device cuda(:1)?: (this torch build has no CUDA|no CUDA GPU)"):
            parse_device("cuda:1")
