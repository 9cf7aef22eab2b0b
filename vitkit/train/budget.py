"""Laying a wall-clock budget out over training steps and evaluations (``train.time_budget_minutes``).

A budgeted run ends when its clock says so, whatever the machine: a fast one trains more steps, a slow one fewer. What
it has to fit, from measured costs (``Costs``): the steps, the validations every ``eval_every`` steps (with the test
split when ``log.test_curve`` is on), the periodic checkpoints, and the end of the run (the last validation, the
test pass of the selected weights, two checkpoints, plots). ``plan`` solves for the number of steps that ends the run
at ``target`` seconds; the trainer plans after a few timed steps, then plans again as measurements improve (after
the first real evaluation, and as step times drift on a shared machine), and stops at a step boundary if the end
comes anyway.

Re-planning on a shared machine (a neighbour made steps 9-47x slower for 8 minutes; the plan fell
from ~38,000 steps to 5,609 and grew back to 21,000, restarting the cosine): the speed is ``StepSpeed``, a median
over the last ``SPEED_WINDOW_SHARE`` of the budget that believes a speed-up at once and a slowdown only once it
lasts; ``next_total`` keeps the length while it moves less than ``REPLAN_TOLERANCE``, lengthens at once, and
shortens by at most ``SHRINK_LIMIT`` per re-plan; the schedule lays out only its remaining decay again
(``WarmupSchedule.replanned``), so the learning rate never rises after the warm-up.

Evaluation is part of the plan, so it cannot eat the budget: when the test-curve passes would take more than
``EVAL_SHARE`` of what remains, the curve is dropped (it is for plots only); when the test pass alone would, the final
test is run on the first images of the test split that fit (``data.test_limit`` chooses the number explicitly).
Both are said in a warning.
"""
from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass

__all__ = ["Costs", "Plan", "plan", "run_s", "warmup_for", "StepSpeed", "next_total", "MARGIN", "EVAL_SHARE",
           "SPEED_WINDOW_SHARE", "REPLAN_TOLERANCE", "SHRINK_LIMIT"]

MARGIN = 0.02  # plan to end this fraction before the budget: interpreter start-up and measurement error
EVAL_SHARE = 0.5  # at most this fraction of the remaining time goes to evaluation
SPEED_WINDOW_SHARE = 0.02  # the step time is the median over this fraction of the budget (36 s of 30 min) ...
MIN_WINDOW_S = 5.0  # ... or at least this many seconds
REPLAN_TOLERANCE = 0.05  # the length changes only when the steps left would change by more than this fraction
SHRINK_LIMIT = 0.5  # one re-plan keeps at least this fraction of the steps left (lengthening is not limited)


@dataclass(frozen=True)
class Costs:
    """Measured (or, before the first measurement, estimated) seconds."""

    step_s: float  # one optimiser step
    image_s: float  # one evaluation image (forward pass + loading)
    n_val: int  # validation images
    n_test: int  # test images (after data.test_limit)
    checkpoint_s: float  # one checkpoints/last save
    end_s: float  # fixed cost of the end of a run: reports, plots


@dataclass(frozen=True)
class Plan:
    total_steps: int
    test_curve: bool  # evaluate the test split at each validation
    test_images: int  # images of the final test pass (<= Costs.n_test)
    end_s: float  # predicted seconds from the last step to the end of the run
    eval_s: float  # predicted seconds of evaluation still to come (validations and the final test)

    def notes(self, costs: Costs, curve_requested: bool) -> list[str]:
        """What the plan gave up to hold the budget, as warning lines."""
        out = []
        if curve_requested and not self.test_curve:  # (warning texts start with a stable key: see Trainer._warn)
            out.append(f"log.test_curve: off for this run: a test pass ({costs.n_test} images) takes ~"
                       f"{costs.n_test * costs.image_s:.0f} s, more than the budget leaves for evaluation; set "
                       f"data.test_limit to keep the curve")
        if self.test_images < costs.n_test:
            out.append(f"the final test pass runs on the first {self.test_images} of {costs.n_test} test images "
                       f"(~{costs.n_test * costs.image_s:.0f} s for all of them does not fit the budget); set "
                       f"data.test_limit to choose")
        return out


def _end_s(c: Costs, curve: bool, test_images: int) -> float:
    """The last validation (with the curve's test pass), the final test, two checkpoints, reports."""
    return c.image_s * (c.n_val + (c.n_test if curve else 0) + test_images) + 2 * c.checkpoint_s + c.end_s


def _multiples(every: int, after: int, upto: int) -> int:
    """How many multiples of ``every`` lie in (after, upto]."""
    return upto // every - after // every if every > 0 and upto > after else 0


def run_s(c: Costs, step: int, total: int, eval_every: int, checkpoint_every: int, curve: bool,
          test_images: int) -> float:
    """Seconds from ``step`` to the end of a run of ``total`` steps: the steps, the validations that fall due before
    the last step (each with its checkpoint), the periodic checkpoints between them, and the end of the run."""
    per_eval = c.image_s * (c.n_val + (c.n_test if curve else 0)) + c.checkpoint_s
    evals = _multiples(eval_every, step, total - 1)
    checkpoints = 0
    if checkpoint_every:
        both = eval_every * checkpoint_every // math.gcd(eval_every, checkpoint_every)
        checkpoints = _multiples(checkpoint_every, step, total - 1) - _multiples(both, step, total - 1)
    return ((total - step) * c.step_s + evals * per_eval + checkpoints * c.checkpoint_s
            + _end_s(c, curve, test_images))


