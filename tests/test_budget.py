"""Budgets hold: the plan's arithmetic (``vitkit.train.budget``); a real
time-budgeted ``vitkit train`` process that ends within its budget although its test split alone would take longer
than the budget, showing step lines and metrics rows from the first steps and never the placeholder step count; and
runs on a simulated clock, exact whatever the machine's load, through a noisy machine and a neighbour that makes
steps 10 times slower for a while."""
from __future__ import annotations

import csv
import dataclasses
import json
import random
import signal
import subprocess
import sys
import time

import pytest
import yaml

from vitkit.train.budget import EVAL_SHARE, Costs, plan, warmup_for
from vitkit.train.loop import _UNPLANNED


def costs(**kw) -> Costs:
    base = dict(step_s=1.0, image_s=0.0, n_val=0, n_test=0, checkpoint_s=0.0, end_s=0.0)
    return Costs(**{**base, **kw})


def predicted_end(p, c: Costs, step: int, elapsed: float, eval_every: int, curve: bool) -> float:
    """Brute force: walk the planned steps, adding each validation when it falls due, then the end of the run."""
    t = elapsed
    for s in range(step + 1, p.total_steps + 1):
        t += c.step_s
        if s % eval_every == 0 and s != p.total_steps:
            t += c.image_s * (c.n_val + (c.n_test if curve else 0)) + c.checkpoint_s
    return t + c.image_s * (c.n_val + (c.n_test if curve else 0) + p.test_images) + 2 * c.checkpoint_s + c.end_s


def test_steps_only():
    p = plan(100.0, 10.0, step=5, max_steps=10**9, costs=costs(step_s=0.5), eval_every=10**9, checkpoint_every=0,
             test_curve=False)
    assert p.total_steps == 5 + 180 and p.test_images == 0


@pytest.mark.parametrize("n_test, curve", [(100, True), (2000, True), (2000, False), (50_000, True)])
def test_the_planned_run_ends_by_the_target(n_test, curve):
    c = costs(step_s=0.2, image_s=0.001, n_val=200, n_test=n_test, checkpoint_s=0.3, end_s=2.0)
    p = plan(120.0, 15.0, step=20, max_steps=10**9, costs=c, eval_every=50, checkpoint_every=0, test_curve=curve)
    end = predicted_end(p, c, 20, 15.0, 50, p.test_curve)
    assert end <= 120.0 + c.step_s  # within one step of the target (the plan amortises validations per step)
    assert end >= 120.0 - 0.05 * 120  # and it uses the budget: the run does not end early
    if n_test >= 50_000:  # 50 s a pass: the curve is dropped and the final test limited to what fits
        assert not p.test_curve and p.test_images < n_test
        assert c.image_s * p.test_images <= EVAL_SHARE * (120.0 - 15.0)
    elif curve:
        assert p.test_curve and p.test_images == n_test


def test_max_steps_and_at_least_one_more_step():
    c = costs(step_s=1.0)
    assert plan(10.0, 50.0, 7, 10**9, c, 10, 0, False).total_steps == 8  # over budget already: one more step
    assert plan(1000.0, 0.0, 0, 30, c, 10, 0, False).total_steps == 30  # train.steps/epochs cap the plan


def test_dropped_curve_and_limited_test_are_warned():
    c = costs(step_s=1.0, image_s=0.01, n_val=10, n_test=10_000)
    p = plan(100.0, 10.0, 5, 10**9, c, 10, 0, True)
    notes = p.notes(c, curve_requested=True)
    assert any(n.startswith("log.test_curve: off for this run") for n in notes)
    assert any(f"first {p.test_images} of 10000 test images" in n and "data.test_limit" in n for n in notes)


@pytest.mark.parametrize("warmup, total, expected", [(0, 10, 0), (200, 1000, 200), (200, 400, 200),
                                                     (200, 399, 79), (200, 7, 1), (5, 3, 1)])
def test_warmup_shortened_for_short_plans(warmup, total, expected):
    assert warmup_for(warmup, total) == expected


BUDGET_MIN = 0.5
RECIPE = {
    "model": {"name": "vit_tiny_patch16_224", "overrides": {"patch_size": 4, "depth": 2, "embed_dim": 64,
                                                            "num_heads": 2}},
    "data": {"name": "fake", "img_size": 32, "train_limit": 4096, "test_limit": 200_000, "num_workers": 0},
    "optim": {"lr": 1e-3, "warmup_steps": 500},
    "train": {"time_budget_minutes": BUDGET_MIN, "batch_size": 64, "eval_every": 50, "seed": 0, "threads": 1},
    "log": {"progress": True, "plots": False, "tensorboard": False, "test_curve": True, "every_steps": 5},
}


