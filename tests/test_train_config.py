"""Recipe configs: layering (defaults → file → --set), errors that name the key before any work, the shipped
recipes, and the demo recipe kept equal to configs/digits_demo.yaml."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from vitkit.cli.main import main
from vitkit.config import ConfigError
from vitkit.train.config import dump_yaml, load_recipe, resolve

REPO = Path(__file__).resolve().parents[1]
TINY = {"model": {"name": "vit_tiny_patch16_224",
                  "overrides": {"patch_size": 4, "depth": 1, "embed_dim": 24, "num_heads": 2}},
        "data": {"name": "fake", "img_size": 16, "train_limit": 64, "test_limit": 16, "num_workers": 0},
        "train": {"steps": 2, "batch_size": 16}, "log": {"progress": False, "plots": False, "tensorboard": False}}


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_layering_defaults_file_then_set(tmp_path):
    cfg = load_recipe(write(tmp_path, TINY), ["optim.lr=3e-4", "train.batch_size=32", "augment.hflip=0"])
    assert cfg.optim.lr == 3e-4 and cfg.train.batch_size == 32 and cfg.augment.hflip == 0.0
    assert cfg.train.steps == 2  # from the file
    assert cfg.optim.name == "adamw" and cfg.optim.betas == (0.9, 0.999)  # defaults
    assert cfg.model.img_size == 16  # synced from data.img_size


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = load_recipe(write(tmp_path, TINY), ["model.overrides.drop_path_rate=0.1"])
    again = resolve(yaml.safe_load(dump_yaml(cfg)))
    assert again == cfg


@pytest.mark.parametrize("assignment, named", [
    ("train.stepz=3", "train.stepz"),
    ("optimm.lr=1", "optimm"),
    ("optim.lr=fast", "optim.lr"),
    ("train.amp=fp8", "train.amp"),
    ("train.eval_tta=vflip", "train.eval_tta"),
    ("model.overrides.depht=3", "depht"),
    ("model.overrides.depth=two", "depth"),
    ("model.name=vit_gigantic_patch16_224", "vit_gigantic"),
    ("train.accum_steps=3", "accum_steps"),
    ("augment.mixup=-1", "augment.mixup"),
    ("data.name=imagenet", "data.name"),
])
def test_bad_values_are_errors_that_name_the_key(tmp_path, assignment, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_recipe(write(tmp_path, TINY), [assignment])


def test_fp16_on_cpu_is_accepted(tmp_path):
    """fp16 trains with a loss scaler on a CPU too (tests/test_amp_fp16.py)."""
    assert load_recipe(write(tmp_path, TINY), ["train.device=cpu", "train.amp=fp16"]).train.amp == "fp16"


def test_img_size_conflict_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match="img_size"):
        load_recipe(write(tmp_path, TINY), ["model.img_size=32"])


def test_cli_rejects_a_bad_key_before_creating_the_run(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", str(write(tmp_path, TINY)), "--out", str(out), "--set", "train.batchsize=8"])
    assert code == 2
    assert "train.batchsize" in capsys.readouterr().err
    assert not out.exists()


def test_cli_refuses_to_overwrite_a_run(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("{}")
    (out / "summary.json").write_text("{}")  # a run that got somewhere (a folder with config.yaml alone is reused)
    assert main(["train", str(write(tmp_path, TINY)), "--out", str(out)]) == 2
    assert "--resume" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_shipped_recipes_are_valid_and_documented(name):
    path = REPO / "configs" / name
    lines = path.read_text().splitlines()
    header = "\n".join(line for line in lines[:next(i for i, l in enumerate(lines) if not l.startswith("#"))])
    assert header, f"{name} must open with a comment block"
    assert "vitkit train" in header or "vitkit demo" in header  # the command
    assert "Expected accuracy" in header or "Expected: " in header  # what it reaches ...
    assert "Expected time" in header or " min" in header  # ... and how long it takes
    raw = yaml.safe_load(path.read_text())
    # a file the header's commands make first (the MIM tokenizer) stands in as this folder: it must exist to validate
    made_first = ["train.mim.tokenizer=" + str(REPO)] if (raw.get("train") or {}).get("mim") else []
    cfg = load_recipe(path, made_first)
    assert cfg.train.steps or cfg.train.epochs or cfg.train.time_budget_minutes


def test_demo_recipe_matches_the_config_file():
    from vitkit.cli.demo import DEMO_RECIPE
    assert load_recipe(REPO / "configs" / "digits_demo.yaml") == resolve(DEMO_RECIPE)
