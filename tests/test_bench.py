"""The benchmark machinery on tiny models and few iterations: sane numbers, a real training step, an exact
transformers twin, parseable JSON. (Speed itself is measured by commands, see vitkit/bench/README.md.)"""
from __future__ import annotations

import json
import time

import pytest
import torch

import vitkit
from vitkit.bench.compare import compare_to_transformers, randomize_heads_, to_transformers
from vitkit.bench.machine import GemmProbe, copy_bandwidth
from vitkit.bench.runner import BenchSettings, benchmark, make_step, summarize
from vitkit.cli.main import main
from vitkit.families.vit.formats import from_hf, hf_keymap
from vitkit.weights.load_report import LoadReport

from conftest import randomize_, require, skip_or_fail
from test_flops import vit_macs_by_hand

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10)
FAST = BenchSettings(batch_size=2, warmup=1, iters=3, probes=1, probe_size=128)
# TINY's forward MACs per image written out (tests/test_flops.py): 16 patches + the class token, width 32, MLP 128
MACS = vit_macs_by_hand(N=16, prefix=1, D=32, hidden=128, depth=2, C=3, P=8, classes=10)
PATCH_EMBED_MACS = 16 * 32 * 3 * 8 * 8  # the one layer whose input (the image) gets no gradient


def _tiny(name: str = "vit_tiny_patch16_224", **kw) -> torch.nn.Module:
    return randomize_(vitkit.create_model(name, **{**TINY, **kw}))


def _sleeping(model: torch.nn.Module, ms: float) -> torch.nn.Module:
    """Each forward pass also sleeps ``ms``: a step time known independently of the benchmark's own clock."""
    model.register_forward_hook(lambda *_: time.sleep(ms / 1e3))
    return model


SLACK_MS = 25.0  # compute of a tiny model plus scheduling delays on a loaded 2-core machine


def test_benchmark_numbers_follow_a_known_step_time():
    res = benchmark(_sleeping(_tiny(), 40.0), FAST)
    assert len(res.times_ms) == 3 and res.first_step_s >= 0.040
    assert 40.0 <= res.latency_ms_min <= res.latency_ms_median <= res.latency_ms_p90 < 40.0 + SLACK_MS
    assert 2 / (0.040 + SLACK_MS / 1e3) < res.images_per_s <= 2 / 0.040
    assert res.step_gflops_per_image == pytest.approx(2 * MACS / 1e9, rel=1e-12)
    assert 2 * MACS * 2 / (0.040 + SLACK_MS / 1e3) / 1e9 < res.achieved_gflops <= 2 * MACS * 2 / 0.040 / 1e9
    assert res.peak_mem_mb is None or res.peak_mem_mb >= 0
    assert res.peak_gflops > 0 and res.peak_fraction == pytest.approx(res.achieved_gflops / res.peak_gflops)


def test_training_step_updates_the_weights_and_counts_backward_flops():
    model = _tiny()
    before = model.blocks[0].mlp.fc1.weight.detach().clone()
    res = benchmark(model, BenchSettings(batch_size=2, warmup=1, iters=2, probes=0, mode="train"))
    assert model.training and not torch.equal(before, model.blocks[0].mlp.fc1.weight)
    # backward = 2 x forward for every layer except the patch embedding (no gradient for the image)
    assert res.step_gflops_per_image == pytest.approx(2 * (3 * MACS - PATCH_EMBED_MACS) / 1e9, rel=1e-12)
    assert res.images_per_s > 0 and res.peak_fraction is None  # no probe asked for


def test_bf16_autocast_steps_run():
    model = _tiny()
    x = torch.randn(2, 3, 32, 32)
    for mode in ("infer", "train"):
        make_step(model, x, BenchSettings(dtype="bf16", mode=mode), num_classes=10)()


def test_summarize_statistics():
    res = summarize("m", [0.1, 0.2, 0.3, 0.4, 1.0], batch_size=4)
    assert res.latency_ms_median == pytest.approx(300) and res.latency_ms_p90 == pytest.approx(1000)
    assert res.images_per_s == pytest.approx(4 / 0.3)


def test_machine_probes_are_positive():
    assert GemmProbe(64).sample() > 0
    bw = copy_bandwidth(mbytes=4, repeats=2)
    assert bw["best"] >= bw["median"] > 0


