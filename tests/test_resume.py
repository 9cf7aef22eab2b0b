"""Exact resume, end to end: `python -m vitkit train` is stopped with SIGINT, SIGTERM (clean stop at a step
boundary) or SIGKILL (falls back to the last periodic checkpoint) after its first periodic checkpoint, resumed with
`--resume`, and must end with bitwise the same weights, optimizer state and metrics as an uninterrupted run
(CPU, deterministic mode, one thread).

Every random stream is keyed on the step, so a `--resume` that ignored the checkpoint and retrained from step 0 would
end bitwise equal too. The runs therefore log every step (`log.every_steps: 1`, one "step k/240" line per executed
step): the signal is sent at a step that is not a checkpoint multiple, the interrupted run must have saved exactly
the step it stopped at, and the resumed run must execute exactly the remaining steps."""
from __future__ import annotations

import csv
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

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
    "log": {"progress": False, "plots": False, "tensorboard": False, "every_steps": 1},  # a line per step
}
STEP_LINE = re.compile(rf"^step (\d+)/{STEPS} ", re.M)


def executed_steps(output: str) -> list[int]:
    """The steps a process ran, from its per-step log lines."""
    return [int(k) for k in STEP_LINE.findall(output)]


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


def read_until(proc: subprocess.Popen, seen: list[str], done: Callable[[int], bool],
               steps_of: Callable[[str], list[int]], timeout: float) -> int:
    """Read ``proc``'s output lines into ``seen`` until one logs a step for which ``done`` is true, and return that
    step; a run that ends first, or makes no such progress within ``timeout`` seconds, fails the test with what it
    printed."""
    deadline = time.monotonic() + timeout
    while True:
        line = proc.stdout.readline()
        assert line, f"run ended before the step awaited:\n{''.join(seen)}"
        assert time.monotonic() < deadline, f"no progress within {timeout:.0f} s"
        seen.append(line)
        steps = steps_of(line)
        if steps and done(steps[0]):
            return steps[0]


def interrupt(recipe_file: Path, out: Path, sig: signal.Signals) -> tuple[int, str, int]:
    """Start a run; once it has logged a step past its first periodic checkpoint that is not itself a checkpoint
    step, send ``sig`` to that process only. Returns (exit code, output, the last step logged before the signal)."""
    proc = subprocess.Popen(vitkit_cmd("train", str(recipe_file), "--out", str(out)), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    seen: list[str] = []
    try:
        step = read_until(proc, seen, lambda step: step > CKPT_EVERY and step % CKPT_EVERY, executed_steps, 90)
        proc.send_signal(sig)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, "".join(seen) + rest, step


def saved_step(run: Path) -> int:
    return json.loads((run / "checkpoints" / "last" / "train_state.json").read_text())["state"]["step"]


def assert_same_run(run: Path, ref: Path, steps: int = STEPS) -> None:
    for name in ("model.safetensors", "train_state.safetensors"):
        a, b = load_file(str(run / "checkpoints" / "last" / name)), load_file(str(ref / "checkpoints" / "last" / name))
        assert a.keys() == b.keys()
        different = [k for k in a if not torch.equal(a[k], b[k])]
        assert not different, f"{name}: {different[:5]} differ"
    best_a, best_b = load_file(str(run / "checkpoints/best/model.safetensors")), \
        load_file(str(ref / "checkpoints/best/model.safetensors"))
    assert all(torch.equal(best_a[k], best_b[k]) for k in best_a)
    rows = [list(csv.DictReader(open(r / "metrics.csv"))) for r in (run, ref)]
    keys = ("epoch", "step", "train_loss", "train_acc", "val_loss", "val_top1", "val_mim_top1", "lr")
    assert [[r[k] for k in keys] for r in rows[0]] == [[r[k] for k in keys] for r in rows[1]]
    summary = [json.loads((r / "summary.json").read_text()) for r in (run, ref)]
    assert summary[0]["test"] == summary[1]["test"] and summary[0]["steps"] == steps


@pytest.mark.parametrize("sig", [pytest.param(signal.SIGINT, marks=pytest.mark.slow), signal.SIGTERM],
                         ids=["SIGINT", "SIGTERM"])  # the same stop path; SIGINT's 20 s run behind -m slow
def test_clean_stop_then_resume_is_exact(recipe_file, reference, tmp_path, sig):
    out = tmp_path / "run"
    code, output, signalled_after = interrupt(recipe_file, out, sig)
    assert code == 128 + sig, output
    step = saved_step(out)
    assert f"stopped by {sig.name} at step {step} of {STEPS}" in output and f"--resume {out}" in output
    ran = executed_steps(output)
    assert ran == list(range(1, step + 1))  # it finished the step in progress, then stopped ...
    assert signalled_after < step and step % CKPT_EVERY, (signalled_after, step)  # ... and saved that very step,
    assert not (out / "summary.json").exists()  # not the periodic checkpoint before it
    resumed = run_to_end("train", "--resume", str(out))
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {out / 'checkpoints' / 'last'} at step {step}" in resumed.stderr
    assert executed_steps(resumed.stderr) == list(range(step + 1, STEPS + 1))  # only the remaining steps
    assert_same_run(out, reference)


def test_sigkill_resumes_from_the_last_periodic_checkpoint(recipe_file, reference, tmp_path):
    out = tmp_path / "run"
    code, output, killed_after = interrupt(recipe_file, out, signal.SIGKILL)
    assert code == -signal.SIGKILL
    step = saved_step(out)
    assert step % CKPT_EVERY == 0 and CKPT_EVERY <= step <= killed_after  # no checkpoint at the kill
    resumed = run_to_end("train", "--resume", str(out))
    assert resumed.returncode == 0, resumed.stderr
    assert f"at step {step}" in resumed.stderr
    assert executed_steps(resumed.stderr) == list(range(step + 1, STEPS + 1))
    assert_same_run(out, reference)
    assert not list((out / "checkpoints").glob(".*.tmp-*"))  # a half-written folder of the killed run is gone
