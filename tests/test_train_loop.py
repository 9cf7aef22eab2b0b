"""The training loop in-process on tiny models: the run folder, learning on real data, gradient accumulation,
clipping, a non-finite loss, the time budget, EMA, distillation and the resumable data order."""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

import vitkit
from vitkit.train import NonFiniteLossError, train
from vitkit.train.distributed import StepBatchSampler, stream_seed
from vitkit.train.run_outputs import COLUMNS
from vitkit.train.tasks import ClassifyTask


def recipe(**sections) -> dict:
    """A 6-step run of a 1-block ViT on 128 fake images. Pinned to fp32 (``amp: none``): the tests compare with
    float32 references, and ``auto`` would be bf16 on a CPU with native bf16."""
    base = {"model": {"name": "vit_tiny_patch16_224",
                      "overrides": {"patch_size": 4, "depth": 1, "embed_dim": 24, "num_heads": 2}},
            "data": {"name": "fake", "img_size": 16, "train_limit": 128, "test_limit": 32, "num_workers": 0,
                     "val_fraction": 0.125},
            "optim": {"lr": 1e-3, "warmup_steps": 2},
            "train": {"steps": 6, "batch_size": 16, "eval_every": 3, "seed": 0, "deterministic": True,
                      "threads": 1, "amp": "none"},
            "log": {"progress": False, "plots": False, "tensorboard": False}}
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return base


def weights(run: Path, which: str = "last") -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / which / "model.safetensors"))


def test_run_folder_layout_and_reports(tmp_path):
    run = tmp_path / "run"
    result = train(recipe(log={"plots": True, "tensorboard": True, "every_steps": 2}), run)
    assert result.status == "completed" and result.step == 6
    for f in ("config.yaml", "metrics.csv", "summary.json", "checkpoints/last/model.safetensors",
              "checkpoints/last/config.json", "checkpoints/last/train_state.safetensors",
              "checkpoints/last/train_state.json", "checkpoints/best/model.safetensors",
              "checkpoints/best/config.json", "plots/loss.png", "plots/accuracy.png", "plots/lr.png",
              "eval/test/metrics.json", "eval/test/confusion_matrix.csv"):
        assert (run / f).is_file(), f
    assert not (run / "checkpoints" / "best" / "train_state.json").exists()
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    # a training row every log.every_steps steps (rows from the first steps), an evaluation row per epoch;
    # step 6 ends an epoch, so its training numbers go into the evaluation row
    assert list(rows[0]) == COLUMNS and [int(r["step"]) for r in rows] == [2, 3, 4, 6]
    assert all(r["lr"] and r["elapsed_s"] and r["train_loss"] for r in rows)
    assert [bool(r["val_top1"]) for r in rows] == [False, True, False, True]
    rows = [r for r in rows if r["val_top1"]]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["test"]["num_samples"] == 32 and summary["environment"]["threads"] == 1
    assert summary["environment"]["torch"] == torch.__version__
    # TensorBoard: the event files hold the validation curve of metrics.csv and a training loss every 2 steps
    from conftest import require
    events = require("tensorboard.backend.event_processing.event_accumulator").EventAccumulator(
        str(run / "tensorboard"))
    events.Reload()
    val = [(e.step, e.value) for e in events.Scalars("eval/val_top1")]
    assert val == [(int(r["step"]), pytest.approx(float(r["val_top1"]), abs=1e-6)) for r in rows]
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4, 6]
    assert all(0 < e.value < 10 for e in events.Scalars("train/loss"))


