"""What commands leave on disk: nothing before everything is checked, failed starts that the same command
may reuse (item 5); no history lost on resume (item 6); conversions that never overwrite silently, accept run folders
and follow the user's umask (item 8)."""
from __future__ import annotations

import csv
import json
import logging
import os
import stat

import pytest
import torch

import vitkit
from vitkit.cli.main import main
from vitkit.config import ConfigError
from vitkit.train import NonFiniteLossError, resume, train

RECIPE = {
    "model": {"name": "vit_tiny_patch16_224", "overrides": {"patch_size": 4, "depth": 1, "embed_dim": 24,
                                                            "num_heads": 2}},
    "data": {"name": "fake", "img_size": 16, "train_limit": 64, "test_limit": 16, "num_workers": 0,
             "val_fraction": 0.25},
    "train": {"steps": 4, "batch_size": 8, "eval_every": 2, "seed": 0, "threads": 1},
    "log": {"progress": False, "plots": False, "tensorboard": False},
}


def with_sets(**sections) -> dict:
    out = {k: dict(v) for k, v in RECIPE.items()}
    for name, values in sections.items():
        out[name] = {**out.get(name, {}), **values}
    return out


# ------------------------------------------------------------------------------------------------------ item 5
def test_data_that_cannot_load_leaves_no_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="CIFAR10 not found"):
        train(with_sets(data={"name": "cifar10", "root": str(tmp_path / "nothing")}), tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("sets, key", [(["optim.lr=nan"], "optim.lr"), (["train.epochs=1e400"], "train.epochs"),
                                       (["optim.warmup_epochs=.inf"], "optim.warmup_epochs"),
                                       (["train.time_budget_minutes=.NaN"], "train.time_budget_minutes")])
def test_values_that_cannot_work_name_their_key(tmp_path, sets, key):
    with pytest.raises(ConfigError, match=f"^{key}: expected a finite number"):
        train(RECIPE, tmp_path / "run", sets)
    assert not (tmp_path / "run").exists()


def test_a_failed_start_may_be_rerun_by_the_same_command(tmp_path):
    """A start that fails after its folder exists (here a diverging loss before any checkpoint) leaves a folder
    that the same command reuses; a folder that holds a checkpoint is still refused."""
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLossError):
        train(with_sets(train={"eval_every": 0, "steps": 6}), run, ["optim.lr=1e30", "optim.name=sgd"])
    assert (run / "config.yaml").is_file() and not (run / "checkpoints").exists()
    result = train(RECIPE, run)  # the same --out, a config that works: accepted
    assert result.status == "completed"
    assert "lr: 1.0e+30" not in (run / "config.yaml").read_text()
    with pytest.raises(FileExistsError, match="already holds a run"):
        train(RECIPE, run)


# ------------------------------------------------------------------------------------------------------ item 6
@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    run = tmp_path_factory.mktemp("finished") / "run"
    train(RECIPE, run)
    return run


