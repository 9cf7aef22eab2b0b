"""Training: one loop with pluggable tasks, typed recipes, atomic checkpoints with exact resume, and DDP.

    from vitkit.train import train, resume, load_recipe
    result = train("configs/digits_demo.yaml", "runs/digits")        # or a RecipeConfig / plain dict
    result = resume("runs/digits")                                   # after SIGINT / SIGTERM / SIGKILL

The CLI (``vitkit train``) is a thin front-end over these two functions. Under ``torchrun`` every process calls the
same function; rank 0 alone writes the run folder.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from vitkit.config import ConfigError
from vitkit.runs import checkpoint_dir, find_checkpoint, write_text_atomic
from vitkit.train.checkpoint import read_train_state_meta
from vitkit.train.config import RESUME_SETTABLE, RecipeConfig, dump_yaml, load_recipe, resolve
from vitkit.train.distributed import DistInfo, barrier, init_distributed, shutdown_distributed
from vitkit.train.loop import NonFiniteLossError, RunResult, RunState, Trainer
from vitkit.train.process import runtime

__all__ = ["train", "resume", "check_run_dir", "load_recipe", "resolve", "RecipeConfig", "RunResult", "RunState",
           "Trainer", "NonFiniteLossError", "ConfigError"]

log = logging.getLogger(__name__)


def _as_config(recipe: RecipeConfig | dict[str, Any] | str | os.PathLike, sets: list[str]) -> RecipeConfig:
    if isinstance(recipe, (str, os.PathLike)):
        return load_recipe(recipe, sets)
    if sets:
        return load_recipe(None, sets, base=recipe if isinstance(recipe, dict) else _plain(recipe))
    return resolve(recipe)


def _plain(cfg: RecipeConfig) -> dict[str, Any]:
    return yaml.safe_load(dump_yaml(cfg))


def check_run_dir(run_dir: Path) -> None:
    """Refuse a folder that holds a run; a folder left by a start that saved no checkpoint may be reused."""
    if run_dir.exists() and not run_dir.is_dir():
        raise FileExistsError(f"{run_dir} exists and is not a folder; choose another --out")
    if not (run_dir / "config.yaml").exists():
        return
    done = [p for p in (find_checkpoint(run_dir, "last"), find_checkpoint(run_dir, "best"),
                        run_dir / "summary.json" if (run_dir / "summary.json").exists() else None) if p]
    if done:
        raise FileExistsError(f"{run_dir} already holds a run; continue it with `vitkit train --resume {run_dir}` "
                              f"or choose another --out")
    log.info("%s holds a start that saved no checkpoint; starting again there", run_dir)


def _prepare_run_dir(run_dir: Path, cfg: RecipeConfig, info: DistInfo) -> None:
    """(rank 0) create the folder and write the resolved config, once every rank has built its trainer."""
    barrier(info)  # every rank has checked and built everything before rank 0 creates anything
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run_dir / "config.yaml", dump_yaml(cfg))
    barrier(info)


def _check_pretrained(cfg: RecipeConfig) -> None:
    p = cfg.model.pretrained
    if isinstance(p, str) and not os.path.exists(p):
        raise FileNotFoundError(f"model.pretrained: {p} does not exist")


_MPS_GRAD_SCALER = "2.8"  # torch's MPS kernels of the loss scaler (unscale / update scale) ship from this release


def _check_device(cfg: RecipeConfig, device, info: DistInfo) -> None:
    """fp16 trains with a loss scaler (``torch.amp.GradScaler``) on any device whose torch has its kernels; on a CPU
    it is said once that fp16 is emulated (slow) unless the CPU computes it natively (AVX-512 FP16, AMX-FP16)."""
    if cfg.train.amp != "fp16":
        return
    if device.type == "mps" and torch.__version__ < _MPS_GRAD_SCALER:
        raise ConfigError(f"train.amp: fp16 on mps needs torch >= {_MPS_GRAD_SCALER} (its GradScaler kernels); "
                          f"this is torch {torch.__version__}, use bf16")
    if device.type == "cpu" and info.is_main:
        log.warning("train.amp: fp16 on a CPU is emulated, and slower than fp32, unless the CPU computes fp16 "
                    "natively (AVX-512 FP16 or AMX-FP16); gradients are loss-scaled as on a GPU")


def _run(cfg: RecipeConfig, run_dir: Path, info: DistInfo, device, resume_from: Path | None,
         before_fit: Callable[[], None], clock_start: float | None) -> RunResult:
    """Build the trainer (data, model, optimiser: nothing is written yet), call ``before_fit``, then train."""
    try:
        _check_device(cfg, device, info)
        with runtime(cfg.train, device, info.local_world_size) as threads:
            trainer = Trainer(cfg, run_dir, info, device, threads, resume_from, clock_start)
            before_fit()
            return trainer.fit()
    finally:
        shutdown_distributed(info)


def train(recipe: RecipeConfig | dict[str, Any] | str | os.PathLike, out_dir: str | os.PathLike,
          sets: list[str] = (), clock_start: float | None = None) -> RunResult:
    """Train from a recipe (config object, plain dict or YAML path, plus ``--set``-style overrides) into
    ``out_dir``. Everything is validated, and the data and model are built, before the folder is created.
    A time budget counts from ``clock_start`` (a ``time.perf_counter()`` value; default: now)."""
    cfg = _as_config(recipe, list(sets))
    _check_pretrained(cfg)
    run_dir = Path(out_dir)
    check_run_dir(run_dir)
    info, device = init_distributed(cfg.train.device)
    return _run(cfg, run_dir, info, device, None, lambda: _prepare_run_dir(run_dir, cfg, info), clock_start)


def _check_resume_sets(sets: list[str]) -> None:
    for s in sets:
        key = s.split("=", 1)[0].strip()
        if not any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUME_SETTABLE):
            raise ConfigError(f"--set {key}: a resumed run keeps its recipe (exact resume); only "
                              f"{', '.join(k + '*' if k.endswith('.') else k for k in RESUME_SETTABLE)} may change")


def _read_run_config(path: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected the mapping of recipe sections vitkit wrote there")
    return raw


def _history(run_dir: Path) -> list[str]:
    """What a run folder holds besides a resumable checkpoint (what restarting from step 0 would lose)."""
    found = []
    best = find_checkpoint(run_dir, "best")
    if best is not None:
        found.append(f"{best} (weights only)")
    if (run_dir / "summary.json").is_file():
        found.append(str(run_dir / "summary.json"))
    metrics = run_dir / "metrics.csv"
    if metrics.is_file() and len(metrics.read_text().strip().splitlines()) > 1:
        found.append(f"{metrics} (rows)")
    return found


def resume(run_dir: str | os.PathLike, sets: list[str] = (), clock_start: float | None = None) -> RunResult:
    """Continue the run in ``run_dir`` from ``checkpoints/last`` with its recorded config; it ends exactly where an
    uninterrupted run would (bitwise on CPU in deterministic mode).

    Without ``checkpoints/last`` (nor its ``.prev``), a folder whose start saved nothing starts again from step 0;
    one that holds history (best/, summary.json, metrics rows) is refused, since restarting would overwrite it. A
    completed run only re-reports (final test, summary, plots)."""
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a vitkit run folder (no config.yaml)")
    _check_resume_sets(list(sets))
    cfg = load_recipe(None, list(sets), base=_read_run_config(cfg_path))
    last = find_checkpoint(run_dir, "last")
    if last is None:
        history = _history(run_dir)
        if history:
            raise FileNotFoundError(
                f"{run_dir}: checkpoints/last is missing, so the run cannot continue exactly; restarting it would "
                f"overwrite {', '.join(history)}. Restore checkpoints/last, or start a new run (another --out; "
                f"--set model.pretrained={checkpoint_dir(run_dir, 'best')} starts from the best weights)")
        log.warning("%s has no checkpoint yet (its start saved none): starting it again from step 0", run_dir)
    else:
        read_train_state_meta(last, resumable=True)  # a damaged train_state.json is named before anything else
    info, device = init_distributed(cfg.train.device)

    def write_config() -> None:
        if info.is_main and sets:
            write_text_atomic(cfg_path, dump_yaml(cfg))
    return _run(cfg, run_dir, info, device, last, write_config, clock_start)