def test_the_final_test_uses_best_weights_not_the_last(tmp_path, monkeypatch):
    """Validation at steps 2, 4 and 6 reports a top-1 that falls every time (the real evaluation, its top-1 then
    overwritten with 1.0, 0.9, 0.8), so best/ is selected at step 2 and the last weights are 4 AdamW steps further.
    The reported test numbers must be those of best/, recomputed here, which differ from the last weights' ones."""
    real_evaluate, falling = ClassifyTask.evaluate, iter([1.0, 0.9, 0.8])

    def falling_val_top1(self, model, loader, device, amp_dtype, class_names=None):
        result = real_evaluate(self, model, loader, device, amp_dtype, class_names)
        if result.num_samples == 16:  # the validation split (the test split has 32 images)
            result.metrics["top1"] = next(falling)
        return result

    monkeypatch.setattr(ClassifyTask, "evaluate", falling_val_top1)
    run = tmp_path / "run"
    summary = train(recipe(optim={"lr": 5e-3}, train={"eval_every": 2}), run).summary
    assert next(falling, None) is None  # three validations
    assert summary["best"] == {"step": 2, "top1": 1.0}
    assert summary["test"]["weights"].startswith("best (step 2")
    assert vitkit.load_model(run / "checkpoints" / "best").class_names == [f"class_{k}" for k in range(10)]
    with_best = _evaluate_split(run, weights(run, "best"), "test")
    with_last = _evaluate_split(run, weights(run, "last"), "test")
    assert with_best[0] != pytest.approx(with_last[0], rel=1e-3), (with_best, with_last)  # told apart
    reported = (summary["test"]["loss"], summary["test"]["top1"])
    assert reported == pytest.approx(with_best, rel=1e-5), \
        f"reported test (loss, top1) {reported}: best/ gives {with_best}, the last weights {with_last}"
    metrics = json.loads((run / "eval" / "test" / "metrics.json").read_text())
    assert metrics["loss"] == pytest.approx(with_best[0], rel=1e-5)


def test_training_learns_digits(tmp_path):
    r = recipe(model={"overrides": {"patch_size": 4, "depth": 2, "embed_dim": 48, "num_heads": 3,
                                    "global_pool": "avg"}},
               data={"name": "digits", "train_limit": None, "test_limit": None, "val_fraction": 0.1,
                     "interpolation": "bilinear", "mean": [0.5] * 3, "std": [0.5] * 3},
               augment={"crop_padding": 0, "hflip": 0.0},
               optim={"lr": 3e-3, "warmup_steps": 10}, train={"steps": 120, "batch_size": 64, "eval_every": 60})
    summary = train(r, tmp_path / "run").summary
    assert summary["test"]["top1"] > 0.5  # chance is 0.1; ~0.6 after these 120 steps, ~0.98 in the demo


def _micro_batches_per_step(recipe_dict: dict, run: Path) -> list[list[int]]:
    """Train, recording the batch size of every training forward of the model and grouping them by optimiser step
    (global forward and optimiser-step hooks, removed afterwards)."""
    steps: list[list[int]] = [[]]

    def forward(module, args, output):
        if isinstance(module, vitkit.families.vit.model.VisionTransformer) and module.training:
            steps[-1].append(args[0].shape[0])

    def stepped(optimizer, args, kwargs):
        steps.append([])

    handles = [torch.nn.modules.module.register_module_forward_hook(forward),
               register_optimizer_step_post_hook(stepped)]
    try:
        train(recipe_dict, run)
    finally:
        for h in handles:
            h.remove()
    assert steps[-1] == []  # nothing trained after the last optimiser step
    return steps[:-1]


def test_gradient_accumulation_runs_micro_batches_and_matches_one_big_batch(tmp_path):
    assert _micro_batches_per_step(recipe(), tmp_path / "a") == [[16]] * 6
    assert _micro_batches_per_step(recipe(train={"accum_steps": 4}), tmp_path / "b") == [[4, 4, 4, 4]] * 6
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    for k in a:  # the mean of the micro-batch losses: the same update as one batch of 16
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("amp", ["none", "bf16"])
def test_an_accumulated_sgd_step_is_the_mean_gradient_of_the_global_batch(tmp_path, monkeypatch, amp):
    """One plain SGD step (no momentum, no weight decay, constant lr) in 4 micro-batches of 4. The head starts at zero,
    so every logit is 0 and the softmax 1/K: the head's gradient is known in closed form from the 16 labels y_i and
    pre-logit features f_i, d bias_k = mean_i (1/K - [y_i = k]) and d W_k = mean_i (1/K - [y_i = k]) f_i. Summing
    the micro-batch losses without dividing by accum_steps makes the step 4 times too long (a relative error of 3);
    the 2% tolerance covers bf16, whose backward rounds the logits' gradient to 8 bits, so it holds in both."""
    lr, K = 0.5, 10
    seen, start = [], {}  # (labels, pre-logit features, logits) of every training micro-batch; the head before it
    real_call = ClassifyTask.__call__

    def recording(self, model, batch, g):
        captured = {}
        start.setdefault("head", {k: v.detach().clone() for k, v in model.head.state_dict().items()})
        hook = model.head.register_forward_hook(lambda m, args, out: captured.update(f=args[0], z=out))
        try:
            out = real_call(self, model, batch, g)
        finally:
            hook.remove()
        seen.append((batch[1], captured["f"].detach().double(), captured["z"].detach()))
        return out

    monkeypatch.setattr(ClassifyTask, "__call__", recording)
    r = recipe(optim={"name": "sgd", "lr": lr, "momentum": 0.0, "weight_decay": 0.0, "warmup_steps": 0,
                      "schedule": "constant"},
               train={"steps": 1, "eval_every": 1, "accum_steps": 4, "amp": amp})
    train(r, tmp_path / "run")
    assert [len(y) for y, _, _ in seen] == [4] * 4 and all(not z.any() for *_, z in seen)  # every logit is 0
    y, f = torch.cat([y for y, _, _ in seen]), torch.cat([f for _, f, _ in seen])  # (16,), (16, D)
    dlogits = (1 / K - F.one_hot(y, K).double()) / len(y)  # d mean-CE / d logits at the uniform softmax, (16, K)
    after = weights(tmp_path / "run")
    for name, grad in (("bias", dlogits.sum(0)), ("weight", dlogits.T @ f)):
        update = after[f"head.{name}"].double() - start["head"][name].double()
        err = ((update + lr * grad).norm() / (lr * grad).norm()).item()
        assert err < 0.02, f"head.{name}: the SGD update is {err:.3g} (relative) away from -lr x the mean gradient"


