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
from typing import Any

import yaml

from vitkit.config import ConfigError
from vitkit.train.checkpoint import find_checkpoint
from vitkit.train.config import RESUME_SETTABLE, RecipeConfig, dump_yaml, load_recipe, resolve
from vitkit.train.distributed import DistInfo, barrier, init_distributed, shutdown_distributed
from vitkit.train.loop import NonFiniteLossError, RunResult, RunState, Trainer
from vitkit.train.runtime import runtime

__all__ = ["train", "resume", "load_recipe", "resolve", "RecipeConfig", "RunResult", "RunState", "Trainer",
           "NonFiniteLossError", "ConfigError"]

log = logging.getLogger(__name__)


def _as_config(recipe: RecipeConfig | dict[str, Any] | str | os.PathLike, sets: list[str]) -> RecipeConfig:
    if isinstance(recipe, (str, os.PathLike)):
        return load_recipe(recipe, sets)
    if sets:
        return load_recipe(None, sets, base=recipe if isinstance(recipe, dict) else _plain(recipe))
    return resolve(recipe)


def _plain(cfg: RecipeConfig) -> dict[str, Any]:
    return yaml.safe_load(dump_yaml(cfg))


def _prepare_run_dir(run_dir: Path, cfg: RecipeConfig, info: DistInfo) -> None:
    """Refuse to overwrite an existing run, then (rank 0) create the folder and write the resolved config."""
    if (run_dir / "config.yaml").exists():
        raise FileExistsError(f"{run_dir} already holds a run; continue it with `vitkit train --resume {run_dir}` "
                              f"or choose another --out")
    barrier(info)  # every rank has checked before rank 0 creates anything
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_yaml(cfg))
    barrier(info)


def _check_pretrained(cfg: RecipeConfig) -> None:
    p = cfg.model.pretrained
    if isinstance(p, str) and not os.path.exists(p):
        raise FileNotFoundError(f"model.pretrained: {p} does not exist")


def _check_device(cfg: RecipeConfig, device, info: DistInfo) -> None:
    if cfg.train.amp == "fp16" and device.type != "cuda":
        shutdown_distributed(info)
        raise ConfigError(f"train.amp: fp16 needs CUDA (GradScaler); this run is on {device}, use bf16")


def _run(cfg: RecipeConfig, run_dir: Path, info: DistInfo, device, resume_from: Path | None) -> RunResult:
    try:
        with runtime(cfg.train, device, info.local_world_size) as threads:
            return Trainer(cfg, run_dir, info, device, threads, resume_from).fit()
    finally:
        shutdown_distributed(info)


def train(recipe: RecipeConfig | dict[str, Any] | str | os.PathLike, out_dir: str | os.PathLike,
          sets: list[str] = ()) -> RunResult:
    """Train from a recipe (config object, plain dict or YAML path, plus ``--set``-style overrides) into
    ``out_dir``. Everything is validated before the folder is created."""
    cfg = _as_config(recipe, list(sets))
    _check_pretrained(cfg)
    info, device = init_distributed(cfg.train.device)
    _check_device(cfg, device, info)
    run_dir = Path(out_dir)
    try:
        _prepare_run_dir(run_dir, cfg, info)
    except BaseException:
        shutdown_distributed(info)
        raise
    return _run(cfg, run_dir, info, device, None)


def _check_resume_sets(sets: list[str]) -> None:
    for s in sets:
        key = s.split("=", 1)[0].strip()
        if not any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUME_SETTABLE):
            raise ConfigError(f"--set {key}: a resumed run keeps its recipe (exact resume); only "
                              f"{', '.join(k + '*' if k.endswith('.') else k for k in RESUME_SETTABLE)} may change")


def resume(run_dir: str | os.PathLike, sets: list[str] = ()) -> RunResult:
    """Continue the run in ``run_dir`` from ``checkpoints/last`` with its recorded config; it ends exactly where an
    uninterrupted run would (bitwise on CPU in deterministic mode)."""
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a vitkit run folder (no config.yaml)")
    _check_resume_sets(list(sets))
    cfg = load_recipe(None, list(sets), base=yaml.safe_load(cfg_path.read_text()))
    info, device = init_distributed(cfg.train.device)
    _check_device(cfg, device, info)
    last = find_checkpoint(run_dir, "last")
    if last is None:
        log.warning("%s has no checkpoint yet: starting it again from step 0", run_dir)
    elif info.is_main and sets:
        (run_dir / "config.yaml").write_text(dump_yaml(cfg))
    return _run(cfg, run_dir, info, device, last)
