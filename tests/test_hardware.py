"""Mixed precision chosen by the hardware: ``auto`` is bf16 where the device runs it natively and
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
    """Make the probe answer as a CPU with native bf16 (Intel AMX) or without (AVX2-only AMD EPYC), through the same
    switch a user or a subprocess would use (``VITKIT_CPU_KIND``)."""
    def set_to(value: bool):
        monkeypatch.setenv(hardware.CPU_KIND_ENV, "amx" if value else "avx2")
    return set_to


def test_probe_is_torch_onednn_check_on_this_cpu(monkeypatch):
    monkeypatch.delenv(hardware.CPU_KIND_ENV, raising=False)
    assert hardware.bf16_native("cpu") == bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert hardware.bf16_native("meta") is False


@pytest.mark.parametrize("kind", sorted(hardware.CPU_KINDS))
def test_simulated_cpu_kinds_drive_every_flag_and_name_themselves(kind, monkeypatch):
    monkeypatch.delenv(hardware.CPU_KIND_ENV, raising=False)  # the suite may itself run under a simulated kind
    real_model = hardware.cpu_info()["model"]
    with hardware.simulate_cpu(kind):
        flags = hardware.cpu_flags()
        assert flags == hardware.CPU_KINDS[kind]
        assert hardware.bf16_native("cpu") is flags["bf16_native"]
        line = machine_line()
        assert f"(simulating {kind})" in line  # a number measured under simulation never names the real CPU alone
        assert f"VNNI: {'yes' if flags['vnni'] else 'no'}, AMX: {'yes' if flags['amx'] else 'no'}" in line
    assert hardware.cpu_info()["model"] == real_model and "simulating" not in machine_line()


def test_an_unknown_simulated_kind_is_named(monkeypatch):
    monkeypatch.setenv(hardware.CPU_KIND_ENV, "zen9")
    with pytest.raises(ValueError, match="VITKIT_CPU_KIND='zen9': not a CPU kind"):
        hardware.cpu_flags()
    with pytest.raises(ValueError, match="not a CPU kind: 'm1'"):
        with hardware.simulate_cpu("m1"):
            pass


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
def test_eval_and_predict_default_to_fp32_on_every_cpu(native_bf16, native):
    """One number on every CPU: fp32 unless asked; ``--amp auto`` is the opt-in fast path that follows the probe."""
    from vitkit.cli import eval as eval_cli
    from vitkit.cli import predict as predict_cli
    native_bf16(native)
    for module, argv in ((eval_cli, []), (predict_cli, ["x.png"])):
        parser = argparse.ArgumentParser()
        module.add_arguments(parser)
        args = parser.parse_args(argv)
        assert eval_cli.precision(args, torch.device("cpu")) is None
        assert args.precision_line == "precision: fp32"
        args = parser.parse_args([*argv, "--amp", "auto"])
        assert eval_cli.precision(args, torch.device("cpu")) is (torch.bfloat16 if native else None)
        assert args.precision_line.endswith("(opt-in fast path; the default is fp32)")


@pytest.mark.parametrize("native", [True, False])
def test_eval_of_a_run_defaults_to_the_precision_of_its_own_test(native_bf16, native):
    from vitkit.cli import eval as eval_cli
    native_bf16(native)
    parser = argparse.ArgumentParser()
    eval_cli.add_arguments(parser)
    args = parser.parse_args([])
    assert eval_cli.precision(args, torch.device("cpu"), run_precision="bf16") is torch.bfloat16
    assert "the run's own test precision" in args.precision_line
    assert eval_cli.precision(args, torch.device("cpu"), run_precision="fp32") is None
    args = parser.parse_args(["--amp", "none"])
    assert eval_cli.precision(args, torch.device("cpu"), run_precision="bf16") is None


@pytest.mark.parametrize("native", [True, False])
def test_bench_dtype_defaults_to_fp32_and_auto_follows_the_probe(native_bf16, native):
    from vitkit.cli import bench
    native_bf16(native)
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["vit_tiny_patch16_224"])
    assert bench._dtype(args) == "fp32"
    assert bench._dtype(parser.parse_args(["m", "--dtype", "auto"])) == ("bf16" if native else "fp32")


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
    assert report["settings"]["dtype"] == "fp32"  # the default on every CPU


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


@pytest.mark.parametrize("train_amp, simulated", [("none", "amx"), ("bf16", "avx2")])
def test_vitkit_eval_of_a_run_reproduces_its_own_test_number_on_any_cpu(tmp_path, monkeypatch, capsys, train_amp,
                                                                           simulated):
    """A run trained in fp32 evaluated where ``auto`` would pick bf16, and a bf16 run evaluated where it would not:
    ``vitkit eval RUN`` reproduces the run's final test report either way (it printed 99.44% in bf16 for a demo run
    that reported 99.16% in fp32)."""
    from vitkit.cli.main import main
    from vitkit.train import load_recipe, train
    cfg = load_recipe(None, ["data.name=digits", "data.img_size=16", "data.num_workers=0", "data.val_fraction=0.1",
                             "model.overrides={patch_size: 8, depth: 1, embed_dim: 24, num_heads: 2}",
                             "train.steps=40", "train.batch_size=32", "optim.lr=3e-3", "optim.schedule=constant",
                             "train.threads=1", f"train.amp={train_amp}",
                             "log.plots=false", "log.tensorboard=false", "log.progress=false"])
    threads = torch.get_num_threads()
    try:
        train(cfg, tmp_path / "run")
    finally:
        torch.set_num_threads(threads)
    reference = json.loads((tmp_path / "run" / "eval" / "test" / "metrics.json").read_text())
    monkeypatch.setenv(hardware.CPU_KIND_ENV, simulated)
    assert main(["eval", str(tmp_path / "run"), "--out", str(tmp_path / "ev")]) == 0
    ours = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert ours["top1"] == reference["top1"] and ours["loss"] == pytest.approx(reference["loss"], rel=1e-6, abs=0)
    assert ("precision: bf16" if train_amp == "bf16" else "precision: fp32") in capsys.readouterr().out