def plan(target_s: float, elapsed_s: float, step: int, max_steps: int, costs: Costs, eval_every: int,
         checkpoint_every: int, test_curve: bool, test_images: int | None = None) -> Plan:
    """The number of steps (at least one more than ``step``, at most ``max_steps``) that ends the run at
    ``target_s``, and which evaluations fit (see the module docstring). A plan made again later passes the earlier
    decisions (``test_curve`` false once dropped, ``test_images`` once limited): they are not revisited, so what a
    run evaluates does not shrink as its remaining time does."""
    remaining = max(0.0, target_s - elapsed_s)
    c, eval_every = costs, max(1, eval_every)
    if test_curve:  # the curve's passes over the whole run, counted at the steps the run would have without them
        passes = remaining / max(c.step_s, 1e-9) / eval_every + 1
        test_curve = (passes + 1) * c.image_s * c.n_test <= EVAL_SHARE * remaining
    if test_images is None:
        fixed, test_images = _end_s(c, test_curve, 0), c.n_test
        if c.n_test and fixed + c.image_s * c.n_test > EVAL_SHARE * remaining:
            test_images = max(1, min(c.n_test, int((EVAL_SHARE * remaining - fixed) / max(c.image_s, 1e-9))))

    def cost(total: int) -> float:
        return run_s(c, step, total, eval_every, checkpoint_every, test_curve, test_images)
    per_step = c.step_s + (c.image_s * (c.n_val + (c.n_test if test_curve else 0)) + c.checkpoint_s) / eval_every
    total = step + int(max(0.0, remaining - _end_s(c, test_curve, test_images)) / max(per_step, 1e-9))
    total = max(step + 1, min(max_steps, total))
    while total > step + 1 and cost(total) > remaining:  # the amortised guess, made exact
        total -= 1
    while total < max_steps and cost(total + 1) <= remaining:
        total += 1
    eval_s = cost(total) - (total - step) * c.step_s - 2 * c.checkpoint_s - c.end_s
    return Plan(total, test_curve, test_images, _end_s(c, test_curve, test_images), eval_s)


def warmup_for(warmup_steps: int, total_steps: int) -> int:
    """The warm-up a schedule of ``total_steps`` can afford: the configured one when it leaves at least half of the
    run to decay, else a fifth of the run (a plan shorter than the warm-up would otherwise end at the peak learning
    rate without any decay)."""
    if warmup_steps <= total_steps // 2:
        return warmup_steps
    return max(1, total_steps // 5) if warmup_steps else 0


class StepSpeed:
    """Seconds per step for planning, quick to believe a speed-up and slow to believe a slowdown.

    The estimate is the median duration of the steps of the last ``window_s`` seconds of training (at least
    ``min_steps`` of them: a median of fewer moves by several percent on a shared machine's noise). By count, it
    believes a k-times slowdown only once the slow steps fill k/(k+1) of the window: a burst of slow steps (a
    checkpoint, a neighbour's short job) does not move it. A speed-up is believed at once: when the median of the last
    ``recent`` steps is ``SPEEDUP`` times shorter, it is the estimate. A too-short plan kept after a neighbour left
    would spend the rest of the learning-rate decay on a few fast steps; a too-long one only decays a little slower."""

    SPEEDUP = 0.8

    def __init__(self, window_s: float, min_steps: int = 50, recent: int = 9):
        self.window_s, self.min_steps, self.recent = window_s, min_steps, recent
        self._times: deque[float] = deque()
        self._span = 0.0  # seconds the kept steps took

    def add(self, seconds: float) -> None:
        self._times.append(seconds)
        self._span += seconds
        while len(self._times) > self.min_steps and self._span - self._times[0] >= self.window_s:
            self._span -= self._times.popleft()

    @property
    def step_s(self) -> float:
        window = statistics.median(self._times)
        recent = statistics.median(list(self._times)[-self.recent:])
        return recent if recent < self.SPEEDUP * window else window

    def __len__(self) -> int:
        return len(self._times)


def next_total(current: int, proposed: int, step: int, may_shrink: bool = True) -> int:
    """The run's length after a re-plan at ``step`` proposed ``proposed`` steps: unchanged while the steps left would
    move by at most ``REPLAN_TOLERANCE`` (measurement noise does not move the schedule), longer at once, shorter by
    at most ``SHRINK_LIMIT`` of the steps left and only when ``may_shrink`` (the trainer spaces shrinking re-plans)."""
    left, wanted = current - step, proposed - step
    if abs(wanted - left) <= REPLAN_TOLERANCE * left:
        return current
    if wanted > left:
        return proposed
    if not may_shrink:
        return current
    return step + max(1, wanted, math.ceil(SHRINK_LIMIT * left))