def test_gradient_clipping_bounds_the_update(tmp_path):
    run = tmp_path / "run"
    r = recipe(optim={"name": "sgd", "lr": 1.0, "momentum": 0.0, "weight_decay": 0.0, "warmup_steps": 0,
                      "clip_grad": 1e-3, "schedule": "constant"},
               train={"steps": 1, "eval_every": 1})
    train(r, run)
    torch.manual_seed(stream_seed(0, "init"))  # the loop's initial weights depend on the seed only
    init = vitkit.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, depth=1, embed_dim=24,
                               num_heads=2, num_classes=10)
    after = weights(run)
    delta = torch.cat([(after[k] - v).flatten() for k, v in init.state_dict().items()])
    assert delta.norm().item() == pytest.approx(1e-3, rel=1e-3)  # SGD lr 1: the update is the clipped gradient


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    run = tmp_path / "run"
    calls = {"n": 0}
    real = ClassifyTask.criterion

    def nan_from_step_7(self, logits, targets):
        calls["n"] += 1
        loss = real(self, logits, targets)
        return loss * float("nan") if calls["n"] >= 7 else loss

    monkeypatch.setattr(ClassifyTask, "criterion", nan_from_step_7)
    with pytest.raises(NonFiniteLossError, match=r"step 7 .*left untouched"):
        train(recipe(train={"steps": 10, "eval_every": 100, "checkpoint_every_steps": 5}), run)
    state = json.loads((run / "checkpoints" / "last" / "train_state.json").read_text())
    assert state["state"]["step"] == 5
    assert all(torch.isfinite(v).all() for v in weights(run).values())


