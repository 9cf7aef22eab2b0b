"""`vitkit demo`: the whole path (train on digits, test, PNG predictions, plots) on a shortened schedule in the
default run, with the accuracy that schedule reaches; the real demo (accuracy >= 95% within 5 minutes) is a slow
test."""
from __future__ import annotations

import json
import re
import time

import pytest

from vitkit.cli.main import main

from conftest import require


def test_demo_pipeline_on_a_short_schedule(tmp_path, capsys):
    require("sklearn")  # the digits dataset
    out = tmp_path / "demo"
    code = main(["demo", "--out", str(out), "--num-predict", "4",
                 "--set", "train.epochs=2", "optim.warmup_steps=10", "train.eval_every=19", "train.threads=1"])
    captured = capsys.readouterr()
    text = captured.out
    accuracy = float(re.search(r"held-out test accuracy: ([\d.]+)%", text).group(1))
    summary = json.loads((out / "summary.json").read_text())
    assert accuracy == pytest.approx(100 * summary["test"]["top1"], abs=0.006)  # the test split, best/ weights
    # 2 epochs (38 steps) of the demo recipe: measured 40.4% (chance 10%); below the full demo's 95% target, so the
    # demo must say so and exit 1 (the full recipe, 40 epochs, reaches 97.5-98.6%: the slow test below)
    assert accuracy >= 30.0, accuracy
    assert code == 1 and "demo FAILED: test accuracy" in captured.err and "below 95%" in captured.err
    predictions = re.findall(r"test_\d+_label_(\d)\.png\s+true (\d)\s+predicted (\d)", text)
    assert len(predictions) == 4 and all(a == b for a, b, _ in predictions)
    right = sum(t == p for _, t, p in predictions)
    assert f"{right} of 4 right" in text
    assert len(list((out / "predictions").glob("*.png"))) == 4
    for f in ("plots/loss.png", "plots/accuracy.png", "plots/lr.png", "checkpoints/best/model.safetensors",
              "eval/test/confusion_matrix.png", "summary.json", "config.yaml"):
        assert (out / f).is_file(), f
    assert str(out / "checkpoints" / "best") in text


@pytest.mark.slow
def test_full_demo_reaches_95_percent_within_5_minutes(tmp_path, capsys):
    require("sklearn")
    start = time.monotonic()
    code = main(["demo", "--out", str(tmp_path / "demo")])
    minutes = (time.monotonic() - start) / 60
    text = capsys.readouterr().out
    accuracy = float(re.search(r"held-out test accuracy: ([\d.]+)%", text).group(1))
    assert code == 0 and accuracy >= 95.0, text[-2000:]
    assert minutes < 5.0
