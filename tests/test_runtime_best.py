"""`--runtime best` and `vitkit export --fastest`: the fastest path that keeps >= 99% top-1 agreement with eager fp32
on real images. Every choice here is made with an injected timer (no timing is measured), and every agreement is
checked against a brute-force count: each image run on its own through eager fp32 and through the path."""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, randomize_, require, skip_or_fail
from torch import nn

import vitkit
from vitkit import hardware
from vitkit.cli.main import main
from vitkit.deploy import best
from vitkit.deploy.best import MIN_AGREEMENT, BuiltPath

NAME = "deit_tiny_patch16_224"
SHARED = Path(os.environ.get("VITKIT_SHARED", REPO.parent / "shared"))
FAST_PATHS = ("eager-fp32", "eager-bf16", "onnxruntime-fp32", "onnxruntime-int8")  # the cheap ones to build
BATCH = 4


def tiny_model(seed: int = 0) -> nn.Module:
    model = vitkit.create_model(NAME, **vitkit.get_spec(NAME).tiny, num_classes=10)
    return randomize_(model, seed).eval()


class Timer:
    """Injected timer: fixed seconds per batch by path (unlisted paths: 1 s); records what it was asked to time."""

    description = "injected timer"

    def __init__(self, seconds: dict[str, float]):
        self.seconds, self.timed = seconds, []

    def __call__(self, steps):
        self.timed.append(sorted(steps))
        for step in steps.values():  # every step must run
            step()
        return {name: self.seconds.get(name, 1.0) for name in steps}


def brute_force_agreement(model: nn.Module, path: nn.Module, images: torch.Tensor, batch: int = 1) -> int:
    """Images whose top-1 class ``path`` and eager ``model`` agree on, run ``batch`` at a time."""
    with torch.no_grad():
        return sum(int((model(x).argmax(-1) == path(x).float().argmax(-1)).sum()) for x in images.split(batch))


def quantised_weights(model: nn.Module, bits: int) -> nn.Module:
    """A copy with every Linear weight rounded symmetrically per output channel to ``bits`` bits (2: -1, 0, +1 times
    the channel's max |w|): a deliberately bad quantisation."""
    q = copy.deepcopy(model)
    levels = 2 ** (bits - 1) - 1
    with torch.no_grad():
        for m in q.modules():
            if isinstance(m, nn.Linear):
                scale = m.weight.abs().amax(1, keepdim=True) / levels  # (out, 1)
                m.weight.copy_((m.weight / scale).round().clamp(-levels, levels) * scale)
    return q


class PerturbedLogits(nn.Module):
    """The model's logits plus noise of ``scale`` times their spread, seeded by each image (batch-independent)."""

    def __init__(self, model: nn.Module, scale: float):
        super().__init__()
        self.model, self.scale = model, scale

    def forward(self, x):
        out = self.model(x)
        seeds = [int(1e3 * image.abs().sum()) for image in x]
        noise = torch.stack([torch.randn(out.shape[1], generator=torch.Generator().manual_seed(s)) for s in seeds])
        return out + self.scale * out.std(-1, keepdim=True) * noise


@pytest.fixture(scope="module")
def photos_dir() -> Path:
    photos = best.shipped_photos()
    if photos is None:
        skip_or_fail("the shipped photos were not found (set VITKIT_SHARED to the shared folder)")
    return photos


@pytest.fixture(scope="module")
def tiny(photos_dir):
    model = tiny_model()
    return model, best.agreement_images(model)


@pytest.fixture(scope="module")
def built(tiny, tmp_path_factory):
    """The cheap real paths of the tiny model, built once (under the AVX2 probe: no bf16)."""
    model, _ = tiny
    with hardware.simulate_cpu("avx2"):
        return best.build_paths(model, tmp_path_factory.mktemp("paths"), names=FAST_PATHS)


def by_name(paths: list[BuiltPath]) -> dict[str, BuiltPath]:
    return {b.name: b for b in paths}