@pytest.mark.serial
def test_time_budget_plan_is_laid_out_once_and_survives_a_resume(tmp_path, caplog):
    """The budget is calibrated on steps 4-8 and the schedule laid out over the steps that fit; a run stopped by
    SIGTERM after that (sent from inside the run at step 9) and resumed keeps the plan: it does not calibrate again,
    continues the saved schedule (whose length follows the measured speed) and runs the remaining steps within the
    one budget."""
    import logging
    import os
    import signal
    from vitkit.train import resume
    run = tmp_path / "run"
    budget = 0.25
    r = recipe(train={"steps": None, "time_budget_minutes": budget, "budget_calibration_steps": 5,
                      "eval_every": 50, "checkpoint_every_steps": 0})
    done = []

    def count_and_stop_at_9(optimizer, args, kwargs):
        done.append(1)
        if len(done) == 9:
            os.kill(os.getpid(), signal.SIGTERM)  # the run's own handler turns it into a stop at a step boundary

    caplog.set_level(logging.INFO, logger="vitkit")
    handle = register_optimizer_step_post_hook(count_and_stop_at_9)
    try:
        first = train(r, run)
    finally:
        handle.remove()
    plans = [m for m in caplog.messages if m.startswith("time budget")]
    state = json.loads((run / "checkpoints" / "last" / "train_state.json").read_text())
    planned = state["state"]["total_steps"]
    # one plan message; the plan then follows the measured speed, so the saved length is the latest one
    laid_out = int(re.search(r"laid out over (\d+) steps", plans[0]).group(1)) if len(plans) == 1 else None
    assert first.status == "interrupted" and laid_out is not None and 0.5 < planned / laid_out < 2, (plans, planned)
    assert state["state"]["planned"] and state["schedule"]["total_steps"] == planned
    stopped = state["state"]["step"]
    assert stopped == 10 and planned > stopped, (stopped, planned)  # stopped after the plan, before its end
    caplog.clear()
    done.clear()
    handle = register_optimizer_step_post_hook(lambda optimizer, args, kwargs: done.append(1))
    try:
        result = resume(run)
    finally:
        handle.remove()
    s = result.summary
    assert not [m for m in caplog.messages if m.startswith("time budget")]  # no second calibration
    assert result.status == "completed"
    # the resumed run continues the saved plan (its length keeps following the measured speed, as in one session)
    assert 0.5 < s["planned_steps"] / planned < 2, (s["planned_steps"], planned)
    assert s["steps"] == stopped + len(done) <= s["planned_steps"]  # only the remaining steps
    end = json.loads((run / "checkpoints" / "last" / "train_state.json").read_text())
    assert end["schedule"]["total_steps"] == s["planned_steps"]
    assert s["wall_time_s"] <= budget * 60 + 10  # one budget for both sessions (slack: the final test, a loaded CPU)


def _evaluate_split(run: Path, state: dict[str, torch.Tensor], split: str) -> tuple[float, float]:
    """(loss, top1) of the run's model with ``state`` loaded, on the recipe's val or test split, computed here."""
    from vitkit.data import DataConfig, TransformDataset, build_eval_transform, build_splits, collate_skip_none
    from vitkit.evaluate import evaluate
    model = vitkit.load_model(run / "checkpoints" / "last")
    model.load_state_dict(state)
    cfg = DataConfig(name="fake", img_size=16, train_limit=128, test_limit=32, val_fraction=0.125)
    data = TransformDataset(getattr(build_splits(cfg), split), build_eval_transform(cfg, model.data_cfg.mean,
                                                                                     model.data_cfg.std))
    loader = torch.utils.data.DataLoader(data, batch_size=16, collate_fn=collate_skip_none)
    r = evaluate(model, loader, progress=False)
    return r.loss, r.top1


def test_ema_weights_are_validated_saved_as_best_and_tested(tmp_path):
    run = tmp_path / "run"
    summary = train(recipe(train={"ema": True, "ema_decay": 0.5, "ema_warmup": False, "eval_every": 6}),
                    run).summary  # one validation, at the last step: best/ is selected there
    state = load_file(str(run / "checkpoints" / "last" / "train_state.safetensors"))
    ema = {k[4:]: v for k, v in state.items() if k.startswith("ema.")}
    raw = weights(run, "last")
    assert ema.keys() == raw.keys() and any(not torch.equal(ema[k], raw[k]) for k in raw)
    assert summary["best"]["step"] == 6
    best = weights(run, "best")
    differ = [k for k in ema if not torch.equal(best[k], ema[k])]
    assert best.keys() == ema.keys() and not differ, f"best/ does not hold the EMA weights: {differ[:3]} differ"
    row = list(csv.DictReader(open(run / "metrics.csv")))[-1]
    for split, reported in (("val", (float(row["val_loss"]), float(row["val_top1"]))),
                            ("test", (summary["test"]["loss"], summary["test"]["top1"]))):
        with_ema, with_raw = _evaluate_split(run, ema, split), _evaluate_split(run, raw, split)
        assert with_ema[0] != pytest.approx(with_raw[0], rel=1e-4)  # the two weight sets are told apart
        assert reported == pytest.approx(with_ema, rel=1e-5), \
            f"reported {split} (loss, top1) {reported}: EMA weights give {with_ema}, raw weights {with_raw}"


# ------------------------------------------------------------------------------------------------- distillation
_DIGITS = {"name": "digits", "train_limit": None, "test_limit": None, "val_fraction": 0.1, "interpolation": "bilinear",
           "mean": [0.5] * 3, "std": [0.5] * 3}