def copy_run(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


def test_resume_without_last_refuses_and_keeps_history(finished, tmp_path):
    run = copy_run(finished, tmp_path / "run")
    import shutil
    shutil.rmtree(run / "checkpoints" / "last")
    metrics, summary = (run / "metrics.csv").read_bytes(), (run / "summary.json").read_bytes()
    with pytest.raises(FileNotFoundError) as e:
        resume(run)
    message = str(e.value)
    assert "checkpoints/last is missing" in message and "best" in message and "summary.json" in message
    assert (run / "metrics.csv").read_bytes() == metrics and (run / "summary.json").read_bytes() == summary


def test_damaged_train_state_is_named(finished, tmp_path):
    run = copy_run(finished, tmp_path / "run")
    state = run / "checkpoints" / "last" / "train_state.json"
    state.write_text(state.read_text()[:50])
    with pytest.raises(ValueError, match=r"train_state.json is damaged \(not valid JSON"):
        resume(run)
    (run / "checkpoints" / "last" / "train_state.safetensors").write_bytes(b"\x00" * 10)
    state.write_text((finished / "checkpoints" / "last" / "train_state.json").read_text())
    with pytest.raises(ValueError, match=r"train_state.safetensors is damaged or missing"):
        resume(run)


def test_summary_agrees_with_metrics(finished):
    rows = list(csv.DictReader(open(finished / "metrics.csv")))
    summary = json.loads((finished / "summary.json").read_text())
    assert int(rows[-1]["step"]) == summary["steps"]
    assert float(rows[-1]["val_top1"]) == pytest.approx(summary["val"]["top1"], abs=1e-6)


def test_metrics_rows_after_the_checkpoint_are_replaced_with_a_message(tmp_path, caplog):
    """Rows an interrupted process logged after its last checkpoint are dropped on resume (the resumed run logs
    them again), and the log says so."""
    from vitkit.train.run_outputs import MetricsLog
    path = tmp_path / "metrics.csv"
    log_ = MetricsLog(path)
    for step in (1, 2, 3, 4):
        log_.append({"epoch": 0, "step": step, "train_loss": 1.0 / step})
    with caplog.at_level(logging.INFO, logger="vitkit"):
        MetricsLog(path, resume_step=2)
    assert [r["step"] for r in MetricsLog.read(path)] == ["1", "2"]
    assert any("2 row(s) after step 2 were written after the checkpoint" in r.getMessage() for r in caplog.records)


def test_resuming_a_finished_run_re_reports_consistently(finished, tmp_path, caplog):
    run = copy_run(finished, tmp_path / "run")
    with caplog.at_level(logging.INFO, logger="vitkit"):
        result = resume(run)
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith(f"resumed from {run / 'checkpoints' / 'last'} at step 4") for m in messages)
    assert any("summary.json is removed until the resumed run ends" in m for m in messages)
    assert result.status == "completed" and json.loads((run / "summary.json").read_text())["steps"] == 4
    assert (run / "metrics.csv").read_bytes() == (finished / "metrics.csv").read_bytes()


# ------------------------------------------------------------------------------------------------------ item 8
@pytest.fixture
def model_dir(tmp_path):
    torch.manual_seed(0)
    model = vitkit.create_model("vit_tiny_patch16_224", patch_size=4, depth=1, embed_dim=24, num_heads=2,
                                img_size=16, num_classes=10)
    return vitkit.save_pretrained(model, tmp_path / "model")


def test_convert_replaces_only_with_force(model_dir, tmp_path, capsys):
    dst = tmp_path / "dst"
    assert main(["convert", model_dir, str(dst)]) == 0
    before = (dst / "model.safetensors").read_bytes()
    assert main(["convert", model_dir, str(dst)]) == 2
    assert "pass --force" in capsys.readouterr().err
    assert (dst / "model.safetensors").read_bytes() == before
    assert main(["convert", model_dir, str(dst), "--force", "--num-classes", "3"]) == 0
    assert vitkit.load_model(dst).num_classes == 3


def test_convert_takes_a_run_folder(finished, tmp_path, capsys):
    assert main(["convert", str(finished), str(tmp_path / "out")]) == 0
    assert f"converting {finished / 'checkpoints' / 'best'}" in capsys.readouterr().out
    a = vitkit.load_model(tmp_path / "out").state_dict()
    b = vitkit.load_model(finished / "checkpoints" / "best").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in b)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_files_follow_the_umask(model_dir, tmp_path, umask):
    previous = os.umask(umask)
    try:
        assert main(["convert", model_dir, str(tmp_path / "out")]) == 0
        train(RECIPE, tmp_path / "run")
    finally:
        os.umask(previous)
    want = 0o666 & ~umask
    files = [tmp_path / "out" / "model.safetensors", tmp_path / "out" / "config.json",
             *(tmp_path / "run" / "checkpoints" / "last").iterdir(), tmp_path / "run" / "metrics.csv"]
    modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in files}
    assert modes == {name: want for name in modes}, {k: oct(v) for k, v in modes.items()}