# ------------------------------------------------------------------------------------------------- the gate
def test_a_quantisation_that_breaks_agreement_is_refused_even_when_fastest(tiny, built):
    model, images = tiny
    bad = [BuiltPath("weights-2bit", quantised_weights(model, 2)), BuiltPath("logits-noise", PerturbedLogits(model, 1.0))]
    for b in bad:  # the premise: both really change answers
        assert brute_force_agreement(model, b.module, images.images) < MIN_AGREEMENT * len(images.images)
    timer = Timer({"weights-2bit": 0.01, "logits-noise": 0.02, "onnxruntime-int8": 0.5, "onnxruntime-fp32": 0.6,
                   "eager-fp32": 1.0})
    choice = best.choose([*built, *bad], images, BATCH, timer)
    for b in bad:
        row = choice.row(b.name)
        assert row.status == "refused" and row.reason.startswith(f"agreement {row.agree}/29")
        assert row.agree == brute_force_agreement(model, b.module, images.images)
    assert choice.chosen not in ("weights-2bit", "logits-noise")
    assert timer.timed == [sorted(["eager-fp32", "onnxruntime-fp32", "onnxruntime-int8", "weights-2bit",
                                   "logits-noise"])]  # not the path that is not available


@pytest.mark.parametrize("seconds", [
    {"onnxruntime-int8": 0.2, "onnxruntime-fp32": 0.3, "eager-fp32": 1.0},
    {"onnxruntime-int8": 2.0, "onnxruntime-fp32": 0.3, "eager-fp32": 1.0},
    {"onnxruntime-int8": 2.0, "onnxruntime-fp32": 3.0, "eager-fp32": 1.0},
    {"onnxruntime-int8": 1.0, "onnxruntime-fp32": 1.0, "eager-fp32": 1.0},  # a tie: fp32 eager, listed first
], ids=["int8-fastest", "ort-fastest", "eager-fastest", "tie"])
def test_the_fastest_qualifying_path_is_chosen(tiny, built, seconds):
    model, images = tiny
    choice = best.choose(built, images, BATCH, Timer(seconds))
    n = len(images.images)
    paths = by_name(built)
    agree = {name: brute_force_agreement(model, paths[name].module, images.images, BATCH) for name in seconds}
    qualifying = [name for name in seconds if agree[name] >= MIN_AGREEMENT * n]
    expected = min(qualifying, key=lambda name: (seconds[name], FAST_PATHS.index(name)))
    assert choice.chosen == expected and choice.module is paths[expected].module
    for name, s in seconds.items():
        row = choice.row(name)
        assert (row.agree, row.total) == (agree[name], n)
        assert row.images_per_s == pytest.approx(BATCH / s) and row.speedup == pytest.approx(seconds["eager-fp32"] / s)
        assert row.status == ("chosen" if name == expected else "refused")


def test_the_table_shows_speed_agreement_and_every_decision(tiny, built):
    _, images = tiny
    choice = best.choose(built, images, BATCH, Timer({"onnxruntime-fp32": 0.25, "onnxruntime-int8": 0.2}))
    lines = choice.table_lines()
    assert lines[0].split() == ["path", "img/s", "×", "eager", "fp32", "agreement", "decision"]
    rows = {line.split()[0]: line for line in lines[1:5]}
    assert set(rows) == set(FAST_PATHS)
    assert rows["eager-fp32"].split()[1:4] == ["4.00", "1.00×", "29/29"]
    assert rows["onnxruntime-fp32"].split()[1:3] == ["16.00", "4.00×"]
    assert "not available: bf16 is not native on this CPU" in rows["eager-bf16"]
    int8 = choice.row("onnxruntime-int8")
    assert f"{int8.agree}/29" in rows["onnxruntime-int8"]
    decision = "chosen" if int8.agree >= MIN_AGREEMENT * 29 else f"refused: agreement {int8.agree}/29"
    assert decision in rows["onnxruntime-int8"]
    assert "29 photos" in lines[5] and ">= 99%" in lines[5] and f"chosen: {choice.chosen}" in lines[6]


def test_a_model_whose_logits_ignore_the_input_is_refused(photos_dir):
    model = tiny_model()
    nn.init.zeros_(model.head.weight)
    nn.init.zeros_(model.head.bias)
    with pytest.raises(ValueError, match="same logits"):
        best.check_reference(model, best.agreement_images(model))