def _digits_split(which: str, mean, std) -> tuple[torch.Tensor, torch.Tensor]:
    from vitkit.data import DataConfig, TransformDataset, build_eval_transform, build_splits, collate_skip_none
    cfg = DataConfig(name="digits", img_size=16, val_fraction=0.1, interpolation="bilinear")
    data = TransformDataset(getattr(build_splits(cfg), which), build_eval_transform(cfg, mean, std))
    return collate_skip_none([data[i] for i in range(len(data))])  # (N, 3, 16, 16), (N,)


def _teacher_disagreeing_with_labels(folder: Path) -> nn.Module:
    """A real, non-zero teacher whose predictions are not the labels: a random tiny ViT trunk with a head fitted (least
    squares on its frozen features, train split) to the label + 3 (mod 10). Its test predictions are spread over all
    classes, so agreeing with it is not agreeing with the labels, and a constant guess agrees ~1/10 of the time."""
    from conftest import randomize_, require
    require("sklearn")  # the digits dataset
    teacher = randomize_(vitkit.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, depth=1,
                                             embed_dim=24, num_heads=2, num_classes=10)).eval()
    x, y = _digits_split("train", teacher.data_cfg.mean, teacher.data_cfg.std)
    with torch.no_grad():
        feats = teacher.forward_head(teacher.forward_features(x), pre_logits=True)  # (N, 24)
        a = torch.cat([feats, torch.ones(len(feats), 1)], dim=1)  # (N, 25) with a bias column
        target = 2 * F.one_hot((y + 3) % 10, 10).float() - 1  # (N, 10)
        w = torch.linalg.solve(a.T @ a + 1e-2 * torch.eye(a.shape[1]), a.T @ target)  # (25, 10)
        teacher.head.weight.copy_(w[:-1].T)
        teacher.head.bias.copy_(w[-1])
        assert (teacher(x).argmax(1) == (y + 3) % 10).float().mean() > 0.6
    vitkit.save_pretrained(teacher, folder)
    return teacher


def _distill_recipe(teacher: Path, **distillation) -> dict:
    return recipe(model={"name": "deit_tiny_distilled_patch16_224",
                         "overrides": {"patch_size": 4, "depth": 2, "embed_dim": 48, "num_heads": 3}},
                  data=_DIGITS, augment={"crop_padding": 0, "hflip": 0.0}, optim={"lr": 3e-3, "warmup_steps": 5},
                  train={"steps": 60, "batch_size": 64, "eval_every": 60, "task": "distill",
                         "distillation": {"teacher": str(teacher), **distillation}})


def _independent_distillation_loss(student, teacher, images, labels, kind, tau, alpha, smoothing):
    """DeiT's DistillationLoss written out in float64 from the model parts: CE with label smoothing on the class
    head; the distillation head against the teacher (hard: CE to its argmax; soft: KL(teacher/τ ‖ student/τ)·τ²
    summed over the batch and divided by B·K); the teacher sees the batch re-normalised to its own statistics."""
    def log_softmax(z):
        z = z.double()
        return z - torch.logsumexp(z, dim=1, keepdim=True)
    with torch.no_grad():
        feats = student.forward_features(images)  # (B, 2 + N, D)
        cls_logits, dist_logits = student.head(feats[:, 0]), student.head_dist(feats[:, 1])  # (B, K) each
        s_mean, s_std, t_mean, t_std = (torch.tensor(v).view(1, 3, 1, 1) for v in (
            student.data_cfg.mean, student.data_cfg.std, teacher.data_cfg.mean, teacher.data_cfg.std))
        teacher_logits = teacher((images * s_std + s_mean - t_mean) / t_std)  # (B, K)
    B, K = cls_logits.shape
    lp = log_softmax(cls_logits)
    base = -((1 - smoothing) * lp[torch.arange(B), labels] + smoothing * lp.mean(dim=1)).mean()
    if kind == "hard":
        distill = -log_softmax(dist_logits)[torch.arange(B), teacher_logits.argmax(dim=1)].mean()
    else:
        log_p_t, log_p_s = log_softmax(teacher_logits / tau), log_softmax(dist_logits / tau)
        distill = (log_p_t.exp() * (log_p_t - log_p_s)).sum() * tau ** 2 / (B * K)
    return (1 - alpha) * base + alpha * distill, distill