@pytest.mark.serial
def test_budgeted_run_ends_within_its_budget(tmp_path):
    """200,000 test images would take minutes to score: the plan drops the test curve, limits the final test, and
    the process (interpreter start included) ends within its 30-second budget, loaded machine or not.

    The plan's precision (within 5% of the budget) is asserted on a simulated clock (``test_the_plan_holds_still``,
    ``test_a_transient_slowdown...``). This real run checks the wall clock with a tolerance for what the plan cannot
    foresee on a shared machine: the end of the run (last validation, test pass, two checkpoints, ~15% of this
    budget) runs at whatever speed the neighbours leave it, and Python's start-up is counted but not planned. A loaded
    2-core Xeon ended at 27.7 s (92%); a run that ignored its budget takes minutes (a 10x overrun was seen)."""
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(RECIPE))
    start = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "vitkit", "train", "r.yaml", "--out", "run"], capture_output=True,
                       text=True, cwd=tmp_path, timeout=300)
    wall = time.monotonic() - start
    assert r.returncode == 0, r.stderr
    budget = BUDGET_MIN * 60
    assert 0.8 * budget <= wall <= 1.2 * budget, f"{wall:.1f} s for a {budget:.0f} s budget\n{r.stderr}"
    out = r.stdout + r.stderr
    assert str(_UNPLANNED) not in out
    lines = r.stderr.splitlines()
    assert lines[1].startswith("step 1/?  loss")  # after the precision line: life from the first step
    assert any(line.startswith("time budget 30 s: ") for line in lines)
    assert any(line.startswith("log.test_curve: off for this run") for line in lines)
    assert any("warming up over" in line for line in lines)  # 500 warm-up steps cannot fit 30 s
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    assert [int(r["step"]) for r in rows[:2]] == [5, 10] and rows[0]["train_loss"]  # rows from the first steps
    assert int(rows[-1]["step"]) == summary["steps"] == summary["planned_steps"]
    assert rows[-1]["val_top1"] and float(rows[-1]["val_top1"]) == pytest.approx(summary["val"]["top1"], abs=1e-6)
    assert 0 < summary["test"]["num_samples"] < 200_000
    assert "\r" not in r.stderr  # not a terminal: plain lines, no progress-bar carriage returns


def test_data_limits_bound_every_split():
    """data.val_limit (new) and data.test_limit bound what a run evaluates, carved or folder validation alike."""
    from vitkit.config import ConfigError
    from vitkit.data import DataConfig, build_splits
    s = build_splits(DataConfig(name="digits", val_fraction=0.2, val_limit=10, test_limit=50))
    assert (len(s.val), len(s.test)) == (10, 50)
    full = build_splits(DataConfig(name="digits", val_fraction=0.2))
    assert len(s.train) == len(full.train)  # the carve-out is the same; only the validation images used shrink
    assert [s.val[i][1] for i in range(10)] == [full.val[i][1] for i in range(10)]
    with pytest.raises(ConfigError, match="data.val_limit"):
        DataConfig(name="digits", val_limit=0).validate()


@pytest.mark.serial
def test_a_budget_spent_before_planning_still_limits_the_end(tmp_path):
    """A run whose budget is gone before it could be planned (here 0.6 s: less than building it) stops after one step
    and tests on what fits, not on the whole 200,000-image test split."""
    recipe = {**RECIPE, "train": {**RECIPE["train"], "time_budget_minutes": 0.01}}
    from vitkit.train import train
    result = train(recipe, tmp_path / "run")
    assert result.status == "completed" and result.step == 1
    assert result.summary["planned_steps"] == 1 and result.summary["test"]["num_samples"] < 200_000


# ------------------------------------------------------------------------------- a simulated clock
# The trainer runs on a simulated clock: only steps take time, as long as ``step_s(step, now)`` says, so a budgeted
# run and a noisy neighbour are replayed exactly, whatever the machine's load. The model is not trained (the step is
# replaced by its bookkeeping); what is tested is the plan, the schedule and where the run ends.
SIM_BUDGET_MIN = 5.0
SIM_RECIPE = {
    "model": {"name": "vit_tiny_patch16_224", "overrides": {"patch_size": 4, "depth": 1, "embed_dim": 24,
                                                            "num_heads": 2}},
    "data": {"name": "fake", "img_size": 16, "train_limit": 256, "test_limit": 16, "val_fraction": 0.125,
             "num_workers": 0},
    "optim": {"lr": 1e-3, "warmup_steps": 20, "min_lr": 1e-6},
    "train": {"time_budget_minutes": SIM_BUDGET_MIN, "batch_size": 16, "eval_every": 400, "seed": 0,
              "threads": 1, "budget_calibration_steps": 10},
    "log": {"progress": False, "plots": False, "tensorboard": False, "every_steps": 1000},
}


class SimClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclasses.dataclass
class SimRun:
    lrs: list[float]  # the learning rate of every step
    totals: list[int]  # the planned length when each step ran
    ends: list[float]  # the simulated clock at the end of each step
    end_s: float  # the simulated clock when the run ended
    result: object


def simulated_run(tmp_path, monkeypatch, step_s, clock: SimClock | None = None, stop_at_s: float | None = None
                  ) -> SimRun:
    """Train SIM_RECIPE into ``tmp_path/run`` on ``clock`` (resuming the run there if it has a checkpoint); with
    ``stop_at_s``, a SIGTERM arrives at that simulated second."""
    from vitkit.runs import find_checkpoint
    from vitkit.train import _prepare_run_dir
    from vitkit.train.config import resolve
    from vitkit.train.distributed import init_distributed
    from vitkit.train.loop import Trainer
    from vitkit.train.process import runtime
    clock, run = clock or SimClock(), SimRun([], [], [], 0.0, None)

    def timed_step(self, micro_batches, stop_requested, over_budget):
        lr = self.schedule(self.state.step)
        run.lrs.append(lr)
        run.totals.append(self.state.total_steps)
        clock.now += step_s(self.state.step, clock.now)
        run.ends.append(clock.now)
        if stop_at_s is not None and clock.now >= stop_at_s:
            self.stop.signum = signal.SIGTERM  # as StopFlag records one: the run stops after the next step
        return {"loss_sum": 16 * 2.3, "correct": 2.0, "count": 16.0, "nonfinite": 0.0, "stop": float(stop_requested),
                "budget": float(over_budget), "lr": lr}
    monkeypatch.setattr(Trainer, "_train_step", timed_step)
    cfg, out = resolve(SIM_RECIPE), tmp_path / "run"
    last = find_checkpoint(out)
    info, device = init_distributed(cfg.train.device)
    with runtime(cfg.train, device, info.local_world_size) as threads:
        trainer = Trainer(cfg, out, info, device, threads, last, clock_start=clock.now, clock=clock)
        if last is None:
            _prepare_run_dir(out, cfg, info)
        run.result = trainer.fit()
    run.end_s = clock.now
    return run


def rises_after_warmup(lrs: list[float]) -> list[tuple[int, float, float]]:
    warmup = SIM_RECIPE["optim"]["warmup_steps"]
    return [(i, a, b) for i, (a, b) in enumerate(zip(lrs[warmup:], lrs[warmup + 1:]), warmup) if b > a]


def neighbour(base_s: float, factor: float, start_s: float, stop_s: float, jitter: float = 0.2):
    """Steps of ``base_s`` (+-``jitter``, seeded), ``factor`` times slower from ``start_s`` to ``stop_s``."""
    rng = random.Random(0)
    return lambda step, now: base_s * (factor if start_s <= now < stop_s else 1.0) * rng.uniform(1 - jitter,
                                                                                                   1 + jitter)


def test_a_transient_slowdown_does_not_restart_the_schedule(tmp_path, monkeypatch):
    """Issue 18, item 10, replayed at 1/6 scale: a neighbour makes steps 10 times slower for 27% of a 5-minute
    budget. The learning rate never rises after the warm-up; the plan shrinks while the neighbour stays and grows back
    when it leaves; the run still ends within its budget and decays to its minimum."""
    budget_s, base = SIM_BUDGET_MIN * 60, 0.2
    run = simulated_run(tmp_path, monkeypatch, neighbour(base, 10.0, 80.0, 160.0))
    rises = rises_after_warmup(run.lrs)
    assert not rises, f"the learning rate rose after the warm-up at steps {rises[:5]}"
    assert 0.95 * budget_s <= run.end_s <= budget_s, run.end_s
    assert run.result.status == "completed" and run.result.step == run.totals[-1]  # it ran its plan to the end
    before = [t for t, e in zip(run.totals, run.ends) if 30 < e <= 80]
    during = [t for t, e in zip(run.totals, run.ends) if 80 < e <= 160]
    after = run.totals[-1]
    assert min(during) < 0.75 * max(before) and after > 1.25 * min(during), (max(before), min(during), after)
    peak = SIM_RECIPE["optim"]["lr"]
    assert run.lrs[sum(e <= 160 for e in run.ends)] > 0.3 * peak  # the slow minutes did not spend the decay ...
    assert run.lrs[-1] < 0.02 * peak  # ... which ran to its end, not cut by the budget


