"""OpenVINO int8 (``vitkit export --format openvino --int8``, path ``openvino-int8`` of ``--runtime best``): NNCF's
static post-training quantisation, calibrated on real images, with the layers that cost agreement on held-out
images restored to fp32. Agreements are counted by brute force against eager fp32; no timing."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import randomize_, require, skip_or_fail
from test_runtime_best import make_cifar10_run

import vitkit
from vitkit import hardware
from vitkit.cli.main import main
from vitkit.deploy import best, quantize
from vitkit.deploy.export import export_model
from vitkit.deploy.runtime import open_runtime

NAME = "deit_tiny_patch16_224"


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    require("nncf")
    require("openvino")
    folder = best.shipped_photos()
    if folder is None:
        skip_or_fail("the shipped photos were not found (set VITKIT_SHARED to the shared folder)")
    return best.agreement_images(tiny_model(), photos=folder).images


def tiny_model(seed: int = 0) -> torch.nn.Module:
    model = vitkit.create_model(NAME, **vitkit.get_spec(NAME).tiny, num_classes=10)
    return randomize_(model, seed).eval()


def agreement(model, path, images: torch.Tensor) -> int:
    with torch.no_grad():
        return sum(int((model(x).argmax(-1) == path(x).float().argmax(-1)).sum()) for x in images.split(1))


def quantised_ops(xml: Path) -> dict[str, list[str]]:
    """Op type → names of the ops that a FakeQuantize feeds (what NNCF made int8)."""
    import openvino as ov
    out: dict[str, list[str]] = {}
    for op in ov.Core().read_model(xml).get_ops():
        if op.get_type_name() == "FakeQuantize":
            for target in (t.get_node() for o in op.outputs() for t in o.get_target_inputs()):
                out.setdefault(target.get_type_name(), []).append(target.get_friendly_name())
    return out


def test_openvino_int8_without_calibration_images_is_refused_in_one_line(tmp_path, capsys):
    with pytest.raises(ValueError, match="static int8 \\(NNCF\\): give calibration images"):
        export_model(tiny_model(), tmp_path / "x", "openvino", int8=True)
    assert main(["export", NAME, str(tmp_path / "y"), "--format", "openvino", "--int8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--calibrate DIR" in err[0]
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def calibration_set(photos: torch.Tensor) -> torch.Tensor:
    """58 real images (the photos and their mirrors): 39 calibrate, every 3rd (19) is held out."""
    return torch.cat([photos, photos.flip(-1)])


def test_openvino_int8_is_static_int8_with_mlp_fc2_kept_fp32(photos, tmp_path):
    model = tiny_model()
    result = export_model(model, tmp_path / "ov8", "openvino", int8=True, calibration=calibration_set(photos),
                          images=photos)
    meta = json.loads((tmp_path / "ov8" / "vitkit.json").read_text())
    q = meta["quantization"]
    assert meta["int8"] and q["scheme"] == "nncf-s7" and q["settings"]["runtime"] == "openvino"
    assert q["calibration_images"] == 39 and q["held_out_images"] == 19
    ops = quantised_ops(tmp_path / "ov8" / "model.xml")
    matmuls = ops["MatMul"]
    assert matmuls and not [n for n in matmuls if "fc2" in n]  # int8 everywhere but the MLPs' output projection
    assert any("fc1" in n for n in matmuls) and any("qkv" in n for n in matmuls)
    opened = open_runtime(tmp_path / "ov8")
    assert opened.precision == "int8" and result.parity.passed
    same = agreement(model, opened, photos)
    assert same >= len(photos) - 1  # the export's own gate: >= 99% or all but one
    batch = opened(photos[:8])  # static activation ranges: an image's answer does not depend on its batch
    alone = torch.cat([opened(x) for x in photos[:8].split(1)])
    assert torch.allclose(torch.as_tensor(batch), torch.as_tensor(alone), atol=1e-4)


def test_the_agreement_metric_scores_any_subset_against_its_own_reference():
    classes = np.array([3, 1, 4, 1, 5, 9])
    reference = np.eye(10)[classes]  # fp32 logits: one-hot

    class Compiled:  # answers class = the image's first value
        def output(self, i):
            return 0

        def __call__(self, x):
            return {0: np.eye(10)[x[:, 0].astype(int)]}

    metric = quantize._agreement_metric(reference)
    x = classes[:, None].astype(np.float32)
    assert metric(Compiled(), [(x[:3], np.arange(3)), (x[3:], np.arange(3, 6))]) == 1.0
    assert metric(Compiled(), [(x[4:5], np.array([4]))]) == 1.0  # one item alone, as NNCF ranks layers
    wrong = x.copy()
    wrong[5] = 0
    assert metric(Compiled(), [(wrong[2:], np.arange(2, 6))]) == 0.75

    class Tilted(Compiled):  # the right class, but logits turned by 45 degrees: cosine 0.71 < 0.99
        def __call__(self, x):
            return {0: np.eye(10)[x[:, 0].astype(int)] + 0.99 * np.eye(10)[(x[:, 0].astype(int) + 1) % 10]}

    assert metric(Tilted(), [(x, np.arange(6))]) == 0.0


def quantised_copy(fp32: Path, out: Path, images: torch.Tensor) -> tuple[Path, dict]:
    """``fp32`` (an OpenVINO export folder) copied to ``out`` and quantised there by ``quantize_openvino``."""
    shutil.copytree(fp32, out)
    return out, quantize.quantize_openvino(str(out / "model.xml"), images)


def test_accuracy_control_restores_layers_until_held_out_images_agree(photos, tmp_path, monkeypatch):
    model = tiny_model(seed=8)  # a seed whose plain int8 changes 3 of the 19 held-out answers
    export_model(model, tmp_path / "fp32", "openvino")
    images = calibration_set(photos)
    held, fit = images[2::3], images[[i for i in range(58) if i % 3 != 2]]
    monkeypatch.setattr(quantize, "MIN_CONTROL_IMAGES", 10**6)  # first without accuracy control, on the same 39 images
    plain, q_plain = quantised_copy(tmp_path / "fp32", tmp_path / "plain", fit)
    assert q_plain["held_out_images"] == 0 and q_plain["calibration_images"] == 39
    # the premise: without control, int8 changes some held-out answers
    assert agreement(model, open_runtime(plain), held) < len(held)
    monkeypatch.setattr(quantize, "MIN_CONTROL_IMAGES", 16)
    monkeypatch.setattr(quantize, "RESTORE_BELOW", 0.9)  # 18 of the 19 held-out images must keep their class
    controlled, q = quantised_copy(tmp_path / "fp32", tmp_path / "ac", images)
    assert q["held_out_images"] == len(held) == 19 and q["calibration_images"] == 39
    kept = agreement(model, open_runtime(controlled), held)
    assert kept >= 18 and q["held_out_agreement"] == kept / 19
    count = sum(map(len, quantised_ops(controlled / "model.xml").values()))
    assert 0 < count < sum(map(len, quantised_ops(plain / "model.xml").values()))


def test_best_builds_openvino_int8_only_with_calibration_images(photos, tmp_path):
    model = tiny_model()
    with hardware.simulate_cpu("avx2"):
        none, = best.build_paths(model, tmp_path / "a", names=["openvino-int8"])
        built, = best.build_paths(model, tmp_path / "b", calibration=calibration_set(photos),
                                  names=["openvino-int8"], check_images=photos)
    assert none.module is None and "needs calibration images" in none.reason
    assert built.module is not None and built.module.precision == "int8"
    assert json.loads((Path(built.folder) / "vitkit.json").read_text())["quantization"]["scheme"] == "nncf-s7"


def test_a_cifar10_run_calibrates_on_its_held_out_images_never_its_test_images(tmp_path):
    run = make_cifar10_run(tmp_path)
    config = (run / "config.yaml").read_text().replace("num_workers: 0", "num_workers: 0, val_fraction: 0.02")
    (run / "config.yaml").write_text(config)
    model = vitkit.load_model(run / "checkpoints" / "best")
    data = best.read_run_data(run)
    calibration = best.calibration_images(model, data)
    from vitkit.data import build_splits
    from vitkit.evaluate.eval_data import dataset_transform, resolve_data_config
    cfg = resolve_data_config(model, dict(data))
    splits, transform = build_splits(cfg), dataset_transform(cfg, model)
    assert len(calibration) == best.CALIBRATION_IMAGES
    assert torch.equal(calibration[:5], torch.stack([transform(splits.val[i][0]) for i in range(5)]))
    tests = best.agreement_images(model, data, photos=None if best.shipped_photos() else tmp_path).images
    assert not any(torch.equal(c, t) for c in calibration[:50] for t in tests[-2000:])
    given = torch.zeros(2, 3, 32, 32)
    assert best.calibration_images(model, data, given) is given  # --calibrate wins
    assert best.calibration_images(model, {"name": "folder"}) is None


def int8_matmuls(path: Path) -> list[str]:
    """The MatMuls of an ONNX QDQ model whose weight input is dequantised int8."""
    import onnx
    graph = onnx.load(path).graph
    dequantised = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return [n.name for n in graph.node if n.op_type == "MatMul" and dequantised & set(n.input[1:])]


@pytest.mark.parametrize("min_cosine, kept", [(0.0, "none"), (1.01, "mlp/fc2")])
def test_onnx_static_int8_keeps_mlp_fc2_fp32_only_when_the_images_need_it(photos, tmp_path, monkeypatch, min_cosine,
                                                                          kept):
    require("onnxruntime")
    from vitkit.deploy import export
    model = tiny_model()
    export_model(model, tmp_path / "f", "onnx")
    shutil.copytree(tmp_path / "f", tmp_path / "q")
    monkeypatch.setattr(export, "MIN_COSINE", min_cosine)  # 0 (and any top-1): every layer in int8 passes; 1.01: none
    monkeypatch.setattr(export, "MIN_TOP1", 0.0 if min_cosine == 0.0 else export.MIN_TOP1)
    images = calibration_set(photos)
    q = quantize.quantize_onnx(str(tmp_path / "q" / "model.onnx"), images)
    assert q["scheme"] == "static-s7" and q["calibration_images"] == 58
    assert (", ".join(q["settings"]["keep_fp32"]) or "none") == kept
    tried = q["kept_fp32_tried"]
    assert list(tried) == (["none"] if kept == "none" else ["none", "mlp/fc2"])
    matmuls = int8_matmuls(tmp_path / "q" / "model.onnx")
    assert bool([n for n in matmuls if "fc2" in n]) == (kept == "none") and any("fc1" in n for n in matmuls)
    with torch.no_grad():  # the recorded numbers are the images' own, counted here by brute force
        ref, got = model(images), open_runtime(tmp_path / "q")(images).float()
    cosine = torch.nn.functional.cosine_similarity(got, ref, dim=-1)
    assert tried[kept]["min_cosine"] == pytest.approx(cosine.min().item(), abs=1e-3)
    assert tried[kept]["top1_agreement"] == pytest.approx((got.argmax(-1) == ref.argmax(-1)).float().mean().item())
    assert tried[kept]["passed"] == (kept == "none")
