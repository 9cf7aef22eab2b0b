"""Exact resume, end to end: `python -m vitkit train` is stopped with SIGINT, SIGTERM (clean stop at a step
boundary) or SIGKILL (falls back to the last periodic checkpoint) after its first periodic checkpoint, resumed with
`--resume`, and must end with bitwise the same weights, optimizer state and metrics as an uninterrupted run
(CPU, deterministic mode, one thread)."""
from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

STEPS, CKPT_EVERY = 240, 20
RECIPE = {
    "model": {"name": "vit_tiny_patch16_224",
              "overrides": {"patch_size": 4, "depth": 2, "embed_dim": 32, "num_heads": 2, "drop_path_rate": 0.1}},
    "data": {"name": "fake", "img_size": 16, "train_limit": 256, "test_limit": 32, "val_fraction": 0.125,
             "num_workers": 0},
    "augment": {"mixup": 0.8, "cutmix": 1.0, "label_smoothing": 0.1},  # exercises every random stream
    "optim": {"lr": 1e-3, "warmup_steps": 10},
    "train": {"steps": STEPS, "batch_size": 16, "accum_steps": 2, "eval_every": 50,
              "checkpoint_every_steps": CKPT_EVERY, "seed": 1, "deterministic": True, "threads": 1, "ema": True},
    "log": {"progress": False, "plots": False, "tensorboard": False},
}


def vitkit_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "vitkit", *args]


def run_to_end(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(vitkit_cmd(*args), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("recipe") / "tiny.yaml"
    path.write_text(yaml.safe_dump(RECIPE))
    return path


@pytest.fixture(scope="module")
def reference(recipe_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "run"
    proc = run_to_end("train", str(recipe_file), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    return out


def interrupt(recipe_file: Path, out: Path, sig: signal.Signals) -> tuple[int, str]:
    """Start a run, wait for its first periodic checkpoint, send ``sig`` to that process only."""
    marker = out / "checkpoints" / "last" / "train_state.json"
    proc = subprocess.Popen(vitkit_cmd("train", str(recipe_file), "--out", str(out)), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 90
        while not marker.exists():
            assert proc.poll() is None, f"run ended before its first checkpoint:\n{proc.stdout.read()}"
            assert time.monotonic() < deadline, "no checkpoint within 90 s"
            time.sleep(0.01)
        proc.send_signal(sig)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, output


def saved_step(run: Path) -> int:
    return json.loads((run / "checkpoints" / "last" / "train_state.json").read_text())["state"]["step"]


def assert_same_run(run: Path, ref: Path) -> None:
    for name in ("model.safetensors", "train_state.safetensors"):
        a, b = load_file(str(run / "checkpoints" / "last" / name)), load_file(str(ref / "checkpoints" / "last" / name))
        assert a.keys() == b.keys()
        different = [k for k in a if not torch.equal(a[k], b[k])]
        assert not different, f"{name}: {different[:5]} differ"
    best_a, best_b = load_file(str(run / "checkpoints/best/model.safetensors")), \
        load_file(str(ref / "checkpoints/best/model.safetensors"))
    assert all(torch.equal(best_a[k], best_b[k]) for k in best_a)
    rows = [list(csv.DictReader(open(r / "metrics.csv"))) for r in (run, ref)]
    keys = ("epoch", "step", "train_loss", "train_acc", "val_loss", "val_top1", "lr")
    assert [[r[k] for k in keys] for r in rows[0]] == [[r[k] for k in keys] for r in rows[1]]
    summary = [json.loads((r / "summary.json").read_text()) for r in (run, ref)]
    assert summary[0]["test"] == summary[1]["test"] and summary[0]["steps"] == STEPS


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_clean_stop_then_resume_is_exact(recipe_file, reference, tmp_path, sig):
    out = tmp_path / "run"
    code, output = interrupt(recipe_file, out, sig)
    assert code == 128 + sig, output
    assert f"stopped by {sig.name}" in output and f"--resume {out}" in output
    step = saved_step(out)
    assert CKPT_EVERY <= step < STEPS  # stopped mid-run, at a step boundary, with a checkpoint of that step
    assert not (out / "summary.json").exists()
    resumed = run_to_end("train", "--resume", str(out))
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {out / 'checkpoints' / 'last'} at step {step}" in resumed.stderr
    assert_same_run(out, reference)


def test_sigkill_resumes_from_the_last_periodic_checkpoint(recipe_file, reference, tmp_path):
    out = tmp_path / "run"
    code, output = interrupt(recipe_file, out, signal.SIGKILL)
    assert code == -signal.SIGKILL
    step = saved_step(out)
    assert step % CKPT_EVERY == 0 and step < STEPS  # no checkpoint at the kill: the periodic one survives
    resumed = run_to_end("train", "--resume", str(out))
    assert resumed.returncode == 0, resumed.stderr
    assert f"at step {step}" in resumed.stderr
    assert_same_run(out, reference)
    assert not list((out / "checkpoints").glob(".*.tmp-*"))  # a half-written folder of the killed run is gone