def test_the_default_timer_interleaves_warmup_and_rounds():
    calls = []
    timer = best.default_timer(warmup=2, rounds=3)
    out = timer({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")})
    # warm-up, then alternating order, each timed step right after an untimed one of the same path (another runtime's
    # spinning threads wind down during it)
    assert calls == ["a", "b"] * 2 + ["a", "a", "b", "b", "b", "b", "a", "a", "a", "a", "b", "b"]
    assert set(out) == {"a", "b"} and all(s > 0 for s in out.values())


# ------------------------------------------------------------------------------------------------- CPU kinds
@pytest.mark.parametrize("kind", ["avx2", "amx"])
def test_the_cpu_kind_decides_whether_bf16_paths_are_attempted(tiny, tmp_path, monkeypatch, kind):
    """AVX2: no bf16 row is built (emulated bf16 is slower than fp32). AMX: eager bf16 autocast runs, and OpenVINO is
    asked for bf16 (on a CPU without it, OpenVINO computes in f32 and the row says so)."""
    from vitkit.deploy import export
    model, images = tiny
    asked = []
    real = export.export_model
    monkeypatch.setattr(export, "export_model", lambda *a, **kw: asked.append(kw["runtime"]) or real(*a, **kw))
    with hardware.simulate_cpu(kind):
        paths = by_name(best.build_paths(model, tmp_path, names=("eager-fp32", "eager-bf16", "openvino-bf16")))
        choice = best.choose(list(paths.values()), images, BATCH, Timer({"eager-bf16": 0.1}))
    if kind == "avx2":
        assert asked == [] and not list(tmp_path.iterdir())
        for name in ("eager-bf16", "openvino-bf16"):
            assert choice.row(name).decision().startswith("not available: bf16 is not native")
        return
    assert asked == ["openvino-bf16"]
    eager_bf16 = paths["eager-bf16"].module
    assert isinstance(eager_bf16, best.Autocast)
    with torch.no_grad():
        x = images.images[:2]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            expected = model(x).float()
        assert torch.equal(eager_bf16(x), expected)
    row = choice.row("eager-bf16")
    assert row.total == 29 and row.agree == brute_force_agreement(model, eager_bf16, images.images, BATCH)
    ov = paths["openvino-bf16"]
    if not hardware._real_cpu_flags()["bf16_native"]:
        assert ov.module is None and "OpenVINO computes in f32" in ov.reason
    else:
        assert ov.module is not None and ov.module.precision == "bf16"
    # the runtime `export --fastest` records in vitkit.json is the one the folder then opens in
    from vitkit.deploy.runtime import open_export_folder
    folder = tmp_path / "openvino-bf16"
    assert open_export_folder(folder).runtime == "openvino"
    meta = json.loads((folder / "vitkit.json").read_text())
    (folder / "vitkit.json").write_text(json.dumps({**meta, "runtime": "openvino-bf16"}))
    assert open_export_folder(folder).runtime == "openvino-bf16"


# ------------------------------------------------------------------------------------------------- commands
@pytest.fixture
def injected(monkeypatch):
    """The commands' timer and paths replaced: ONNX Runtime int8 fastest, then fp32, then eager."""
    timer = Timer({"onnxruntime-int8": 0.2, "onnxruntime-fp32": 0.3, "eager-fp32": 1.0})
    monkeypatch.setattr(best, "default_timer", lambda *a, **kw: timer)
    monkeypatch.setattr(best, "PATHS", tuple(s for s in best.PATHS if s.name in FAST_PATHS))
    monkeypatch.setenv(hardware.CPU_KIND_ENV, "avx2")
    return timer


@pytest.fixture(scope="module")
def saved(tmp_path_factory, photos_dir):
    folder = tmp_path_factory.mktemp("best") / "model"
    vitkit.save_pretrained(tiny_model(), folder, class_names=[f"c{i}" for i in range(10)])
    return folder


def expected_choice(rows: list[dict]) -> str:
    """The brute-force rule over a recorded table: fastest with agreement >= 99%, among exportable paths."""
    ok = [r for r in rows if r["total"] and r["agree"] >= MIN_AGREEMENT * r["total"] and r["path"] != "eager-fp32"]
    return max(ok, key=lambda r: r["images_per_s"])["path"]


def test_export_fastest_records_the_choice_and_predict_runs_that_export(saved, photos_dir, tmp_path, injected,
                                                                         capsys):
    ort = require("onnxruntime")
    out = tmp_path / "fast"
    assert main(["export", str(saved), str(out), "--fastest", "--batch-size", str(BATCH)]) == 0
    printed = capsys.readouterr().out
    meta = json.loads((out / "vitkit.json").read_text())
    record = meta["fastest"]
    assert record["chosen"] == expected_choice(record["table"])
    assert meta["runtime"] == "onnxruntime" and meta["int8"] == (record["chosen"] == "onnxruntime-int8")
    assert record["agreement"]["total"] == 29 and record["agreement"]["agree"] >= MIN_AGREEMENT * 29
    assert [r["path"] for r in record["table"]] == list(FAST_PATHS) and record["min_agreement"] == MIN_AGREEMENT
    assert record["table"][0]["reason"].startswith("not an export format")
    assert f"chosen: {record['chosen']}" in printed and f"wrote {out}" in printed
    # `vitkit predict --model OUT` runs the exported file: the same probabilities as ONNX Runtime on it, directly
    assert main(["predict", str(photos_dir), "--model", str(out), "--format", "json", "--topk", "1",
                 "--batch-size", "29"]) == 0
    predicted = json.loads(capsys.readouterr().out)
    images = best.agreement_images(vitkit.load_model(saved)).images.numpy()
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"pixel_values": images})[0]
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    assert [p["topk"][0]["index"] for p in predicted] == logits.argmax(1).tolist()
    assert [p["topk"][0]["prob"] for p in predicted] == pytest.approx(probs.max(1).tolist(), abs=1e-5)


