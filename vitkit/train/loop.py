"""The one training loop: any task (classification, DeiT distillation, masked-image modelling), one process or
many (``train.strategy``: DistributedDataParallel, or FSDP2 sharding, ``vitkit.train.fsdp``), stopped and resumed at
any step boundary with bitwise-identical results on CPU in deterministic mode.

Per optimiser step ``s`` (global, 0-based): reseed torch's global RNG (dropout, drop-path) and a mixing generator from
``(seed, s, rank)``; set the learning rate ``schedule(s)``; for each accumulation micro-batch run the task under
autocast and backpropagate ``loss / accum_steps`` (DDP all-reduces, FSDP reduce-scatters, gradients on the last one
only); all-reduce the step's loss sums and stop flags; refuse a non-finite loss before touching the weights; unscale
(fp16), clip the global gradient norm, step, update the EMA. Because every random stream and the data order are
functions of the step counter, resuming needs only the step, the weights and the optimizer/EMA/scaler state; the RNG
states (rank 0's) are saved too, for code that draws from them outside the loop.

Validation, test and every file in the run folder are rank 0's (under FSDP on an unsharded copy that every process
helps to fill; each process writes its own shards of the train state); the other processes wait at a barrier. A
wall-clock budget (``train.time_budget_minutes``) times ``budget_calibration_steps`` steps and one evaluation batch,
lays the schedule out over the steps that fit (the plan is saved, so a resumed run keeps it) and stops at the budget
in any case; a budgeted run is reproducible only in what the plan fixed, not in when the clock ran out.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal

import numpy as np
import torch
from torch import Tensor, nn

from vitkit.evaluate.tta import with_tta
from vitkit.runs import checkpoint_dir, eval_batch_size, write_text_atomic
from vitkit.train import budget
from vitkit.train import checkpoint as ckpt
from vitkit.train.build import (build_data, build_model, build_schedule, build_splits, build_task, eval_loader,
                                peak_lr, total_steps)
from vitkit.train.config import RecipeConfig
from vitkit.train.distributed import DistInfo, all_reduce_sum, broadcast_float, stream_seed
from vitkit.train.ema import ModelEma
from vitkit.train.optim import build_optimizer, freeze_layers
from vitkit.train.run_outputs import MetricsLog, TensorBoard, environment, write_plots
from vitkit.hardware import amp_dtype, precision_line, resolve_amp
from vitkit.train.process import StopFlag, autocast, load_average, oversubscription
from vitkit.train.schedule import set_lr

if TYPE_CHECKING:  # vitkit.train.fsdp is imported when a run shards: torch.distributed.checkpoint is slow to import
    from vitkit.train.fsdp import FullCopy

__all__ = ["Trainer", "RunState", "RunResult", "NonFiniteLossError"]

log = logging.getLogger(__name__)

_WARMUP_STEPS = 3  # steps excluded from time-budget calibration (allocator and kernel warm-up) ...
_CALIBRATION_SHARE = 0.05  # ... unless they take this much of the budget; planning waits at most twice as long
_UNPLANNED = 10**9  # schedule length while a time-budgeted run is still calibrating (cosine factor ~1)


class _Stopped(Exception):
    """A SIGINT/SIGTERM arrived during an evaluation: it is abandoned and the run stops at once."""


class NonFiniteLossError(RuntimeError):
    """The loss (or gradient norm) became NaN/inf; the run stopped before the weights were updated."""


@dataclass
class RunState:
    """Counters and bookkeeping saved in ``train_state.json``."""

    step: int = 0  # optimiser steps done
    epoch: int = 0
    step_in_epoch: int = 0  # data position: next step of ``epoch``
    total_steps: int = 0
    planned: bool = False  # total_steps was fixed from the time budget
    best_metric: float | None = None
    best_step: int | None = None
    elapsed_s: float = 0.0  # wall-clock seconds of earlier sessions
    train_s: float = 0.0  # seconds inside training steps (images/s excludes evaluation)
    images: int = 0
    last_eval: dict[str, Any] = field(default_factory=dict)
    window: dict[str, float] = field(default_factory=dict)  # training sums since the last metrics row
    eval_pending: bool = False  # a signal stopped the validation of ``step``: it runs first when resumed
    test_curve: bool = True  # false once a time budget dropped log.test_curve (budget.plan)
    test_images: int | None = None  # final test images when a time budget limited them
    warmup_steps: int | None = None  # the warm-up a time-budget plan kept, once it is over
    lr_segments: list[list[float]] = field(default_factory=list)  # WarmupSchedule.segments of re-planned decays


@dataclass
class RunResult:
    run_dir: Path
    status: str  # completed | interrupted
    step: int
    total_steps: int | None  # None: a time-budgeted run stopped before its plan was made
    summary: dict[str, Any] | None = None
    signal: str | None = None
    message: str | None = None  # interrupted (rank 0): what was saved and how to continue, in one line


@dataclass
class _Window:
    """Training sums since the last log line / metrics row."""

    loss: float = 0.0
    correct: float = 0.0
    count: float = 0.0
    seconds: float = 0.0
    images: int = 0

    def add(self, m: dict[str, float], seconds: float, images: int) -> None:
        self.loss += m["loss_sum"]
        self.correct += m["correct"]
        self.count += m["count"]
        self.seconds += seconds
        self.images += images

    def means(self) -> dict[str, float | None]:
        n = max(self.count, 1.0)
        return {"train_loss": self.loss / n if self.count else None,
                "train_acc": self.correct / n if self.count else None,
                "images_per_s": self.images / self.seconds if self.seconds else None}


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(b, device) for b in batch)
    return batch


class Trainer:
    def __init__(self, cfg: RecipeConfig, run_dir: str | os.PathLike, info: DistInfo, device: torch.device,
                 threads: int, resume_from: Path | None = None, clock_start: float | None = None,
                 clock: Callable[[], float] = time.perf_counter):
        # the budget's clock: ``clock`` (seconds; a simulated one in tests) from ``clock_start`` (the CLI passes its
        # process start), else from now, so it includes building the data and the model
        self.clock = clock
        self._session_start = clock() if clock_start is None else clock_start
        self._step_times: list[float] = []  # budgeted runs: the step durations timed to plan
        self._speed: budget.StepSpeed | None = None  # budgeted runs: the step time once planned
        self._shrunk_at = -math.inf  # training seconds (state.train_s) of the last re-plan that shortened the run
        self._image_s: float | None = None  # budgeted runs: measured seconds per evaluation image
        self._checkpoint_s: float | None = None  # measured seconds of one checkpoints/last save
        self._warned: set[str] = set()
        self.cfg, self.run_dir, self.info, self.device, self.threads = cfg, Path(run_dir), info, device, threads
        self.precision = resolve_amp(cfg.train.amp, device)  # auto: by the hardware probe (logged by fit)
        self.amp = amp_dtype(self.precision)
        splits = build_splits(cfg.data)
        self.model = self._build_model(len(splits.classes), resume_from).to(device)
        self.model.class_names = list(splits.classes) if self.model.num_classes else None
        if cfg.train.channels_last:  # before the EMA copy, the optimizer and DDP take the parameters
            self._channels_last()
        self.data = build_data(cfg, splits, self.model, info, pin_memory=device.type == "cuda")
        self.task = build_task(cfg, self.model, device)
        self.task.prepare(self.model)
        self._freeze(cfg.optim.freeze_layers)
        if cfg.train.grad_checkpointing:
            self._checkpoint_blocks()
        self.lr = peak_lr(cfg.optim, cfg.train.batch_size)
        self.scaler = torch.amp.GradScaler(device.type) if self.precision == "fp16" else None
        self.ema = ModelEma(self.model, cfg.train.ema_decay, cfg.train.ema_warmup) if cfg.train.ema else None
        self.dcp = cfg.train.strategy == "fsdp"  # the train state is saved sharded (DCP), with any number of processes
        self.full_copy = self._shard()
        self.optimizer = build_optimizer(self.model, cfg.optim, self.lr)  # on the sharded parameters under FSDP
        configured = total_steps(cfg.train, self.data.sampler.steps_per_epoch)
        self.state = RunState(total_steps=configured or _UNPLANNED)
        self.window, self.log_window = _Window(), _Window()
        self.max_steps = configured or _UNPLANNED
        if resume_from is not None:
            self._restore(resume_from)
        self._saved_step: int | None = self.state.step if resume_from is not None else None
        self.schedule = self._schedule()
        self.net = self._wrap(self.model)
        self.reporting = info.is_main
        self._resumed_step = self.state.step if resume_from is not None else None

    # ------------------------------------------------------------------------------------------------ building
    def _build_model(self, num_classes: int, resume_from: Path | None) -> nn.Module:
        seed = self.cfg.train.seed
        torch.manual_seed(stream_seed(seed, "init"))  # initial weights depend on the seed only, on every rank
        random.seed(stream_seed(seed, "python", self.info.rank))  # for user code: the loop draws from neither
        np.random.seed(stream_seed(seed, "numpy", self.info.rank) % 2**32)
        if resume_from is None:
            return build_model(self.cfg, num_classes)
        from vitkit.registry import load_model
        return load_model(resume_from)

    def _channels_last(self) -> None:
        """``train.channels_last``: the model's 4-d weights in NHWC order, as the batches will be (PyTorch's "Channels
        Last Memory Format" tutorial converts both). A family without overlapping convolutions
        (``FamilyModel.convolutional``) gains little from it: warned, and converted all the same."""
        if not self.model.convolutional:
            self._warn(f"train.channels_last: {self.model.variant_name} has no convolution beyond a patchify stem "
                       f"(FamilyModel.convolutional), so the NHWC memory order gains it little")
        self.model.to(memory_format=torch.channels_last)

    def _freeze(self, n: int) -> None:
        frozen = freeze_layers(self.model, n)
        if frozen and self.info.is_main:
            kept = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
            print(f"frozen: {len(frozen)} tensors of the first {n} layer ids; {kept:,} parameters train")

    def _checkpoint_blocks(self) -> None:
        """Activation checkpointing per block of the family contract; a BatchNorm's running statistics move once
        per forward, not again when the block is recomputed (``vitkit.families.backbone.set_grad_checkpointing``)."""
        self.model.set_grad_checkpointing(True)

    def _shard(self) -> FullCopy | None:
        """``train.strategy: fsdp`` with several processes: shard the model and the EMA by the same units (each
        block, then the root; ``vitkit.train.fsdp``) and return rank 0's unsharded copy (``FullCopy``) for
        evaluation and saving; None otherwise (the model stays whole)."""
        if not (self.dcp and self.info.enabled):
            return None
        from vitkit.train import fsdp
        full = fsdp.FullCopy(self.model, self.info.is_main)
        policy = fsdp.mixed_precision(self.amp)
        if self.cfg.train.compile:
            fsdp.compile_blocks(self.model)
        blocks = fsdp.shard(self.model, policy)
        if self.ema is not None:
            fsdp.shard(self.ema.module, policy)
        low = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(policy.param_dtype)
        computed = (f"{low} parameters in compute, gradients reduced in fp32" if low
                    else "fp32 parameters and gradient reduction")
        self._sharding_line = (f"fsdp: {blocks} blocks and the root sharded over {self.info.world_size} processes; "
                               f"{computed}")
        return full

    def _wrap(self, model: nn.Module) -> nn.Module:
        net = model
        if self.info.enabled and self.full_copy is None:
            ids = [self.device.index] if self.device.type == "cuda" else None
            net = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        self.ddp = net if net is not model else None
        if self.cfg.train.compile and self.full_copy is None:  # sharded: each block was compiled (_shard)
            net = torch.compile(net)
        return net

    def eval_model(self) -> nn.Module:
        """The weights that are validated, tested and saved as best/: the EMA when enabled. Under FSDP, rank 0's
        unsharded copy, holding what ``_whole`` last gathered."""
        if self.full_copy is not None:
            return self.full_copy.module
        return self.ema.module if self.ema is not None else self.model

    def _whole(self, which: Literal["model", "eval"]) -> nn.Module | None:
        """The unsharded training weights (``model``) or evaluated ones (``eval``: the EMA when enabled) of this
        step. Under FSDP, rank 0's copy (None on the others), gathered by every process: all call it at the same
        point."""
        source = self.ema.module if which == "eval" and self.ema is not None else self.model
        if self.full_copy is None:
            return source
        return self.full_copy.fill(source, (source is self.model, self.state.step))

    # ------------------------------------------------------------------------------------------- one step
    def _forward_backward(self, batch: Any, g: torch.Generator) -> dict[str, float]:
        images, labels = _to_device(batch, self.device)
        if self.cfg.train.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)  # (B, C, H, W), NHWC strides
        if labels.numel() == 0:  # every item of this micro-batch was unreadable: a zero loss keeps DDP/FSDP in step
            out = {"loss": self._zero_loss(), "correct": 0, "count": 0}
        else:
            with autocast(self.device, self.amp):
                out = self.task(self.net, (images, labels), g)
        loss = out["loss"] / self.cfg.train.accum_steps
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        value = float(out["loss"].detach())
        return {"loss_sum": value * int(out["count"]), "correct": float(out["correct"]),
                "count": float(out["count"]), "nonfinite": float(not math.isfinite(value))}

    def _zero_loss(self) -> Tensor:
        """A zero loss whose backward joins every gradient collective the other processes run: over all parameters
        (DDP's hooks fire per parameter), or, when sharded, through a forward of one blank image in eval mode (FSDP
        gathers and reduce-scatters per unit, around forwards)."""
        if self.full_copy is None:
            return sum(p.sum() for p in self.net.parameters()) * 0.0
        size, chans = self.cfg.data.img_size, self.model.cfg.in_chans
        self.net.eval()
        try:
            return self.net(torch.zeros(1, chans, size, size, device=self.device)).float().sum() * 0.0
        finally:
            self.net.train()

    def _micro_context(self, last: bool):
        """DDP all-reduces (FSDP reduce-scatters) gradients on the last micro-batch of a step only."""
        if self.full_copy is not None:
            self.model.set_requires_gradient_sync(last)  # FSDP2's no_sync
        return self.ddp.no_sync() if self.ddp is not None and not last else contextlib.nullcontext()

    def _train_step(self, micro_batches: list, stop_requested: bool, over_budget: bool) -> dict[str, float]:
        t, step = self.cfg.train, self.state.step
        torch.manual_seed(stream_seed(t.seed, "step", step, self.info.rank))  # dropout / drop-path
        g = torch.Generator().manual_seed(stream_seed(t.seed, "mix", step, self.info.rank))  # mixup / cutmix
        lr = self.schedule(step)
        set_lr(self.optimizer, lr)
        sums = torch.zeros(6, dtype=torch.float64)  # loss_sum, correct, count, nonfinite, stop, budget
        for j, batch in enumerate(micro_batches):
            with self._micro_context(j == len(micro_batches) - 1):
                m = self._forward_backward(batch, g)
            sums[:4] += torch.tensor([m["loss_sum"], m["correct"], m["count"], m["nonfinite"]], dtype=torch.float64)
        sums[4], sums[5] = float(stop_requested), float(over_budget and self.info.is_main)
        sums = all_reduce_sum(sums.to(self.device), self.info).cpu()
        if sums[3] > 0:
            self._fail(f"the loss is not finite at step {step + 1} (epoch {self.state.epoch})")
        self._optimizer_step(step)
        keys = ("loss_sum", "correct", "count", "nonfinite", "stop", "budget")
        return {**dict(zip(keys, sums.tolist())), "lr": lr}

    def _optimizer_step(self, step: int) -> None:
        clip = self.cfg.optim.clip_grad
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if clip is not None:  # sharded DTensor gradients: the norm is the global one (a replicated DTensor)
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip, foreach=True)
            if self.scaler is None and not torch.isfinite(norm):
                self._fail(f"the gradient norm is not finite at step {step + 1} (epoch {self.state.epoch})")
        if self.scaler is not None:
            # skips the update when fp16 gradients overflowed, on every process alike: DDP's gradients are all-reduced
            # already, and FSDP's DTensor gradients max-reduce the overflow flag over the mesh as they are unscaled
            # (torch/distributed/tensor/_dispatch.py ``found_inf_reduce_handler``)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.full_copy is not None:
            from vitkit.train.fsdp import sync_buffers
            sync_buffers(self.model)
        if self.ema is not None:
            self.ema.update(self.model)

    def _fail(self, what: str) -> None:
        last = ckpt.find_checkpoint(self.run_dir)
        kept = f"the last good checkpoint {last} was left untouched" if last else "no checkpoint had been written"
        raise NonFiniteLossError(f"{what}: stopping the run before updating the weights; {kept}. Lower optim.lr, "
                                 f"set optim.clip_grad, or use train.amp: bf16 instead of fp16.")

    # ----------------------------------------------------------------------------------------------- the loop
    def elapsed(self) -> float:
        return self.state.elapsed_s + (self.clock() - self._session_start)

    def _open_reports(self) -> None:
        """metrics.csv and TensorBoard events: opened when training starts, so building a Trainer (data, model) writes
        nothing and a failure there leaves no trace in the run folder."""
        if not self.reporting:
            return
        resumed = self._resumed_step
        summary = self.run_dir / "summary.json"
        if resumed is not None and summary.is_file():  # it described an end this run is going past or redoing
            log.info("%s is removed until the resumed run ends (it would contradict metrics.csv)", summary)
            summary.unlink()
        self.metrics = MetricsLog(self.run_dir / "metrics.csv", resumed)
        self.tb = TensorBoard(self.run_dir / "tensorboard", self.cfg.log.tensorboard,
                              purge_step=resumed + 1 if resumed is not None else None)

    def fit(self) -> RunResult:
        """Train to the end (or the budget), validate, test and report; a SIGINT/SIGTERM at any point (a step, an
        evaluation, a checkpoint, the final report) stops it within a step or an evaluation batch, with
        ``checkpoints/last`` saved."""
        self._open_reports()
        if self.reporting:
            log.info("%s", precision_line(self.cfg.train.amp, self.precision, self.device))
            if self.full_copy is not None:
                log.info("%s", self._sharding_line)
            if self.cfg.train.grad_checkpointing:
                log.info("activation checkpointing in %d blocks", len(self.model.named_blocks()))
        self._check_cpu()
        self._tick = self.clock()
        self.model.train()
        self._signalled = False
        with StopFlag(self._saved_description) as self.stop, self._progress() as self.bar:
            if self.state.eval_pending:  # the validation a signal interrupted, before anything else
                self._signalled = self._validate(self.schedule(max(0, self.state.step - 1))) | self._save_last()
            stopped = self._signalled
            while self.state.step < self.state.total_steps and not stopped:
                stopped = self._run_epoch()
            if not self._signalled:
                try:
                    return self._finish()
                except _Stopped:
                    self._signalled = True
        return self._interrupted()

    def _saved_description(self) -> str:
        """For a second Ctrl-C: what is on disk and what is not."""
        last = checkpoint_dir(self.run_dir, "last")
        if self._saved_step is None:
            return f"no checkpoint had been saved; {self.state.step} step(s) were lost"
        lost = self.state.step - self._saved_step
        return (f"{last} holds step {self._saved_step} (continue with: vitkit train --resume {self.run_dir}); "
                + (f"the {lost} step(s) after it were not saved" if lost else "nothing after it was lost"))

    def _run_epoch(self) -> bool:
        """Train from the saved data position to the end of the epoch; True when the run must stop early."""
        s, accum = self.state, self.cfg.train.accum_steps
        self.data.sampler.set_position(s.epoch, s.step_in_epoch)
        micro: list = []
        for batch in self.data.loader:
            micro.append(batch)
            if len(micro) < accum:
                continue
            m = self._train_step(micro, self.stop.signum is not None, self._over_budget())
            micro = []
            self._signalled = self._signalled or bool(m["stop"])  # on any process: all stop at this step
            if self._after_step(m) or s.step >= s.total_steps:
                return bool(m["stop"] or m["budget"] or self._signalled)
        return False

    def _advance(self, m: dict[str, float], seconds: float) -> bool:
        """Count the finished step and move the data position; True when it ended an epoch."""
        s = self.state
        s.step, s.step_in_epoch = s.step + 1, s.step_in_epoch + 1
        s.train_s, s.images = s.train_s + seconds, s.images + self.cfg.train.batch_size
        self.window.add(m, seconds, self.cfg.train.batch_size)
        self.log_window.add(m, seconds, self.cfg.train.batch_size)
        if s.step_in_epoch < self.data.sampler.steps_per_epoch:
            return False
        s.epoch, s.step_in_epoch = s.epoch + 1, 0
        return True

    def _eval_due(self, epoch_end: bool, final: bool) -> bool:
        every = self.cfg.train.eval_every
        return final or (every > 0 and self.state.step % every == 0) or (every == 0 and epoch_end)

    def _after_step(self, m: dict[str, float]) -> bool:
        """Bookkeeping, validation and checkpoints after a step; True when the run must stop here."""
        every = self.cfg.train.checkpoint_every_steps
        seconds = self.clock() - self._tick
        epoch_end = self._advance(m, seconds)
        self._budget_step(seconds, stopping=bool(m["budget"]))
        stop = bool(m["stop"] or m["budget"])
        final = stop or self.state.step >= self.state.total_steps
        eval_due = not m["stop"] and self._eval_due(epoch_end, final)  # a signal: checkpoint now, validate later
        pending = bool(m["stop"]) and self._eval_due(epoch_end, self.state.step >= self.state.total_steps)
        if pending:  # this step's validation was due: the resumed run runs it first, and writes the step's row
            self.state.eval_pending = True
        self._log_step(m, row=not (eval_due or pending))
        signalled = False
        if eval_due:
            signalled = self._validate(m["lr"])
            signalled = self._save_last() or signalled
        elif final or (every > 0 and self.state.step % every == 0):
            signalled = self._save_last()
        self._signalled = self._signalled or signalled
        self._tick = self.clock()  # evaluation and checkpoint time is not step time
        return stop or signalled

    def _stop_agreed(self, local: bool) -> bool:
        """Whether any process was signalled (or ``local`` on this one); every process calls it at the same point,
        so all of them stop at the same step."""
        flag = torch.tensor([float(local or self.stop.signum is not None)], device=self.device)
        return bool(all_reduce_sum(flag, self.info).item() > 0)

    # ----------------------------------------------------------------------------------- logging, progress
    @contextlib.contextmanager
    def _progress(self):
        from tqdm.auto import tqdm
        self.show_bar = self.cfg.log.progress and self.reporting and sys.stderr.isatty()  # log lines otherwise
        total = None if self.state.total_steps == _UNPLANNED else self.state.total_steps
        bar = tqdm(total=total, initial=self.state.step, unit="step", desc="train", disable=not self.show_bar,
                   dynamic_ncols=True)
        try:
            yield bar
        finally:
            bar.close()

    def _total_text(self) -> str:
        return "?" if self.state.total_steps == _UNPLANNED else str(self.state.total_steps)

    def _log_step(self, m: dict[str, float], row: bool) -> None:
        """A step line (and, when ``row``, a training row of metrics.csv) every ``log.every_steps`` steps; the
        first step gets a line too, so a run shows life at once."""
        self.bar.update(1)
        step, every = self.state.step, self.cfg.log.every_steps
        if not self.reporting or (step % every and step != 1):
            return
        self._check_cpu()  # a neighbour may come at any time
        w = self.log_window.means()
        self.log_window = _Window()
        if step % every == 0:
            self.tb.scalars({"train/loss": w["train_loss"], "train/acc": w["train_acc"], "train/lr": m["lr"],
                             "train/images_per_s": w["images_per_s"]}, step)
            if row:
                self._append_row({"epoch": self.state.epoch, "step": step, "lr": m["lr"], **self.window.means()})
                self.window = _Window()
        fmt = {k: v for k, v in w.items() if v is not None}
        self.bar.set_postfix(loss=f"{fmt.get('train_loss', 0):.4f}", acc=f"{fmt.get('train_acc', 0):.3f}",
                             img_s=f"{fmt.get('images_per_s', 0):.0f}", lr=f"{m['lr']:.2e}", refresh=False)
        if not self.show_bar:
            log.info("step %d/%s  loss %.4f  acc %.3f  %.0f img/s  lr %.3g  (%s elapsed)", step, self._total_text(),
                     fmt.get("train_loss", math.nan), fmt.get("train_acc", math.nan), fmt.get("images_per_s", 0.0),
                     m["lr"], _clock(self.elapsed()))

    def _append_row(self, row: dict[str, Any]) -> None:
        row["elapsed_s"] = self.elapsed()
        self.metrics.append(row)

    # --------------------------------------------------------------------------------------- evaluation
    def _eval_batch_size(self) -> int:
        return eval_batch_size(self.cfg.train.batch_size, self.cfg.train.accum_steps)

    def _interruptible(self, loader):
        """The loader's batches until a SIGINT/SIGTERM arrives (then ``_Stopped``)."""
        for batch in loader:
            if self.stop.signum is not None:
                raise _Stopped
            yield batch

    def _evaluate(self, dataset, model: nn.Module | None = None):
        """Evaluate ``dataset``; its cost per image feeds the time-budget plan."""
        start = self.clock()
        loader = eval_loader(dataset, self._eval_batch_size(), self.cfg.data.num_workers)
        model = with_tta(model or self.eval_model(), self.cfg.train.eval_tta)
        result = self.task.evaluate(model, self._interruptible(loader), self.device, self.amp, self.data.classes)
        if len(dataset):
            self._image_s = (self.clock() - start) / len(dataset)
        return result

    def _validate(self, lr: float) -> bool:
        """Validate (rank 0) and tell every process whether a signal stopped it (True: stop the run now)."""
        self.state.eval_pending = True
        stopped = False
        self._whole("eval")
        if self.reporting:
            try:
                self._validate_main(lr)
            except _Stopped:
                stopped = True
        if not stopped:
            self.state.eval_pending = False
        return self._stop_agreed(stopped)

    def _test_curve_on(self) -> bool:
        return self.cfg.log.test_curve and self.state.test_curve and self.data.test is not None

    def _validate_main(self, lr: float) -> None:
        s = self.state
        row: dict[str, Any] = {"epoch": s.epoch, "step": s.step, "lr": lr}
        if self.data.val is not None:
            val = self._evaluate(self.data.val)
            row.update({f"val_{k}": v for k, v in val.metrics.items() if f"val_{k}" in _ROW_KEYS})
        if self._test_curve_on():
            test = self._evaluate(self.data.test)  # for accuracy-vs-time plots only: never used for any decision
            row.update({f"test_{k}": v for k, v in test.metrics.items() if f"test_{k}" in _ROW_KEYS})
        if self.data.val is not None:  # only now that nothing can interrupt the validation any more
            s.last_eval = dict(val.metrics)
            self._update_best(val.metrics[self.task.metric])
        row.update(self.window.means())
        self.window = _Window()
        self._append_row(row)
        self.tb.scalars({f"eval/{k}": v for k, v in row.items() if k.startswith(("val_", "test_"))}, s.step)
        self._log_eval(row)

    def _log_eval(self, row: dict[str, Any]) -> None:
        parts = [f"{k} {row[k]:.4f}" for k in ("train_loss", "val_loss", "val_top1", "val_mim_top1", "test_top1")
                 if row.get(k) is not None]
        msg = f"step {row['step']} (epoch {row['epoch']}): " + "  ".join(parts)
        self.bar.write(msg) if self.show_bar else log.info("%s", msg)

    def _update_best(self, value: float) -> None:
        s = self.state
        better = s.best_metric is None or (value > s.best_metric if self.task.higher_is_better
                                           else value < s.best_metric)
        if better:
            s.best_metric, s.best_step = float(value), s.step
            ckpt.save_checkpoint(checkpoint_dir(self.run_dir, "best"), self.eval_model(), self.data.classes)

    # ------------------------------------------------------------------------------------------ time budget
    def _schedule(self):
        """The LR schedule over the current length, with the decays re-planned so far; a warm-up longer than half a
        time-budget plan is shortened (warned once) until it is over."""
        o, s = self.cfg.optim, self.state
        configured = o.warmup_steps or round(o.warmup_epochs * self.data.sampler.steps_per_epoch)
        if not s.planned:  # a length the recipe gave explicitly (or no plan yet) keeps its warm-up
            return build_schedule(o, self.lr, s.total_steps, self.data.sampler.steps_per_epoch)
        warmup = s.warmup_steps if s.warmup_steps is not None else budget.warmup_for(configured, s.total_steps)
        if warmup != configured and s.warmup_steps is None:
            self._warn(f"optim.warmup: {configured} warm-up steps do not fit a run of {s.total_steps} steps; warming "
                       f"up over {warmup} steps so the learning rate still decays")
        schedule = build_schedule(o, self.lr, s.total_steps, self.data.sampler.steps_per_epoch, warmup)
        return dataclasses.replace(schedule, segments=tuple((int(a), float(p), int(b)) for a, p, b in s.lr_segments))

    def _set_length(self, total: int, first: bool) -> None:
        """Give the run ``total`` steps. The first plan, and any during the warm-up, lays the schedule out anew; after
        the warm-up only the rest of the decay is, from the progress it has reached (``WarmupSchedule.replanned``):
        the rate never rises."""
        s = self.state
        if first or (s.warmup_steps is None and s.step < self.schedule.warmup_steps):
            s.total_steps = total
            self.schedule = self._schedule()
        else:
            self.schedule = self.schedule.replanned(s.step, total)
            s.total_steps, s.warmup_steps = total, self.schedule.warmup_steps
            s.lr_segments = [list(segment) for segment in self.schedule.segments]
        self.bar.total = total
        self.bar.refresh()

    def _check_cpu(self) -> None:
        """Warn (once) when other processes compete for this run's CPU cores (``vitkit.train.process.oversubscription``)."""
        if self.device.type == "cpu" and self.reporting:
            note = oversubscription(self.threads, load_average(), wait_policy=os.environ.get("OMP_WAIT_POLICY"))
            if note:
                self._warn(note)

    def _warn(self, message: str) -> None:
        """Log a warning once per kind (its first two words): a re-plan does not repeat it with new numbers."""
        key = " ".join(message.split()[:2])
        if key not in self._warned and self.info.is_main:
            self._warned.add(key)
            self.bar.write(f"warning: {message}") if getattr(self, "show_bar", False) else log.warning("%s", message)

    def _calibrated(self) -> bool:
        """Enough steps timed to plan: ``budget_calibration_steps`` after the warm-up ones, or fewer (at least two)
        when steps are so slow that waiting would spend a noticeable part of the budget."""
        t, n = self.cfg.train, len(self._step_times)
        share = self.elapsed() / (t.time_budget_minutes * 60.0)
        warm = min(_WARMUP_STEPS, n - 2) if share > _CALIBRATION_SHARE else _WARMUP_STEPS
        return n - warm >= t.budget_calibration_steps or (share > 2 * _CALIBRATION_SHARE and n >= 2)

    def _budget_step(self, seconds: float, stopping: bool = False) -> None:
        """Time-budgeted runs: plan once enough steps are timed, then re-plan after every step as the measured speed
        changes (``budget.StepSpeed``, ``budget.next_total``), all processes at the same step with rank 0's numbers.
        A run the budget stops before it was planned (``stopping``) is planned now, so its end (what the final test
        may take) still fits; its length is then the steps it made."""
        t, s = self.cfg.train, self.state
        if t.time_budget_minutes is None or not self._time_step(seconds, stopping):
            return
        step_s = self._speed.step_s
        p, costs = self._plan(step_s)
        first = not s.planned
        total = p.total_steps if first else budget.next_total(
            s.total_steps, p.total_steps, s.step, s.train_s - self._shrunk_at >= self._speed.window_s / 4)
        values = [broadcast_float(v, self.info, self.device) for v in (total, p.test_curve, p.test_images)]
        total = s.step if stopping else int(values[0])
        s.planned, s.test_curve, s.test_images = True, s.test_curve and bool(values[1]), int(values[2])
        if total < s.total_steps and not first:  # slower steps: perhaps a neighbour came
            self._shrunk_at = s.train_s
            self._check_cpu()
        if total != s.total_steps:
            self._set_length(total, first)
        if stopping and first:
            log.info("time budget %s reached at step %d, before the run could be planned", _clock(
                t.time_budget_minutes * 60), s.step)
        elif first:
            log.info("time budget %s: %.2f s/step measured, %.4f s per evaluation image; the schedule is laid out over "
                     "%d steps (ending at ~%s) and follows the measured speed", _clock(t.time_budget_minutes * 60),
                     step_s, costs.image_s, total, _clock(self.elapsed() + (total - s.step) * step_s + p.end_s))
        for note in p.notes(costs, self.cfg.log.test_curve and self.data.test is not None):
            self._warn(note)

    def _time_step(self, seconds: float, stopping: bool) -> bool:
        """Record a step's duration; True once the speed is known: ``budget_calibration_steps`` timed (or fewer, see
        ``_calibrated``), or, resumed with a plan, a few steps after the warm-up ones."""
        t, s = self.cfg.train, self.state
        self._step_times = (self._step_times + [seconds])[-(_WARMUP_STEPS + t.budget_calibration_steps):]
        if self._speed is not None:
            self._speed.add(seconds)
            return True
        n = len(self._step_times)
        ready = self._calibrated() if not s.planned else n >= _WARMUP_STEPS + min(5, t.budget_calibration_steps)
        if not (ready or stopping):
            return False
        window = max(budget.MIN_WINDOW_S, budget.SPEED_WINDOW_SHARE * t.time_budget_minutes * 60.0)
        self._speed = budget.StepSpeed(window)
        for timed in self._step_times[min(_WARMUP_STEPS, n - 2):]:
            self._speed.add(timed)
        return True

    def _measure_eval_image_s(self) -> float:
        """Seconds per evaluation image, from up to 2 timed batches (after one warm-up batch) of the test or
        validation split, loading included; replaced by the real cost once a validation has run. Rank 0's alone (its
        plan is broadcast): the others return 0."""
        dataset = self.data.test or self.data.val
        if dataset is None or not self.reporting:
            return 0.0
        model = self.eval_model()
        scorer = with_tta(model, self.cfg.train.eval_tta)
        loader = eval_loader(dataset, self._eval_batch_size(), self.cfg.data.num_workers)
        was_training = model.training
        model.eval()
        images, seconds = 0, 0.0
        with torch.inference_mode(), autocast(self.device, self.amp):
            it = iter(loader)
            for i, (x, _) in enumerate(it):
                start = self.clock()
                scorer(x.to(self.device))
                if i:
                    seconds, images = seconds + self.clock() - start, images + len(x)
                if i == 2:
                    break
            if not images:  # a split of one batch: the warm-up batch is all there is
                images, seconds = len(x), self.clock() - start
        model.train(was_training)
        return seconds / images

    def _costs(self, step_s: float) -> budget.Costs:
        if self._image_s is None:
            self._image_s = self._measure_eval_image_s()
        n_val, n_test = (len(d) if d is not None else 0 for d in (self.data.val, self.data.test))
        if self._checkpoint_s is None:  # estimate before the first save: weights + optimizer state at ~200 MB/s
            nbytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
            self._checkpoint_s = 0.2 + 3 * nbytes / 200e6
        end = 1.0 + (3.0 if self.cfg.log.plots else 0.0)  # reports; plots (matplotlib) when on
        return budget.Costs(step_s, self._image_s, n_val, n_test, self._checkpoint_s, end)

    def _plan(self, step_s: float) -> tuple[budget.Plan, budget.Costs]:
        t, s = self.cfg.train, self.state
        costs = self._costs(step_s)
        target = (1.0 - budget.MARGIN) * t.time_budget_minutes * 60.0
        interval = t.eval_every or self.data.sampler.steps_per_epoch
        p = budget.plan(target, self.elapsed(), s.step, self.max_steps, costs, interval, t.checkpoint_every_steps,
                        self._test_curve_on(), s.test_images if s.planned else None)
        self._end_s = p.end_s
        return p, costs

    def _over_budget(self) -> bool:
        """True when the end of the run (last validation, final test, reports) must start now to end in time."""
        t = self.cfg.train
        if t.time_budget_minutes is None:
            return False
        end_s = getattr(self, "_end_s", 5.0)
        return self.elapsed() + end_s >= (1.0 - budget.MARGIN) * t.time_budget_minutes * 60.0

    # ------------------------------------------------------------------------------------------- checkpoints
    def _train_state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """``train_state.safetensors`` and ``.json``: RNG states and bookkeeping, and the optimizer and EMA state
        unless they are saved sharded (``dcp/``, with the model's shards)."""
        rng_tensors, rng_meta = ckpt.capture_rng()
        if self.dcp:
            tensors, opt_meta = rng_tensors, {"sharded": ckpt.SHARDED_STATE}
        else:
            tensors, opt_meta = ckpt.optimizer_state(self.optimizer)
            tensors.update(rng_tensors)
            if self.ema is not None:
                tensors.update({f"ema.{k}": v for k, v in self.ema.state_tensors().items()})
        state = dataclasses.replace(self.state, elapsed_s=self.elapsed(), window=dataclasses.asdict(self.window))
        meta = {"state": dataclasses.asdict(state), "optimizer": opt_meta, "rng": rng_meta,
                "ema_updates": self.ema.updates if self.ema is not None else None,
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "data_order": {"seed": self.cfg.train.seed, "epoch": state.epoch,
                               "step_in_epoch": state.step_in_epoch, "batch_size": self.cfg.train.batch_size,
                               "world_size": self.info.world_size},
                "schedule": dataclasses.asdict(self.schedule)}
        return tensors, meta

    def _save_last(self) -> bool:
        """Save ``checkpoints/last`` (rank 0; with FSDP every process); True when a signal arrived meanwhile on any
        process (stop now)."""
        start, folder = self.clock(), checkpoint_dir(self.run_dir, "last")
        if self.dcp:
            self._save_sharded(folder)
        elif self.reporting:
            tensors, meta = self._train_state()
            ckpt.save_checkpoint(folder, self.model, self.data.classes, tensors, meta)
        if self.reporting:
            self._checkpoint_s = self.clock() - start
        self._saved_step = self.state.step
        return self._stop_agreed(False)

    def _save_sharded(self, folder: Path) -> None:
        """Into one temporary folder: rank 0 the whole model (gathered) and the bookkeeping, every process its shards
        of model, optimizer and EMA (``dcp/``); renamed once all have written."""
        from vitkit.train import fsdp
        model = self._whole("model")
        with ckpt.shared_atomic_dir(folder, self.info) as tmp:
            if self.reporting:
                tensors, meta = self._train_state()
                ckpt.write_checkpoint(tmp, model, self.data.classes, tensors, meta)
            fsdp.save_train_state(tmp / ckpt.SHARDED_STATE, self.model, self.optimizer,
                                  self.ema.module if self.ema is not None else None)

    def _restore(self, folder: Path) -> None:
        tensors, meta = ckpt.read_train_state(folder)
        if self.dcp:  # model, optimizer and EMA, resharded to this run's processes
            from vitkit.train import fsdp
            fsdp.load_train_state(folder / ckpt.SHARDED_STATE, self.model, self.optimizer,
                                  self.ema.module if self.ema is not None else None)
            if self.ema is not None:
                self.ema.updates = meta["ema_updates"]
        else:
            ckpt.load_optimizer_state(self.optimizer, tensors, meta["optimizer"])
            if self.ema is not None:
                self.ema.load_state_tensors({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")},
                                            meta["ema_updates"])
        if self.scaler is not None and meta.get("scaler"):
            self.scaler.load_state_dict(meta["scaler"])
        ckpt.restore_rng(tensors, meta["rng"])
        self.state = RunState(**meta["state"])
        self.window = _Window(**self.state.window)
        saved_world = meta["data_order"]["world_size"]
        if saved_world != self.info.world_size:
            n = self.info.world_size
            log.warning("resuming a %d-process run with %d process%s: the data order is the same, the per-process "
                        "random streams (dropout, drop-path, mixup) differ", saved_world, n, "" if n == 1 else "es")
        log.info("resumed from %s at step %d (epoch %d, step %d of the epoch)", folder, self.state.step,
                 self.state.epoch, self.state.step_in_epoch)

    # ----------------------------------------------------------------------------------------------- endings
    def _interrupted(self) -> RunResult:
        """The run stopped at a signal with ``checkpoints/last`` saved; the result's message says so (the CLI prints
        it as its one line)."""
        s, message = self.state, None
        if self.reporting:
            self._plots()
            pending = " (its validation runs first when resumed)" if s.eval_pending else ""
            message = (f"stopped by {self.stop.name or 'a signal'} at step {s.step} of {self._total_text()}; "
                       f"checkpoint saved in {checkpoint_dir(self.run_dir, 'last')}{pending}. Continue with: "
                       f"vitkit train --resume {self.run_dir}")
        total = None if s.total_steps == _UNPLANNED else s.total_steps
        return RunResult(self.run_dir, "interrupted", s.step, total, None, self.stop.name or "SIGTERM", message)

    def _finish(self) -> RunResult:
        """The final report (rank 0); a signal during its test pass leaves the run resumable (it re-reports)."""
        summary, stopped = None, False
        self._whole("eval")
        if self.reporting:
            try:
                summary = self._final_report()
            except _Stopped:
                stopped = True
        if self._stop_agreed(stopped) and summary is None:
            raise _Stopped
        return RunResult(self.run_dir, "completed", self.state.step, self.state.total_steps, summary)

    def _test_model(self) -> tuple[nn.Module, str]:
        best = ckpt.find_checkpoint(self.run_dir, "best")
        if best is not None and self.state.best_step is not None:
            model = copy.deepcopy(self.eval_model())
            ckpt.load_model_weights(model, best)
            return model, f"best (step {self.state.best_step}, selected on val)"
        return self.eval_model(), f"final (step {self.state.step})"

    def _final_report(self) -> dict[str, Any]:
        from vitkit.evaluate import save_eval_artifacts
        test, weights = None, None
        if self.data.test is not None:
            model, weights = self._test_model()
            dataset = self.data.test
            if self.state.test_images is not None and self.state.test_images < len(dataset):
                dataset = torch.utils.data.Subset(dataset, range(self.state.test_images))  # the budget's limit
            test = self._evaluate(dataset, model)
            if test.details is not None:  # a classification's confusion matrix and per-class report
                save_eval_artifacts(test.details, self.run_dir / "eval" / "test", self.data.classes)
        summary = self._summary(test, weights)
        write_text_atomic(self.run_dir / "summary.json", json.dumps(summary, indent=1))
        self._plots()
        self.tb.close()
        return summary

    def _summary(self, test, weights: str | None) -> dict[str, Any]:
        s, t = self.state, self.cfg.train
        return {"status": "completed", "steps": s.step, "epochs": s.epoch + s.step_in_epoch /
                self.data.sampler.steps_per_epoch, "val": s.last_eval or None,
                "best": {"step": s.best_step, self.task.metric: s.best_metric} if s.best_step else None,
                "test": {**test.metrics, "num_samples": test.num_samples, "weights": weights,
                         "tta": t.eval_tta} if test else None,
                "wall_time_s": self.elapsed(), "train_time_s": s.train_s,
                "images_per_s": s.images / s.train_s if s.train_s else None,
                "time_budget_minutes": t.time_budget_minutes, "planned_steps": s.total_steps if s.planned else None,
                "data": {"train": len(self.data.train), "val": len(self.data.val) if self.data.val else 0,
                         "test": len(self.data.test) if self.data.test else 0, "classes": len(self.data.classes)},
                "environment": {**environment(self.device, self.threads, self.info.world_size),
                                "precision": "fp32" if self.precision == "none" else self.precision}}

    def _plots(self) -> None:
        if self.cfg.log.plots:
            write_plots(self.run_dir / "metrics.csv", self.run_dir / "plots", self.schedule, self.state.total_steps)


def _clock(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


_ROW_KEYS = {"val_loss", "val_top1", "val_top5", "val_mim_top1", "test_loss", "test_top1", "test_top5",
             "test_mim_top1"}