@pytest.mark.parametrize("kind,tau,alpha", [("hard", 1.0, 0.5), ("soft", 2.0, 0.3)])
def test_distillation_loss_is_deits_formula_on_a_fixed_batch(tmp_path, kind, tau, alpha):
    from conftest import randomize_
    from vitkit.train.build import build_task
    from vitkit.train.config import resolve
    teacher = randomize_(vitkit.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, depth=1,
                                             embed_dim=24, num_heads=2, num_classes=10), seed=1).eval()
    vitkit.save_pretrained(teacher, tmp_path / "teacher")
    cfg = resolve(recipe(model={"name": "deit_tiny_distilled_patch16_224"}, augment={"label_smoothing": 0.1},
                         train={"task": "distill", "distillation": {"teacher": str(tmp_path / "teacher"),
                                                                    "type": kind, "tau": tau, "alpha": alpha}}))
    student = randomize_(vitkit.create_model("deit_tiny_distilled_patch16_224", img_size=16, patch_size=4,
                                             depth=1, embed_dim=24, num_heads=2, num_classes=10), seed=2)
    task = build_task(cfg, student, torch.device("cpu"))
    task.prepare(student)
    images = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([0, 3, 3, 7, 9, 1])
    out = task(student.train(), (images, labels), torch.Generator().manual_seed(0))
    total, distill = _independent_distillation_loss(student.eval(), teacher, images, labels, kind, tau, alpha, 0.1)
    assert distill > 0.05  # a real teacher and a non-zero distillation head: the term is not vacuous
    assert out["distill_loss"].item() == pytest.approx(distill.item(), rel=1e-5)
    assert out["loss"].item() == pytest.approx(total.item(), rel=1e-5)


@pytest.mark.parametrize("kind,tau,alpha", [("hard", 1.0, 0.5), ("soft", 1.0, 0.9)])
def test_distillation_head_learns_to_agree_with_the_teacher(tmp_path, kind, tau, alpha):
    teacher = _teacher_disagreeing_with_labels(tmp_path / "teacher")
    train(_distill_recipe(tmp_path / "teacher", type=kind, tau=tau, alpha=alpha), tmp_path / "run")
    student = vitkit.load_model(tmp_path / "run" / "checkpoints" / "last").eval()
    x, y = _digits_split("test", student.data_cfg.mean, student.data_cfg.std)  # same statistics as the teacher
    with torch.no_grad():
        wanted = teacher(x).argmax(1)
        feats = student.forward_features(x)
        dist_pred, cls_pred = student.head_dist(feats[:, 1]).argmax(1), student.head(feats[:, 0]).argmax(1)
    agree = (dist_pred == wanted).float().mean().item()
    constant = torch.bincount(wanted, minlength=10).max().item() / len(wanted)  # best constant guess
    label_head = (cls_pred == wanted).float().mean().item()  # a head trained on the labels only
    # measured (seed 0): hard 0.34, soft 0.32 agreement; best constant 0.13; class head 0.08
    assert agree > constant + 0.1 and agree > label_head + 0.15, (agree, constant, label_head)