def make_cifar10_run(root: Path) -> Path:
    """A run folder of the tiny model "trained" on CIFAR-10 (its checkpoint and config.yaml)."""
    cifar = SHARED / "data"
    if not (cifar / "cifar-10-batches-py").is_dir():
        skip_or_fail(f"CIFAR-10 not found under {cifar}")
    run = root / "run"
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    vitkit.save_pretrained(tiny_model(), run / "checkpoints" / "best", class_names=classes)
    (run / "config.yaml").write_text(f"data: {{name: cifar10, root: {cifar}, img_size: 32, test_limit: 2100, "
                                     f"num_workers: 0}}\n")
    return run


def test_eval_of_a_cifar10_run_adds_2000_test_images_and_reports_the_choice(tmp_path, photos_dir, injected, capsys):
    run = make_cifar10_run(tmp_path)
    assert main(["eval", str(run), "--runtime", "best", "--out", str(tmp_path / "ev"), "--batch-size", "64"]) == 0
    printed = capsys.readouterr().out
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    record = metrics["best"]
    assert record["images"].startswith("29 photos") and record["images"].endswith("+ 2000 CIFAR-10 test images")
    eager = next(r for r in record["table"] if r["path"] == "eager-fp32")
    assert eager["total"] == 2029 and eager["by_set"]["CIFAR-10 test images"] == [2000, 2000]
    assert injected.timed and record["batch_size"] == 64
    chosen = record["chosen"]
    assert chosen == max((r for r in record["table"] if r["total"] and r["agree"] >= MIN_AGREEMENT * r["total"]),
                         key=lambda r: r["images_per_s"])["path"]
    assert f"runtime: best -> {chosen}" in printed and "× eager fp32" in printed


def test_predict_runtime_best_keeps_stdout_for_results(saved, photos_dir, injected, tmp_path, capsys):
    from PIL import Image
    extra = tmp_path / "extra"
    extra.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(3):
        Image.fromarray((torch.rand(40, 44, 3, generator=g) * 255).byte().numpy()).save(extra / f"img{i}.png")
    assert main(["predict", str(photos_dir), "--pretrained", str(saved), "--runtime", "best", "--format", "json",
                 "--topk", "1", "--agreement-images", str(extra)]) == 0
    captured = capsys.readouterr()
    assert len(json.loads(captured.out)) == 29  # the table went to stderr
    assert "× eager fp32" in captured.err and "chosen: " in captured.err
    assert f"29 photos ({photos_dir}) + 3 images ({extra})" in captured.err
    assert " 32/32 " in next(line for line in captured.err.splitlines() if line.startswith("eager-fp32"))
    assert injected.timed == [sorted(["eager-fp32", "onnxruntime-fp32", "onnxruntime-int8"])]


