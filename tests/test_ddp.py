"""DistributedDataParallel: `torchrun --nproc_per_node=2 -m vitkit train` (gloo on 127.0.0.1, CPU) must reach the same
weights as one process with the same global batch: the sampler splits each global batch between the processes and
every sample's augmentation is seeded by its index, so both runs see identical data.

Equal weights alone would not show the split: if every process trained on the whole global batch, the averaged
gradient, and so the weights, would be the same. Both runs therefore go through ``tests/ddp_record.py``, which
records the training samples each process loaded: the two processes must hold disjoint halves of every micro-batch
the one process trained on."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import skip_or_fail

RECORD = str(Path(__file__).with_name("ddp_record.py"))
STEPS, BATCH, ACCUM = 8, 16, 2

RECIPE = {
    "model": {"name": "vit_tiny_patch16_224",
              "overrides": {"patch_size": 4, "depth": 2, "embed_dim": 32, "num_heads": 2}},
    "data": {"name": "fake", "img_size": 16, "train_limit": 160, "test_limit": 32, "val_fraction": 0.1,
             "num_workers": 0},
    "augment": {"crop_padding": 2, "hflip": 0.5},  # per-sample random augmentation, seeded by sample index
    "optim": {"lr": 2e-3, "warmup_steps": 2, "clip_grad": 1.0},
    "train": {"steps": STEPS, "batch_size": BATCH, "accum_steps": ACCUM, "eval_every": 4, "seed": 0,
              "deterministic": True, "threads": 1, "device": "cpu",
              "amp": "none"},  # fp32: bf16 (auto on a CPU with native bf16) rounds 1 and 2 processes differently
    "log": {"progress": False, "plots": False, "tensorboard": False},
}


def micro_batches(keys_file: Path, size: int, steps: int) -> list[set[tuple[int, int]]]:
    """The training keys a process loaded, cut into its micro-batches of ``size``; there must be ``steps`` of them."""
    keys = [tuple(k) for k in json.loads(keys_file.read_text())]
    assert len(keys) == steps * size, f"{keys_file.name}: {len(keys)} samples loaded, expected {steps} x {size}"
    return [set(keys[i:i + size]) for i in range(0, len(keys), size)]


def test_two_processes_match_one(tmp_path):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        skip_or_fail("this torch build has no gloo backend")
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    one = subprocess.run([sys.executable, RECORD, str(tmp_path / "keys_one"), "train", str(recipe),
                          "--out", str(tmp_path / "one")], capture_output=True, text=True, timeout=120)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          RECORD, str(tmp_path / "keys_two"), "train", str(recipe), "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, timeout=180)
    assert two.returncode == 0, two.stderr[-3000:]
    # which samples each process trained on: per micro-step, the two halves partition the one-process micro-batch
    micro = BATCH // ACCUM
    single = micro_batches(tmp_path / "keys_one" / "rank0.json", micro, STEPS * ACCUM)
    rank0, rank1 = (micro_batches(tmp_path / "keys_two" / f"rank{r}.json", micro // 2, STEPS * ACCUM)
                    for r in (0, 1))
    for j, (whole, a, b) in enumerate(zip(single, rank0, rank1)):
        assert len(a) == len(b) == micro // 2 and not a & b, f"micro-step {j}: the processes share samples"
        assert a | b == whole, f"micro-step {j}: the processes did not train on the one-process micro-batch"
    # and the weights: the same as one process with the same global batch
    a = load_file(str(tmp_path / "one" / "checkpoints" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "checkpoints" / "last" / "model.safetensors"))
    init_moved = 0
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=f"{k} differs between 1 and 2 processes")
        init_moved += int(a[k].abs().sum() > 0)
    assert init_moved == len(a)  # the head started at zero and was trained too
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["environment"]["world_size"] == 2 and summary["steps"] == STEPS
    assert summary["test"]["top1"] == pytest.approx(
        json.loads((tmp_path / "one" / "summary.json").read_text())["test"]["top1"])
    assert not list((tmp_path / "two").glob("**/*.tmp-*"))  # rank 0 alone wrote, atomically
