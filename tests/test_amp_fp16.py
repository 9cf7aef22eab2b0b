"""``train.amp: fp16`` on a CPU: float16 autocast with a loss scaler (``torch.amp.GradScaler("cpu")``), as on a GPU.

- a tiny ViT trains in fp16 (its loss falls, no step skipped), and its first step lands within a stated distance of
  the same step in fp32;
- steps whose fp16 gradients overflow (a loss scale too large for fp16) are skipped as ``GradScaler`` documents: the
  weights and the optimizer state do not move, and the scale is multiplied by ``backoff_factor`` (0.5) each time;
- a run stopped mid-way resumes to the bitwise weights, train state, metrics and loss-scaler state of an
  uninterrupted one;
- under FSDP on 2 gloo processes, a gradient that overflows in one process's shard only skips the step on both
  processes, as the one-process run skips it (``tests/amp_fp16_record.py``, which also checks BatchNorm statistics
  under activation checkpointing on sharded blocks);
- on CUDA (skipped here, with a message) the same recipe trains with the GPU's scaler.

Some tests give the scaler other defaults (``scaler_defaults``: a larger initial scale, a shorter growth interval, both
documented ``GradScaler`` arguments) so that real fp16 overflows happen, and the scale moves, within a few steps; the
trainer's code is unchanged.
"""
from __future__ import annotations

import csv
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from amp_fp16_record import OVERFLOW_STEP, step_recorder
from conftest import skip_or_fail
from test_fsdp import RECIPE as FSDP_RECIPE, in_process
from test_resume import assert_same_run
from test_train_loop import recipe, weights

import vitkit
from vitkit.config import ConfigError
from vitkit.train import Trainer, resolve, resume, train
from vitkit.train.distributed import DistInfo

RECORD = str(Path(__file__).with_name("amp_fp16_record.py"))


# ------------------------------------------------------------------------------------------------------ helpers
def scaler_defaults(monkeypatch, **defaults) -> None:
    """The trainer's ``torch.amp.GradScaler(device)`` made with other (documented) keyword defaults."""
    real = torch.amp.GradScaler

    class Scaler(real):
        def __init__(self, device: str = "cuda", **kw):
            super().__init__(device, **{**defaults, **kw})

    monkeypatch.setattr(torch.amp, "GradScaler", Scaler)


def record_steps(monkeypatch) -> list[dict]:
    """What each optimiser step of the runs trained in this test did (``amp_fp16_record.step_recorder``)."""
    records: list[dict] = []
    monkeypatch.setattr(Trainer, "_optimizer_step", step_recorder(records, overflow_step=None))
    return records


def scaler_state(run: Path) -> dict:
    return json.loads((run / "checkpoints" / "last" / "train_state.json").read_text())["scaler"]


def documented_scales(init: float, skipped: list[bool], growth_interval: int) -> list[float]:
    """The scale after each step by ``GradScaler.update``'s documented rule: x ``backoff_factor`` (0.5) after a
    skipped step, x ``growth_factor`` (2) after ``growth_interval`` consecutive unskipped ones."""
    scales, scale, good = [], init, 0
    for skip in skipped:
        good = 0 if skip else good + 1
        if skip:
            scale *= 0.5
        elif good == growth_interval:
            scale, good = scale * 2.0, 0
        scales.append(scale)
    return scales


def assert_skips_are_overflows(records: list[dict]) -> None:
    """A step moved the weights and the optimizer's step count iff its gradients were finite."""
    counted = 0.0
    for r in records:
        counted += r["finite"]
        assert r["changed"] == r["finite"] and r["optimizer_steps"] == counted, r


# ------------------------------------------------------------------------------------------ one process, CPU
# fp16 vs fp32 after one SGD step (an update proportional to the gradient, unlike AdamW's first step, ~lr·sign(g)),
# logits of 8 images, each run evaluated in its own precision: measured max |Δ| 6.5e-5 for logits of max |z| 0.19
# (3.5e-4 relative, fp16's 11-bit mantissa). Asserted: 4x that.
ONE_STEP_REL = 1.5e-3
LEARN = {"data": {"train_limit": 16, "val_fraction": 0.0, "test_limit": 16},
         "augment": {"crop_padding": 0, "hflip": 0.0},
         "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 0.0, "warmup_steps": 0,
                   "schedule": "constant"},
         "log": {"every_steps": 1}}