def test_data_order_is_global_and_resumable():
    n, B = 50, 8
    one = StepBatchSampler(n, B, accum_steps=2, seed=3)
    two = [StepBatchSampler(n, B, accum_steps=2, rank=r, world_size=2, seed=3) for r in range(2)]
    for s in (one, *two):
        s.set_position(epoch=1)
    single = list(one)  # micro-batches of 4
    ranks = [list(s) for s in two]  # micro-batches of 2 per rank
    assert len(single) == 2 * (n // B)
    for j, micro in enumerate(single):  # the two ranks together see exactly the one-process micro-batch
        assert sorted(ranks[0][j] + ranks[1][j]) == sorted(micro)
    flat = [i for micro in single for i, _ in micro]
    assert len(set(flat)) == len(flat) and all(e == 1 for micro in single for _, e in micro)
    one.set_position(epoch=1, start_step=3)  # resuming at step 3 replays the rest of the epoch exactly
    assert list(one) == single[3 * 2:]
    one.set_position(epoch=2)
    assert list(one) != single  # a new permutation each epoch


def _train_recording_forwards(recipe_dict: dict, run: Path) -> tuple[list[tuple], dict]:
    """Train, recording for every forward of an nn.Linear or of the whole model (a global forward hook, removed
    afterwards): (module type, training mode, autocast enabled on CPU, autocast dtype, output dtype)."""
    calls: list[tuple] = []

    def hook(module, args, output):
        if isinstance(module, (nn.Linear, vitkit.families.vit.model.VisionTransformer)) and isinstance(output, torch.Tensor):
            calls.append((type(module).__name__, module.training, torch.is_autocast_enabled("cpu"),
                          torch.get_autocast_dtype("cpu"), output.dtype))

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        summary = train(recipe_dict, run).summary
    finally:
        handle.remove()
    return calls, summary


def test_bf16_autocast_covers_training_and_evaluation_forwards(tmp_path):
    calls, summary = _train_recording_forwards(recipe(train={"amp": "bf16", "deterministic": False}), tmp_path / "bf16")
    fp32_calls, fp32_summary = _train_recording_forwards(recipe(train={"deterministic": False}), tmp_path / "fp32")
    kinds = {(name, training) for name, training, *_ in calls}
    assert {("Linear", True), ("Linear", False), ("VisionTransformer", True), ("VisionTransformer", False)} <= kinds
    outside = [c for c in calls if not (c[2] and c[3] == c[4] == torch.bfloat16)]  # training, validation, test
    assert not outside, f"forwards outside bf16 autocast (module, training, enabled, dtype, output): {outside[:2]}"
    assert not any(on for _, _, on, _, _ in fp32_calls) and all(out == torch.float32 for *_, out in fp32_calls)
    # the weights stay float32; the run is close to the float32 run but not the same computation
    bf16, fp32 = weights(tmp_path / "bf16"), weights(tmp_path / "fp32")
    torch.manual_seed(stream_seed(0, "init"))  # the loop's initial weights depend on the seed only
    init = vitkit.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, depth=1, embed_dim=24, num_heads=2,
                               num_classes=10)
    assert all(v.dtype == torch.float32 for v in bf16.values())
    flat = {name: torch.cat([w[k].flatten() for k in sorted(w)]) for name, w in (("bf16", bf16), ("fp32", fp32))}
    moved = (flat["fp32"] - torch.cat([init.state_dict()[k].flatten() for k in sorted(fp32)])).norm()
    gap = (flat["bf16"] - flat["fp32"]).norm()
    assert 0 < gap < 0.25 * moved, (gap.item(), moved.item())  # measured: 0.03 of the distance trained
    assert summary["val"]["loss"] != fp32_summary["val"]["loss"]
    assert summary["val"]["loss"] == pytest.approx(fp32_summary["val"]["loss"], abs=0.02)


def test_train_compile_trains_through_the_compiled_model(tmp_path, eager_compile):
    """train.compile hands the model to torch.compile and trains through what it returns (dynamo's eager backend
    here, see conftest.eager_compile; the slow test below compiles with inductor)."""
    from torch._dynamo.utils import counters
    train(recipe(train={"compile": True, "steps": 3, "eval_every": 3}), tmp_path / "compiled")
    assert len(eager_compile) == 1 and isinstance(eager_compile[0], vitkit.families.vit.model.VisionTransformer)
    assert counters["frames"]["ok"] >= 1 and counters["stats"]["unique_graphs"] >= 1  # dynamo ran the steps
    train(recipe(train={"steps": 3, "eval_every": 3}), tmp_path / "eager")
    a, b = weights(tmp_path / "compiled"), weights(tmp_path / "eager")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_train_compile_with_inductor_matches_eager(tmp_path):
    train(recipe(train={"compile": True, "steps": 3, "eval_every": 3, "deterministic": False}), tmp_path / "c")
    train(recipe(train={"steps": 3, "eval_every": 3, "deterministic": False}), tmp_path / "e")
    a, b = weights(tmp_path / "c"), weights(tmp_path / "e")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_fine_tuning_starts_from_pretrained_weights_with_a_zero_head(tmp_path):
    """The pretrain -> fine-tune path with the genuinely trained DeiT-Tiny in ../shared/weights: the trunk starts
    from the file (position embeddings resampled to the new grid), the new 10-class head starts at zero."""
    from conftest import REPO, skip_or_fail
    path = REPO.parent / "shared" / "weights" / "deit_tiny_patch16_224_in1k_fp16.safetensors"
    if not path.is_file():
        skip_or_fail(f"shared DeiT-Tiny weights not found at {path}")
    r = recipe(model={"name": "deit_tiny_patch16_224", "pretrained": str(path), "overrides": {}},
               data={"img_size": 32},
               optim={"name": "sgd", "lr": 1e-12, "momentum": 0.0, "weight_decay": 0.0, "warmup_steps": 0},
               train={"steps": 1, "eval_every": 1})
    train(r, tmp_path / "run")
    after = weights(tmp_path / "run")
    source = load_file(str(path))
    assert torch.equal(after["blocks.5.mlp.fc1.weight"], source["blocks.5.mlp.fc1.weight"].float())
    assert after["pos_embed"].shape == (1, 1 + 2 * 2, 192)  # 14x14 grid resampled to 2x2
    assert after["head.weight"].shape == (10, 192) and after["head.weight"].abs().max() < 1e-9