def test_bench_runtime_best_times_the_chosen_path_against_transformers(injected, photos_dir, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", NAME, "--set", "depth=1", "--set", "embed_dim=48", "--set", "num_heads=3",
                 "--img-size", "32", "--batch-size", "2", "--iters", "2", "--warmup", "1", "--probes", "0",
                 "--runtime", "best", "--compare", "transformers", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    chosen = report["best"]["chosen"]
    assert chosen == max((r for r in report["best"]["table"] if r["total"] and r["agree"] >= 0.99 * r["total"]),
                         key=lambda r: r["images_per_s"])["path"]
    assert set(report["comparison"]["others"]) == ({chosen} - {"eager-fp32"})
    assert "× eager fp32" in printed and "transformers images/s" in printed


def test_bench_of_a_cifar10_run_measures_its_test_images_and_calibrates_int8_on_its_held_out_images(
        injected, photos_dir, tmp_path, capsys, monkeypatch):
    run = make_cifar10_run(tmp_path)
    calibrated = []
    build = best.build_paths
    monkeypatch.setattr(best, "build_paths", lambda model, ws, calibration=None, *a, **kw: (
        calibrated.append(calibration), build(model, ws, calibration, *a, **kw))[1])
    out = tmp_path / "bench.json"
    assert main(["bench", NAME, "--pretrained", str(run), "--batch-size", "64", "--iters", "1", "--warmup", "1",
                 "--probes", "0", "--runtime", "best", "--json", str(out)]) == 0
    report = json.loads(out.read_text())["best"]
    eager = next(r for r in report["table"] if r["path"] == "eager-fp32")
    assert eager["by_set"]["CIFAR-10 test images"] == [2000, 2000]  # the run's own checkpoint and test split
    model = vitkit.load_model(run / "checkpoints" / "best")
    expected = best.calibration_images(model, best.read_run_data(run))
    assert len(calibrated) == 1 and torch.equal(calibrated[0], expected)
    assert main(["bench", NAME, "--pretrained", str(run), "--batch-size", "64", "--iters", "1", "--warmup", "1",
                 "--probes", "0", "--runtime", "best", "--calibrate", str(photos_dir)]) == 0  # --calibrate DIR wins
    assert len(calibrated) == 2 and torch.equal(calibrated[1], best.folder_images(photos_dir, model, 300))


@pytest.mark.parametrize("argv, message", [
    (["predict", "IMG", "--pretrained", "MODEL", "--agreement-images", "IMGDIR"], "goes with --runtime best"),
    (["predict", "IMG", "--pretrained", "MODEL", "--calibrate", "IMGDIR"], "--calibrate goes with --runtime best"),
    (["bench", NAME, "--calibrate", "IMGDIR"], "--calibrate goes with --runtime best"),
    (["predict", "IMG", "--pretrained", "MODEL", "--runtime", "best", "--calibrate", "OUT"], "no such folder"),
    (["predict", "IMG", "--pretrained", "MODEL", "--runtime", "best", "--int8"], "drop --int8"),
    (["predict", "IMG", "--pretrained", "MODEL", "--runtime", "best", "--amp", "bf16"], "drop --amp"),
    (["export", "MODEL", "OUT", "--fastest", "--format", "onnx"], "--fastest chooses the format"),
    (["export", "MODEL", "OUT", "--agreement-images", "IMGDIR"], "goes with --fastest"),
    (["bench", NAME, "--runtime", "best", "--dtype", "bf16"], "--runtime best chooses among CPU inference paths"),
])
def test_misuse_is_one_line(saved, photos_dir, tmp_path, capsys, argv, message):
    swap = {"IMG": str(next(photos_dir.iterdir())), "MODEL": str(saved), "OUT": str(tmp_path / "out"),
            "IMGDIR": str(photos_dir)}
    assert main([swap.get(a, a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


# ------------------------------------------------------------------------------------------------- real model
WEIGHTS = SHARED / "weights" / "deit_tiny_patch16_224_in1k_fp16.safetensors"


@pytest.mark.slow  # three exports and five passes over 29 photos at 224: well over 20 s on the shared 2-core CPU
def test_real_deit_tiny_chosen_path_agrees_on_the_photos(photos_dir, tmp_path):
    """The ImageNet-trained DeiT-Tiny on the 29 photos in one batch (where int8 measured 28 of 29), with 4-bit
    weights and int8 made the fastest by the timer: whatever is chosen agrees with eager fp32 on >= 99% of the
    photos, counted independently, and the fastest path that does is the one chosen."""
    if not WEIGHTS.is_file():
        skip_or_fail(f"needs {WEIGHTS}")
    model = vitkit.create_model(NAME, pretrained=str(WEIGHTS)).eval()
    images = best.agreement_images(model)
    paths = best.build_paths(model, tmp_path, names=("eager-fp32", "onnxruntime-fp32", "onnxruntime-int8"))
    paths.append(BuiltPath("weights-4bit", quantised_weights(model, 4)))
    seconds = {"weights-4bit": 0.05, "onnxruntime-int8": 0.1, "onnxruntime-fp32": 0.5, "eager-fp32": 1.0}
    choice = best.choose(paths, images, 29, Timer(seconds))
    counted = {b.name: brute_force_agreement(model, b.module, images.images, 29) for b in paths}
    assert counted["weights-4bit"] < MIN_AGREEMENT * 29  # the premise: 4-bit weights change answers
    assert counted[choice.chosen] >= MIN_AGREEMENT * 29
    assert choice.chosen == min((n for n in seconds if counted[n] >= MIN_AGREEMENT * 29), key=seconds.get)
    assert {b.name: choice.row(b.name).agree for b in paths} == counted