# ------------------------------------------------------------------------------------------- vs transformers
@pytest.fixture
def transformers():
    return require("transformers")


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"])
def test_transformers_twin_computes_the_same_logits(name, transformers):
    model = _tiny(name, act_layer="gelu_tanh", norm_eps=1e-12, qkv_bias=False).eval()
    hf = to_transformers(model)
    assert type(hf).__name__ == ("DeiTForImageClassificationWithTeacher" if "distilled" in name
                                 else "ViTForImageClassification")
    assert hf.config.layer_norm_eps == 1e-12 and hf.config.hidden_act == "gelu_pytorch_tanh"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours, theirs = model(x), hf(pixel_values=x).logits
    assert ours.abs().max() > 0.1  # not a vacuous comparison
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("layout", ["4", "5"])
def test_twin_table_round_trips_through_the_importer(layout, transformers):
    """The twin writes transformers keys with the inverse of the importer's table: reading them back is exact."""
    model = _tiny("deit_tiny_distilled_patch16_224")
    written = hf_keymap(layout, distilled=True).inverse(model.state_dict())
    marker = "encoder.layer.0.attention.attention.query.weight" if layout == "4" else "layers.0.attention.q_proj.weight"
    assert marker in written and "cls_classifier.weight" in written
    back = from_hf(written, LoadReport("roundtrip"))
    ours = model.state_dict()
    assert sorted(back) == sorted(ours)
    assert all(torch.equal(back[k], ours[k]) for k in ours)
    assert written[marker].data_ptr() != model.blocks[0].attn.qkv.weight.data_ptr()  # split q is a copy


def test_comparison_reports_both_sides_and_equal_outputs(transformers):
    """The twin of a model that sleeps 150 ms per forward sleeps 450 ms: vitkit must come out ~3x faster (sleeps long
    enough that the tiny models' own compute, slowed by a loaded machine, barely moves the ratio)."""
    model = _tiny()
    hf = _sleeping(to_transformers(model), 450.0)
    cmp = compare_to_transformers(_sleeping(model, 150.0), FAST, hf=hf)
    assert cmp.max_abs_diff < 1e-4
    assert 2.4 < cmp.speed_ratio < 3.3, cmp.speed_ratio  # (450 + overhead) / (150 + overhead)
    assert 450.0 <= cmp.theirs.latency_ms_median < 450.0 + 2 * SLACK_MS and 150.0 <= cmp.ours.latency_ms_median
    for side in (cmp.ours, cmp.theirs):  # the same function, so the same FLOPs: the count written out by hand
        assert side.step_gflops_per_image == pytest.approx(2 * MACS / 1e9, rel=1e-12)
        assert side.peak_fraction > 0
    assert cmp.attn_implementation == "sdpa"


def test_unsupported_architecture_is_refused_by_name(transformers):
    with pytest.raises(ValueError, match="global_pool"):
        to_transformers(_tiny(global_pool="avg"))


def test_randomize_heads_only_touches_zero_heads():
    model = vitkit.create_model("vit_tiny_patch16_224", **TINY)
    assert not model.head.weight.any()
    randomize_heads_(model)
    w = model.head.weight.detach().clone()
    assert w.any()
    randomize_heads_(model, seed=1)
    assert torch.equal(w, model.head.weight)


# ---------------------------------------------------------------------------------------------------- the CLI
def _cli(*extra: str) -> list[str]:
    return ["bench", "vit_tiny_patch16_224", "--img-size", "32", "--set", "patch_size=8", "--set", "embed_dim=32",
            "--set", "depth=2", "--set", "num_heads=2", "--set", "num_classes=10", "--batch-size", "2",
            "--warmup", "1", "--iters", "2", "--probes", "1", "--probe-size", "128", *extra]


def test_bench_cli_compare_writes_json(tmp_path, capsys, transformers):
    out = tmp_path / "bench.json"
    assert main(_cli("--compare", "transformers", "--json", str(out))) == 0
    printed = capsys.readouterr().out
    assert "vitkit / transformers" in printed and "load average" in printed
    report = json.loads(out.read_text())
    cmp = report["comparison"]
    assert cmp["max_abs_diff"] < 1e-4 and cmp["ours"]["images_per_s"] > 0 and cmp["theirs"]["images_per_s"] > 0
    assert report["input_size"] == [3, 32, 32] and report["overrides"]["patch_size"] == 8
    assert report["settings"]["mode"] == "infer" and report["env"]["loadavg_end"] is not None


def test_bench_cli_train_mode(tmp_path):
    out = tmp_path / "train.json"
    assert main(_cli("--mode", "train", "--json", str(out))) == 0
    res = json.loads(out.read_text())["result"]
    assert res["images_per_s"] > 0 and res["step_gflops_per_image"] > 0


def _forwards_during(argv: list[str]) -> list[tuple[bool, torch.dtype, torch.dtype]]:
    """Run the CLI, recording (autocast enabled on CPU, autocast dtype, output dtype) of every vitkit model forward."""
    calls = []

    def hook(module, args, output):
        if isinstance(module, vitkit.families.vit.model.VisionTransformer) and output.device.type != "meta":  # not FLOP counts
            calls.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), output.dtype))

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        assert main(argv) == 0
    finally:
        handle.remove()
    return calls


