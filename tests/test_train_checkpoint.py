"""Checkpoint files: atomic folder replacement (including a crash between the two renames), optimizer and RNG state
round trips, and safetensors + JSON only."""
from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import torch

import vitkit
from vitkit.train import checkpoint as ckpt
from vitkit.train.config import OptimConfig
from vitkit.train.optim import build_optimizer


def tiny():
    return vitkit.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, depth=1, embed_dim=24,
                               num_heads=2, num_classes=3)


def test_failed_write_leaves_the_previous_folder_intact(tmp_path):
    final = tmp_path / "last"
    with ckpt.atomic_dir(final) as tmp:
        (tmp / "a.json").write_text('{"v": 1}')
    with pytest.raises(RuntimeError):
        with ckpt.atomic_dir(final) as tmp:
            (tmp / "a.json").write_text('{"v": 2}')
            raise RuntimeError("killed while writing")
    assert json.loads((final / "a.json").read_text()) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]  # no temporary folder left behind


def test_crash_between_the_renames_falls_back_to_prev(tmp_path, monkeypatch):
    run = tmp_path / "run"
    ckpt.save_checkpoint(run / "checkpoints" / "last", tiny(), ["a", "b", "c"])
    real_rename = os.rename

    def die_on_second_rename(src, dst):
        real_rename(src, dst)
        if str(dst).endswith(".prev"):  # the old folder moved aside; the process dies before the new one lands
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(os, "rename", die_on_second_rename)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(run / "checkpoints" / "last", tiny(), ["a", "b", "c"])
    monkeypatch.setattr(os, "rename", real_rename)
    found = ckpt.find_checkpoint(run)
    assert found is not None and found.name == "last.prev"
    assert vitkit.load_model(found).class_names == ["a", "b", "c"]
    ckpt.save_checkpoint(run / "checkpoints" / "last", tiny(), ["x", "y", "z"])  # the next save recovers
    assert ckpt.find_checkpoint(run).name == "last"
    assert not (run / "checkpoints" / "last.prev").exists()


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_optimizer_state_round_trip_continues_bitwise(tmp_path, name):
    def steps(model, opt, n, seed):
        g = torch.Generator().manual_seed(seed)
        for _ in range(n):
            model(torch.randn(4, 3, 16, 16, generator=g)).square().mean().backward()
            opt.step()
            opt.zero_grad()

    cfg = OptimConfig(name=name, weight_decay=0.1, layer_decay=0.8)
    model = tiny()
    opt = build_optimizer(model, cfg, lr=1e-2)
    steps(model, opt, 3, seed=0)
    tensors, meta = ckpt.optimizer_state(opt)
    ckpt.save_checkpoint(tmp_path / "c", model, None, tensors, {"optimizer": meta})
    saved_tensors, saved_meta = ckpt.read_train_state(tmp_path / "c")

    resumed = tiny()
    ckpt.load_model_weights(resumed, tmp_path / "c")
    opt2 = build_optimizer(resumed, cfg, lr=1e-2)
    ckpt.load_optimizer_state(opt2, saved_tensors, saved_meta["optimizer"])
    steps(model, opt, 2, seed=1)
    steps(resumed, opt2, 2, seed=1)
    for (n, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), n


def test_rng_round_trip():
    tensors, meta = ckpt.capture_rng()
    first = (torch.rand(3), np.random.rand(3), random.random())
    ckpt.restore_rng(tensors, meta)
    second = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], second[0]) and np.array_equal(first[1], second[1]) and first[2] == second[2]


def test_checkpoint_holds_only_safetensors_and_json(tmp_path):
    model = tiny()
    opt = build_optimizer(model, OptimConfig(), lr=1e-3)
    model(torch.randn(2, 3, 16, 16)).sum().backward()
    opt.step()
    tensors, meta = ckpt.optimizer_state(opt)
    rng_t, rng_m = ckpt.capture_rng()
    ckpt.save_checkpoint(tmp_path / "last", model, None, {**tensors, **rng_t}, {"optimizer": meta, "rng": rng_m})
    from safetensors import safe_open
    for path in (tmp_path / "last").iterdir():
        if path.suffix == ".json":
            json.loads(path.read_text())
        else:
            assert path.suffix == ".safetensors", path
            with safe_open(str(path), "pt") as f:
                assert list(f.keys())
        assert not path.read_bytes().startswith(b"\x80"), f"{path} looks like a pickle"
