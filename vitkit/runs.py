"""The run-folder layout, shared by training, which writes it, and evaluation, prediction,
conversion and export, which read it: ``RUN_DIR/config.yaml``, ``metrics.csv``, ``summary.json`` and
``checkpoints/{last,best}/`` (each a vitkit model folder; ``last`` also holds the training state)."""
from __future__ import annotations

import logging
import os
from pathlib import Path

__all__ = ["CHECKPOINTS", "CONFIG", "METRICS", "SUMMARY", "checkpoint_dir", "eval_batch_size", "find_checkpoint",
           "is_run_folder", "run_checkpoint", "write_text_atomic"]

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
CONFIG = "config.yaml"
METRICS = "metrics.csv"
SUMMARY = "summary.json"


def checkpoint_dir(run_dir: str | os.PathLike, name: str) -> Path:
    """``RUN_DIR/checkpoints/<name>`` (``last`` or ``best``), whether or not it exists yet."""
    return Path(run_dir) / CHECKPOINTS / name


def find_checkpoint(run_dir: str | os.PathLike, name: str = "last") -> Path | None:
    """``checkpoints/<name>``, or its ``.prev`` left by a process killed between the two renames of an atomic save."""
    base = checkpoint_dir(run_dir, name)
    for folder in (base, base.with_name(f"{name}.prev")):
        if (folder / "model.safetensors").is_file() and (folder / "config.json").is_file():
            if folder.name.endswith(".prev"):
                log.warning("using %s: the newer checkpoint was interrupted while being renamed", folder)
            return folder
    return None


def eval_batch_size(batch_size: int, accum_steps: int = 1) -> int:
    """The batch a run evaluates in: its micro-batch, at most 256. ``vitkit eval RUN`` uses the same one, because in
    bf16 a batch's composition changes the rounding of its results."""
    return max(1, min(256, batch_size // max(1, accum_steps)))


def is_run_folder(path: str | os.PathLike) -> bool:
    return os.path.isdir(os.path.join(os.fspath(path), CHECKPOINTS))


def run_checkpoint(run_dir: str | os.PathLike) -> str:
    """``checkpoints/best`` of a run (the checkpoint it selected on its validation split), else ``checkpoints/last``."""
    for name in ("best", "last"):
        folder = find_checkpoint(run_dir, name)
        if folder is not None:
            return os.fspath(folder)
    raise FileNotFoundError(f"{run_dir}: no checkpoints/best/ or checkpoints/last/ with a vitkit model in it")


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``path`` whole or not at all (a temporary name, then a rename): a signal or a crash at any moment leaves
    the previous content or the new one, never a half-written file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