@pytest.mark.parametrize("mode", ["infer", "train"])
def test_bench_cli_dtype_bf16_runs_every_step_under_autocast(tmp_path, capsys, mode):
    out = tmp_path / "bench.json"
    bf16 = _forwards_during(_cli("--dtype", "bf16", "--mode", mode, "--json", str(out)))
    assert len(bf16) >= 1 + 1 + 2 and all(c == (True, torch.bfloat16, torch.bfloat16) for c in bf16), bf16
    assert "bf16" in capsys.readouterr().out and json.loads(out.read_text())["settings"]["dtype"] == "bf16"
    fp32 = _forwards_during(_cli("--mode", mode))
    assert all(not on and dtype == torch.float32 for on, _, dtype in fp32)


def test_bench_cli_compile_runs_the_compiled_model(capsys, eager_compile):
    """--compile hands the model to torch.compile and times what it returns (dynamo's eager backend here, see
    conftest.eager_compile; the slow test below compiles with inductor)."""
    from torch._dynamo.utils import counters
    assert main(_cli("--compile")) == 0
    assert len(eager_compile) == 1 and isinstance(eager_compile[0], vitkit.families.vit.model.VisionTransformer)
    assert counters["frames"]["ok"] >= 1 and counters["stats"]["unique_graphs"] >= 1  # dynamo captured the model
    assert "compiled" in capsys.readouterr().out


@pytest.mark.slow
def test_bench_cli_compile_with_inductor(capsys):
    assert main(_cli("--compile")) == 0
    assert "compiled" in capsys.readouterr().out


@pytest.mark.serial
def test_bench_cli_machine_bounded(tmp_path, capsys, monkeypatch):
    """--machine at one thread, with small GEMMs (256) and a small copy (8 MB) instead of 2048-4096 and 1 GB; its
    fp32 GEMM rate against the best of ten 256x256 products timed here."""
    from vitkit.bench import machine
    monkeypatch.setattr(machine, "gemm_size", lambda dtype, device, seconds: 256)  # the bounded run's GEMM size
    copy = machine.copy_bandwidth
    monkeypatch.setattr(machine, "copy_bandwidth", lambda mbytes, *args: copy(8, *args))
    threads = torch.get_num_threads()
    out = tmp_path / "machine.json"
    assert main(["bench", "--machine", "--threads", "1", "--json", str(out)]) == 0
    assert torch.get_num_threads() == 1  # --threads sets the process's threads for the command
    torch.set_num_threads(threads)
    limits = json.loads(out.read_text())["machine"]["by_threads"]
    assert list(limits) == ["1"]
    for key in ("gemm_fp32_gflops", "gemm_bf16_gflops", "copy_gbps"):
        assert limits["1"][key]["n"] == 5 and limits["1"][key]["best"] >= limits["1"][key]["median"] > 0
    assert "threads=1: fp32 GEMM" in capsys.readouterr().out
    torch.set_num_threads(1)
    a, b = torch.randn(256, 256), torch.randn(256, 256)
    own = 0.0
    for _ in range(10):
        start = time.perf_counter()
        torch.mm(a, b)
        own = max(own, 2 * 256 ** 3 / (time.perf_counter() - start) / 1e9)
    torch.set_num_threads(threads)
    assert 0.6 * own < limits["1"]["gemm_fp32_gflops"]["best"] < 1.6 * own, (limits["1"]["gemm_fp32_gflops"], own)


def test_bench_cli_errors_name_the_problem(capsys):
    assert main(["bench", "vit_tiny_patch16_224", "--set", "depht=2"]) == 2
    assert "depht" in capsys.readouterr().err
    assert main(["bench"]) == 2


def test_quiet_mode_terminates_and_keeps_every_round_after_the_deadline():
    from vitkit.bench.runner import interleave
    calls = []
    timed = interleave({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 3, "cpu",
                       quiet=-1.0, max_wait=0.2)  # never quiet enough: waits out the deadline, then counts all
    assert len(timed.times["a"]) == len(timed.times["b"]) == 3
    assert calls[:2] in (["a", "b"], ["b", "a"]) and len(calls) == 6 + 2 * timed.discarded_rounds


def test_cpu_monitor_counts_page_faults_of_fresh_memory():
    from vitkit.bench.machine import CpuMonitor
    with CpuMonitor() as mon:
        torch.ones(64 * 2 ** 20 // 4)  # 64 MiB of freshly mapped memory: above glibc's mmap threshold even after it
        # has grown (it follows the largest block freed so far, up to 32 MiB), so the pages are new whatever ran before
    if mon.minor_faults is None:
        skip_or_fail("no getrusage on this platform")
    assert mon.minor_faults > 100
    assert mon.foreign_cores is None or mon.foreign_cores >= 0
