"""`vitkit eval` on a real run folder written by `vitkit train` (a 30-step run on the bundled digits): it must find
checkpoints/best and the run's data section by itself and reproduce the training loop's own test report.

Both sides run in fp32 (``train.amp: none``, ``--amp none``): ``auto`` is bf16 on a CPU with native bf16, where the
training loop's test batches of 32 and eval's of 64 round differently."""
from __future__ import annotations

import json

import pytest
import torch
import yaml

from vitkit.cli.main import main

RECIPE = {
    "model": {"name": "vit_tiny_patch16_224", "overrides": {"depth": 1, "embed_dim": 32, "num_heads": 2,
                                                            "patch_size": 8}},
    "data": {"name": "digits", "img_size": 16, "num_workers": 0, "val_fraction": 0.1},
    "train": {"steps": 30, "batch_size": 32, "threads": 1, "eval_every": 15, "amp": "none"},
    "log": {"progress": False, "tensorboard": False, "plots": False},
}
FP32 = ["--amp", "none"]  # as the recipe's train.amp


def _train(root, recipe: dict):
    """``vitkit train`` of ``recipe`` into ``root/runs/r``."""
    (root / "r.yaml").write_text(yaml.safe_dump(recipe))
    run = root / "runs" / "r"
    threads = torch.get_num_threads()
    try:
        if main(["train", str(root / "r.yaml"), "--out", str(run)]) != 0:
            pytest.fail("vitkit train failed; see the log above")
    finally:
        torch.set_num_threads(threads)  # train.threads applies process-wide; later tests keep their threads
    return run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("train"), RECIPE)


def test_eval_reproduces_the_training_test_report(run_dir, tmp_path, capsys):
    reference = json.loads((run_dir / "eval" / "test" / "metrics.json").read_text())  # written by the train loop
    ref_confusion = (run_dir / "eval" / "test" / "confusion_matrix.csv").read_text()
    assert main(["eval", str(run_dir), *FP32, "--out", str(tmp_path / "ev")]) == 0
    ours = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert ours["checkpoint"].endswith("best") and ours["data"]["name"] == "digits"
    assert ours["num_samples"] == reference["num_samples"] == 359
    assert ours["top1"] == reference["top1"] and ours["top5"] == reference["top5"]
    assert ours["loss"] == pytest.approx(reference["loss"], rel=1e-6)
    assert (tmp_path / "ev" / "confusion_matrix.csv").read_text() == ref_confusion
    assert "top-1" in capsys.readouterr().out


def test_predict_with_run_folder_uses_dataset_class_names(run_dir, tmp_path, capsys):
    from PIL import Image
    Image.new("RGB", (24, 24), (10, 200, 30)).save(tmp_path / "x.png")
    assert main(["predict", str(tmp_path / "x.png"), "--pretrained", str(run_dir), "--format", "json",
                 "--topk", "10"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert sorted(t["label"] for t in row["topk"]) == [str(d) for d in range(10)]  # digits' classes, saved by train
    assert sum(t["prob"] for t in row["topk"]) == pytest.approx(1.0, abs=1e-5)


@pytest.fixture(scope="module")
def tta_run_dir(tmp_path_factory):
    """The same run with ``train.eval_tta: hflip``: validation, best-checkpoint choice and test on flip averages."""
    return _train(tmp_path_factory.mktemp("train_tta"), {**RECIPE, "train": {**RECIPE["train"], "eval_tta": "hflip"}})


def test_eval_tta_reproduces_a_tta_run_and_differs_without(tta_run_dir, tmp_path, capsys):
    summary = json.loads((tta_run_dir / "summary.json").read_text())
    assert summary["test"]["tta"] == "hflip"
    reference = json.loads((tta_run_dir / "eval" / "test" / "metrics.json").read_text())
    assert main(["eval", str(tta_run_dir), *FP32, "--tta", "hflip", "--out", str(tmp_path / "flip")]) == 0
    assert "test-time augmentation: hflip" in capsys.readouterr().out
    flip = json.loads((tmp_path / "flip" / "metrics.json").read_text())
    assert flip["tta"] == "hflip" and flip["top1"] == reference["top1"]
    assert flip["loss"] == pytest.approx(reference["loss"], rel=1e-6)
    assert main(["eval", str(tta_run_dir), *FP32, "--out", str(tmp_path / "plain")]) == 0
    plain = json.loads((tmp_path / "plain" / "metrics.json").read_text())
    assert plain["tta"] == "none" and plain["loss"] != pytest.approx(reference["loss"], rel=1e-4)
