"""Masked-image modelling in the one training loop (``train.task: mim``): a BEiT pre-trained without labels on an image
folder with a vitkit-trained VQ tokenizer, stopped with SIGINT, resumed, and bitwise equal to an uninterrupted run;
then fine-tuned for classification from the pre-training run folder (the MIM head dropped, the shared
relative-position table copied into every block, layer-wise learning-rate decay 0.65 from BEiT's fine-tuning)."""
from __future__ import annotations

import json
import re
import signal
import subprocess

import pytest
import torch
import yaml
from PIL import Image

import vitkit
from vitkit.data import UnlabelledImages
from vitkit.tokenizers import VQConfig, train_vq
from vitkit.train.tasks import TokenizerInput

from test_resume import assert_same_run, run_to_end, saved_step, vitkit_cmd

STEPS, CKPT_EVERY = 12, 4
BEIT = {"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 4, "drop_path_rate": 0.1}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """An unlabelled image folder (nested, mixed formats): 48 digits of scikit-learn's set, 32×32."""
    from sklearn.datasets import load_digits
    root = tmp_path_factory.mktemp("unlabelled")
    digits = load_digits().images[:48]  # (48, 8, 8) in [0, 16]
    for i, d in enumerate(digits):
        folder = root / f"batch{i % 3}" / ("deep" if i % 2 else "")
        folder.mkdir(parents=True, exist_ok=True)
        grey = Image.fromarray((d * 15.9).astype("uint8")).resize((32, 32), Image.BICUBIC)
        Image.merge("RGB", (grey, grey.point(lambda v: 255 - v), grey)).save(folder / f"{i}.{'png' if i % 2 else 'jpg'}")
    return root


@pytest.fixture(scope="module")
def tokenizer(images, tmp_path_factory):
    """A VQ tokenizer trained for a few steps on the same unlabelled images (downsampling 4 = the model's patch)."""
    data = UnlabelledImages(images)
    pixels = torch.stack([data[i][0] for i in range(len(data))]).float() / 255  # (48, 3, 32, 32) in [0, 1]
    trained = train_vq(pixels, 40, torch.Generator().manual_seed(0), batch_size=16,
                       config=VQConfig(downsample=4, hidden=16, res_blocks=1, codebook_size=64, code_dim=8))
    return trained.model.save(tmp_path_factory.mktemp("vq") / "tokenizer")


def _recipe(images, tokenizer, **train) -> dict:
    return {"model": {"name": "beit_base_patch16_224_8k_vocab", "overrides": dict(BEIT)},
            "data": {"name": "images", "root": str(images), "img_size": 32, "val_fraction": 0.25, "num_workers": 0},
            "optim": {"lr": 1e-3, "weight_decay": 0.05, "warmup_steps": 2},
            "train": {"steps": STEPS, "batch_size": 8, "task": "mim", "mim": {"tokenizer": str(tokenizer)},
                      "eval_every": 6, "checkpoint_every_steps": CKPT_EVERY, "seed": 1, "deterministic": True,
                      "threads": 1, "amp": "none", **train},
            "log": {"progress": False, "plots": False, "tensorboard": False, "every_steps": 1}}


def test_unlabelled_images_are_every_image_under_the_folder(images):
    data = UnlabelledImages(images)
    assert len(data) == 48 and data.classes == ["unlabelled"] and set(data.targets) == {0}
    assert [p for p, _ in data.samples] == sorted(p for p, _ in data.samples)


def test_the_tokenizer_view_is_the_raw_image_at_the_tokenizer_grid():
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    raw = torch.rand(2, 3, 16, 16)
    x = (raw - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(TokenizerInput(mean, std, (16, 16))(x), raw)
    assert TokenizerInput(mean, std, (8, 8))(x).shape == (2, 3, 8, 8)


@pytest.fixture(scope="module")
def recipe(images, tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("recipe") / "mim.yaml"
    path.write_text(yaml.safe_dump(_recipe(images, tokenizer)))
    return path


@pytest.fixture(scope="module")
def reference(recipe, tmp_path_factory):
    """The uninterrupted pre-training run."""
    ref = tmp_path_factory.mktemp("ref") / "run"
    done = run_to_end("train", str(recipe), "--out", str(ref))
    assert done.returncode == 0, done.stderr
    return ref


def test_mim_run_interrupted_and_resumed_equals_an_uninterrupted_one(recipe, reference, tmp_path):
    """SIGINT after the first periodic checkpoint, ``--resume``, and the same weights, optimiser state and masked-token
    metrics as a run that was never stopped: the masks come from the step's generator."""
    ref = reference
    summary = json.loads((ref / "summary.json").read_text())
    assert summary["val"]["mim_top1"] > 0 and summary["best"]["mim_top1"] is not None  # masked tokens predicted

    run = tmp_path / "run"
    proc = subprocess.Popen(vitkit_cmd("train", str(recipe), "--out", str(run)), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    seen = []
    while True:
        line = proc.stdout.readline()
        assert line, "".join(seen)
        seen.append(line)
        steps = [int(k) for k in re.findall(rf"^step (\d+)/{STEPS} ", line, re.M)]
        if steps and steps[0] > CKPT_EVERY and steps[0] % CKPT_EVERY:
            break
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)
    assert proc.returncode == 130, "".join(seen)
    assert CKPT_EVERY < saved_step(run) < STEPS
    resumed = run_to_end("train", "--resume", str(run))
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(run, ref, STEPS)


def test_fine_tuning_from_the_pretraining_run_folder(reference):
    """``model.pretrained`` = the MIM run folder: a classifier starts from its trunk; the report drops the MIM head,
    copies the shared table into every block, and the recipe gets BEiT's layer decay 0.65."""
    from vitkit.train.config import resolve
    pre = reference
    cfg = resolve({"model": {"name": "beit_base_patch16_224", "pretrained": str(pre), "overrides": dict(BEIT)},
                   "data": {"name": "digits", "img_size": 32}, "train": {"steps": 1}})
    assert cfg.optim.layer_decay == 0.65
    from vitkit.train.build import build_model
    model = build_model(cfg, 10)
    notes = "\n".join(model.load_report.summary().splitlines())
    assert model.mim_vocab_size == 0 and model.num_classes == 10 and model.cfg.use_rel_pos_bias
    assert "lm_head" in notes and "copied into each of the 2 blocks" in notes, notes
    from vitkit.runs import run_checkpoint
    trunk = vitkit.load_model(run_checkpoint(pre))  # the run's best (else last): what model.pretrained took
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # the same encoder: the copied tables compute what the shared one did
        a = trunk.eval().forward_intermediates(x, indices=[-1])[0]
        b = model.eval().forward_intermediates(x, indices=[-1])[0]
    torch.testing.assert_close(a, b)


def test_the_tokenizer_command_trains_a_folder_the_recipe_can_name(images, tmp_path):
    import sys
    out = tmp_path / "vq"
    proc = subprocess.run([sys.executable, "-m", "vitkit.tokenizers", "--data", "images", "--root", str(images),
                           "--out", str(out), "--steps", "3", "--codebook", "32"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "3 steps on 48 images" in proc.stdout, proc.stderr
    from vitkit.train.build import load_tokenizer
    tok = load_tokenizer(str(out))
    assert tok.vocab_size == 32 and tok.tokenize(torch.rand(1, 3, 32, 32)).shape == (1, 8, 8)