def test_fp16_trains_and_its_first_step_is_close_to_fp32(tmp_path, monkeypatch, caplog):
    """One batch of 16 noise images seen 8 times: memorised, so the loss falls (measured 2.30 → 1.97)."""
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    first: dict[str, torch.Tensor] = {}
    real = Trainer._optimizer_step

    def keep_first_logits(self, step: int) -> None:
        real(self, step)
        if step == 0:
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
                first["fp16"] = self.model.eval()(x).float()
            self.model.train()

    monkeypatch.setattr(Trainer, "_optimizer_step", keep_first_logits)
    with caplog.at_level("WARNING", logger="vitkit"):
        train(recipe(**LEARN, train={"steps": 8, "eval_every": 8, "amp": "fp16"}), tmp_path / "fp16")
    assert caplog.text.count("train.amp: fp16 on a CPU is emulated") == 1
    monkeypatch.setattr(Trainer, "_optimizer_step", real)
    train(recipe(**LEARN, train={"steps": 1, "eval_every": 1, "amp": "none"}), tmp_path / "fp32")
    fp32 = vitkit.load_model(tmp_path / "fp32" / "checkpoints" / "last").eval()(x).detach()
    gap = (first["fp16"] - fp32).abs().max().item()
    assert 0 < gap <= ONE_STEP_REL * fp32.abs().max().item(), (gap, fp32.abs().max().item())
    losses = [float(r["train_loss"]) for r in csv.DictReader(open(tmp_path / "fp16" / "metrics.csv"))]
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.1, losses
    assert scaler_state(tmp_path / "fp16") == {"scale": 2.0**16, "growth_factor": 2.0, "backoff_factor": 0.5,
                                               "growth_interval": 2000, "_growth_tracker": 8}  # 8 unskipped steps
    summary = json.loads((tmp_path / "fp16" / "summary.json").read_text())
    assert summary["environment"]["precision"] == "fp16"


def test_overflowing_steps_are_skipped_and_halve_the_scale(tmp_path, monkeypatch):
    """From a scale of 2^20, the first steps' fp16 gradients overflow (measured: 4 steps, until 2^16)."""
    scaler_defaults(monkeypatch, init_scale=2.0**20)
    records = record_steps(monkeypatch)
    train(recipe(train={"steps": 8, "eval_every": 8, "amp": "fp16"}), tmp_path / "run")
    skipped = [not r["finite"] for r in records]
    assert skipped[0] and not skipped[-1], skipped  # overflows happened, and the scale came down to fit
    assert_skips_are_overflows(records)
    assert [r["scale"] for r in records] == documented_scales(2.0**20, skipped, growth_interval=2000)
    assert scaler_state(tmp_path / "run")["scale"] == records[-1]["scale"]
    assert all(torch.isfinite(v).all() for v in weights(tmp_path / "run").values())


def test_fp16_resume_is_exact_including_the_loss_scale(tmp_path, monkeypatch):
    """Stopped (a copy of the run folder as a SIGKILL after the step-6 checkpoint leaves it) and resumed: the same
    weights, train state, metrics and scaler state as the uninterrupted run. A scale growing every 2 good steps
    from 2^18 overflows now and then, so the steps after the resume skip or not by the restored scale."""
    growth_interval, snapshot_step = 2, 6
    scaler_defaults(monkeypatch, init_scale=2.0**18, growth_interval=growth_interval)
    records = record_steps(monkeypatch)
    run, stopped = tmp_path / "run", tmp_path / "stopped"
    real = Trainer._save_last

    def save_last(self):
        signalled = real(self)
        if self.state.step == snapshot_step:
            shutil.copytree(self.run_dir, stopped)
        return signalled

    monkeypatch.setattr(Trainer, "_save_last", save_last)
    r = recipe(train={"steps": 12, "eval_every": 6, "checkpoint_every_steps": 3, "amp": "fp16"})
    train(r, run)
    whole = records[:]
    skipped = [not s["finite"] for s in whole]
    assert any(skipped[snapshot_step:]) and not all(skipped[snapshot_step:]), skipped
    assert [s["scale"] for s in whole] == documented_scales(2.0**18, skipped, growth_interval)
    at_stop = scaler_state(stopped)
    assert (at_stop["scale"], at_stop["_growth_tracker"]) != (2.0**18, 0)  # not a fresh scaler's state
    monkeypatch.setattr(Trainer, "_save_last", real)
    resume(stopped)
    assert [s["step"] for s in records[len(whole):]] == list(range(snapshot_step, 12))  # only the remaining steps
    assert records[len(whole):] == whole[snapshot_step:]
    assert_same_run(stopped, run, steps=12)
    assert scaler_state(stopped) == scaler_state(run)


# ------------------------------------------------------------------------------------------------------ FSDP
FSDP_FP16 = {**FSDP_RECIPE, "train": {**FSDP_RECIPE["train"], "steps": 4, "eval_every": 4, "checkpoint_every_steps": 0,
                                      "accum_steps": 1, "ema": False, "amp": "fp16"}}