def test_resume_keeps_the_recipe_but_allows_paths_and_logging(tmp_path):
    from vitkit.config import ConfigError
    from vitkit.train import resume
    run = tmp_path / "run"
    train(recipe(train={"steps": 2, "eval_every": 2}), run)
    with pytest.raises(ConfigError, match="optim.lr"):
        resume(run, ["optim.lr=1.0"])
    result = resume(run, ["log.plots=true", "data.num_workers=0"])  # a finished run only re-reports
    assert result.status == "completed" and result.step == 2
    assert (run / "plots" / "loss.png").is_file()


def test_test_curve_and_the_transfer_plot_script_end_to_end(tmp_path):
    """log.test_curve records the test split at every validation (with the weights of that step); the README's
    scripts/plot_transfer.py draws two such runs."""
    import subprocess
    import sys
    from conftest import REPO
    for name, lr in (("a", 1e-3), ("b", 3e-3)):
        train(recipe(optim={"lr": lr}, log={"test_curve": True}), tmp_path / name)
    rows = list(csv.DictReader(open(tmp_path / "a" / "metrics.csv")))
    assert [int(r["step"]) for r in rows] == [3, 6]
    assert all(r["test_top1"] and r["test_loss"] for r in rows), f"log.test_curve: no test columns in {rows}"
    loss, top1 = _evaluate_split(tmp_path / "a", weights(tmp_path / "a"), "test")  # the step-6 weights, here
    assert (float(rows[-1]["test_loss"]), float(rows[-1]["test_top1"])) == pytest.approx((loss, top1), rel=1e-5)
    plain = list(csv.DictReader(open(tmp_path / "a" / "metrics.csv")))
    train(recipe(), tmp_path / "off")
    assert not any(r["test_top1"] for r in csv.DictReader(open(tmp_path / "off" / "metrics.csv")))
    out = tmp_path / "transfer.png"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "plot_transfer.py"), f"lr 1e-3={tmp_path / 'a'}",
                           f"lr 3e-3={tmp_path / 'b'}", "an earlier run@29.5=94.96", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"wrote {out}" in proc.stdout and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plain == rows  # the script only reads the runs
    failed = subprocess.run([sys.executable, str(REPO / "scripts" / "plot_transfer.py"), f"a={tmp_path / 'a'}",
                             f"off={tmp_path / 'off'}", str(out)], capture_output=True, text=True, timeout=120)
    assert failed.returncode != 0 and "no test_top1 values" in failed.stderr  # a run without the curve


def test_plot_accuracy_vs_minutes(tmp_path):
    from vitkit.train.run_outputs import plot_accuracy_vs_minutes
    for name, accs in (("a", "0.5,0.7"), ("b", "0.2,0.3")):
        (tmp_path / name).mkdir()
        rows = [f"1,{100 * i},{60.0 * (i + 1)},{acc}" for i, acc in enumerate(accs.split(","))]
        (tmp_path / name / "metrics.csv").write_text("epoch,step,elapsed_s,test_top1\n" + "\n".join(rows) + "\n")
    out = tmp_path / "plot.png"
    plot_accuracy_vs_minutes({"pre-trained": tmp_path / "a", "scratch": tmp_path / "b"}, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "metrics.csv").write_text("epoch,step,elapsed_s,test_top1\n1,10,5,\n")
    with pytest.raises(ValueError, match="no test_top1"):
        plot_accuracy_vs_minutes({"empty": tmp_path / "c"}, out)