def test_the_plan_holds_still_on_a_noisy_machine(tmp_path, monkeypatch):
    """Step times varying +-20% from step to step (about the noise that once made the plan, then timed over 10
    steps, jump between 34,000 and 41,000 steps from one log line to the next) move the planned length by less than
    10% in all, and rarely."""
    run = simulated_run(tmp_path, monkeypatch, neighbour(0.2, 1.0, 0.0, 0.0, jitter=0.2))
    planned = [t for t, e in zip(run.totals, run.ends) if e > 10]
    changes = sum(a != b for a, b in zip(planned, planned[1:]))
    assert changes <= len(planned) / 50 and max(planned) <= 1.1 * min(planned), (changes, min(planned), max(planned))
    assert 0.95 * SIM_BUDGET_MIN * 60 <= run.end_s <= SIM_BUDGET_MIN * 60  # it ends within 5% of its budget


def test_a_replanned_schedule_survives_a_resume(tmp_path, monkeypatch):
    """Stopped after the neighbour made it re-plan, the run saves the decays laid out so far; resumed, it continues
    the same schedule (the same rate at the step it resumes from, never rising) and ends within the one budget."""
    from vitkit.train.schedule import WarmupSchedule
    clock, step_s = SimClock(), neighbour(0.2, 10.0, 80.0, 160.0)
    first = simulated_run(tmp_path, monkeypatch, step_s, clock, stop_at_s=200.0)
    assert first.result.status == "interrupted"
    meta = json.loads((tmp_path / "run" / "checkpoints" / "last" / "train_state.json").read_text())
    saved = WarmupSchedule(**meta["schedule"])
    assert meta["state"]["lr_segments"] == [list(x) for x in saved.segments] and saved.segments
    second = simulated_run(tmp_path, monkeypatch, step_s, clock)
    step = meta["state"]["step"]
    assert second.result.status == "completed" and len(first.lrs) == step
    assert second.lrs[0] == saved(step)  # the restored schedule is the saved one
    assert not rises_after_warmup(first.lrs + second.lrs)
    assert clock.now <= SIM_BUDGET_MIN * 60 and second.lrs[-1] < 0.02 * SIM_RECIPE["optim"]["lr"]


def test_replanned_keeps_the_past_and_decays_the_rest_from_where_it_is():
    from vitkit.train.schedule import WarmupSchedule
    s = WarmupSchedule(lr=1.0, total_steps=100, warmup_steps=10, min_lr=0.1)
    longer = s.replanned(40, 400).replanned(60, 70)  # a neighbour left, then came back
    assert [longer(i) for i in range(41)] == [s(i) for i in range(41)]  # steps already run keep their rate
    rates = [longer(i) for i in range(10, 80)]
    assert all(b <= a for a, b in zip(rates, rates[1:])) and longer(69) > longer(70) == 0.1  # down to min_lr at 70
    assert longer.progress(40) == s.progress(40) and longer.progress(70) == 1.0
    assert s.replanned(5, 50).segments == () and s.replanned(5, 50)(5) == s(5)  # in the warm-up: the length only


def test_oversubscription_is_detected_with_its_remedy():
    from vitkit.train.process import oversubscription
    note = oversubscription(threads=2, load=4.1, cores=2)
    assert note.startswith("oversubscribed CPU: load average 4.1 on 2 cores while this run uses 2 threads")
    assert "OMP_WAIT_POLICY=PASSIVE" in note and "train.threads: 1" in note
    assert oversubscription(2, 2.6, cores=2) is None  # this run's own two threads, and some noise
    assert oversubscription(1, 6.0, cores=2) is None  # one thread does not spin-wait for another core
    assert oversubscription(2, 6.0, cores=2, wait_policy="passive") is None  # the remedy is in place


def test_a_neighbour_is_named_once_in_a_run(tmp_path, monkeypatch, caplog):
    """With the load probe saying a neighbour shares the cores, a 2-thread run says so in one warning, although it
    re-plans many times while the neighbour stays; on an idle machine it says nothing."""
    import logging
    from vitkit.train import loop
    caplog.set_level(logging.INFO, logger="vitkit")
    monkeypatch.setitem(SIM_RECIPE["train"], "threads", 2)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    clock = SimClock()
    monkeypatch.setattr(loop, "load_average", lambda: 4.5 if 80 <= clock.now < 160 else 1.5)  # while it stays
    simulated_run(tmp_path, monkeypatch, neighbour(0.2, 10.0, 80.0, 160.0), clock)
    warned = [m for m in caplog.messages if m.startswith("oversubscribed CPU")]
    assert len(warned) == 1 and "load average 4.5 on" in warned[0], warned
    caplog.clear()
    monkeypatch.setattr(loop, "load_average", lambda: 1.5)
    simulated_run(tmp_path / "idle", monkeypatch, neighbour(0.2, 10.0, 80.0, 160.0))
    assert not [m for m in caplog.messages if m.startswith("oversubscribed CPU")]