# L2 distance over all weights between the 2-process run and the one-process one after 4 steps: measured 3.6e-3
# (fp16 rounding: FSDP computes with fp16 copies of the parameters, one process with fp32 weights under autocast). A
# step that is not skipped moves them by 0.15 (measured: the one-process run without the overflow), half of that on
# one process's shards.
FSDP_GAP = 0.012


def test_fsdp_fp16_skips_an_overflow_of_one_process_on_every_process(tmp_path, monkeypatch):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        skip_or_fail("this torch build has no gloo backend")
    recipe_file, records = tmp_path / "fsdp.yaml", tmp_path / "records"
    recipe_file.write_text(yaml.safe_dump(FSDP_FP16))
    records.mkdir()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           RECORD, str(recipe_file), str(tmp_path / "two"), str(records)],
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fsdp: 2 blocks and the root sharded over 2 processes; fp16 parameters in compute, gradients reduced in " \
           "fp32" in proc.stderr
    ranks = [json.loads((records / f"rank{r}.json").read_text()) for r in range(2)]
    ref: list[dict] = []
    monkeypatch.setattr(Trainer, "_optimizer_step", step_recorder(ref))
    in_process(train, FSDP_FP16, tmp_path / "one")
    expected = documented_scales(2.0**16, [s == OVERFLOW_STEP for s in range(4)], growth_interval=2000)
    for records_of in (ranks[0]["steps"], ranks[1]["steps"], ref):
        assert [r["scale"] for r in records_of] == expected
        assert [r["changed"] for r in records_of] == [s != OVERFLOW_STEP for s in range(4)]  # skipped everywhere
    # ... although only the last process's gradient shard overflowed
    assert [r["finite"] for r in ranks[0]["steps"]] == [True] * 4
    assert [r["finite"] for r in ranks[1]["steps"]] == [s != OVERFLOW_STEP for s in range(4)]
    assert ranks[0]["steps"][-1]["optimizer_steps"] == ranks[1]["steps"][-1]["optimizer_steps"] == 3
    a, b = weights(tmp_path / "two"), weights(tmp_path / "one")
    assert a.keys() == b.keys()
    gap = torch.cat([(a[k].double() - b[k].double()).flatten() for k in a]).norm().item()
    assert gap <= FSDP_GAP, gap
    for rank in ranks:  # BatchNorm statistics of sharded, checkpointed blocks are counted once
        assert rank["bn"] == {"same_buffers": True, "counts": [1], "same_loss": True}


def test_fsdp_mixed_precision_for_fp16():
    from vitkit.train.fsdp import mixed_precision
    policy = mixed_precision(torch.float16)
    assert (policy.param_dtype, policy.reduce_dtype) == (torch.float16, torch.float32)


# ------------------------------------------------------------------------------------------------ devices
def test_fp16_is_accepted_on_a_cpu_and_with_fsdp():
    for train_section in ({"device": "cpu"}, {"device": "cpu", "strategy": "fsdp"}, {"strategy": "fsdp"}):
        assert resolve(recipe(train={"amp": "fp16", **train_section})).train.amp == "fp16"


def test_fp16_on_mps_needs_a_torch_with_its_scaler_kernels(monkeypatch, caplog):
    from vitkit.train import _check_device
    cfg = resolve(recipe(train={"amp": "fp16"}))
    monkeypatch.setattr(torch, "__version__", torch.torch_version.TorchVersion("2.7.1"))
    with pytest.raises(ConfigError, match=r"train\.amp: fp16 on mps needs torch >= 2\.8 .* this is torch 2\.7\.1"):
        _check_device(cfg, torch.device("mps"), DistInfo())
    monkeypatch.setattr(torch, "__version__", torch.torch_version.TorchVersion("2.8.0"))
    with caplog.at_level(logging.WARNING, logger="vitkit"):
        _check_device(cfg, torch.device("mps"), DistInfo())
        _check_device(cfg, torch.device("cpu"), DistInfo(rank=1, world_size=2))  # only rank 0 says it
    assert caplog.text == ""


def test_fp16_trains_on_cuda(tmp_path):
    """The same recipe on a GPU: fp16 autocast, the CUDA loss scaler, its state saved. (How much faster fp16 is than
    fp32 on a GPU is a measurement for vitkit bench on that GPU, not a test.)"""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU: fp16 training with torch.amp.GradScaler('cuda'); this machine has none")
    train(recipe(train={"steps": 4, "eval_every": 4, "amp": "fp16", "device": "cuda", "deterministic": False}),
          tmp_path / "run")
    state = scaler_state(tmp_path / "run")
    assert state["scale"] > 0 and 0 <= state["_growth_tracker"] <= 4
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["environment"]["precision"] == "fp16" and summary["steps"] == 4
