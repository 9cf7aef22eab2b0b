"""Checkpoints in safetensors + JSON only (no pickle), written atomically, with everything exact resume needs.

Layout (``vitkit.runs``): ``RUN_DIR/checkpoints/{last,best}/`` each hold ``model.safetensors`` + ``config.json``
(``vitkit.save_pretrained``, so ``vitkit.load_model(folder)`` works); ``last/`` also holds
``train_state.safetensors`` (optimizer state, EMA weights, RNG states as tensors) and ``train_state.json`` (step,
data position, best metric, optimizer hyper-parameters, scaler, scalar RNG state, time used). Under
``train.strategy: fsdp`` the optimizer and EMA state are sharded and live in ``last/dcp/`` instead
(``torch.distributed.checkpoint``, ``vitkit.train.fsdp``), with the model's shards; ``model.safetensors`` is still
the whole model, gathered on rank 0.

Atomicity: a checkpoint is written into ``.<name>.tmp-<pid>/``, every file and the folder are fsync'ed, then the
current ``<name>/`` is renamed to ``<name>.prev/``, the new folder renamed to ``<name>/``, and ``<name>.prev/``
removed. A process that dies at any moment leaves either ``<name>/`` or ``<name>.prev/`` complete; ``find_checkpoint``
falls back to ``.prev`` when ``<name>/`` is missing. When every process writes part of a checkpoint
(``shared_atomic_dir``), rank 0 makes the temporary folder and tells the others its path, and renames it only once
all of them have written.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import Tensor, nn

from vitkit.runs import find_checkpoint  # the layout lives in vitkit.runs; re-exported for the trainer
from vitkit.train.distributed import DistInfo

__all__ = ["atomic_dir", "shared_atomic_dir", "save_checkpoint", "write_checkpoint", "find_checkpoint",
           "read_train_state", "read_train_state_meta", "load_model_weights", "capture_rng", "restore_rng",
           "optimizer_state", "load_optimizer_state", "TRAIN_STATE_FORMAT", "SHARDED_STATE"]

log = logging.getLogger(__name__)

TRAIN_STATE_FORMAT = 1
_STATE_TENSORS, _STATE_JSON = "train_state.safetensors", "train_state.json"
SHARDED_STATE = "dcp"  # the sub-folder of the sharded train state (model, optimizer, EMA), fsdp runs only


# --------------------------------------------------------------------------------------------------- atomic io
def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    for p in folder.iterdir():
        if p.is_file():
            _fsync_path(p)
        elif p.is_dir():
            _fsync_tree(p)
    _fsync_path(folder)


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder; on normal exit it replaces ``final`` atomically (see the module docstring). On an
    exception the temporary folder is removed and ``final`` is untouched."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp, prev = final.parent / f".{final.name}.tmp-{os.getpid()}", final.parent / f"{final.name}.prev"
    for stale in final.parent.glob(f".{final.name}.tmp-*"):  # left by a killed process (one writer per run)
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(prev, ignore_errors=True)  # a stale .prev: final is newer and complete
        os.rename(final, prev)
    os.rename(tmp, final)
    _fsync_path(final.parent)
    shutil.rmtree(prev, ignore_errors=True)


@contextlib.contextmanager
def shared_atomic_dir(final: str | os.PathLike, info: DistInfo) -> Iterator[Path]:
    """``atomic_dir`` written by every process: rank 0 creates the temporary folder and broadcasts its path; each
    process writes its files there; after a barrier (all have written) rank 0 fsyncs and renames it. Every process
    must enter it at the same point; with one process it is ``atomic_dir``."""
    if not info.enabled:
        with atomic_dir(final) as tmp:
            yield tmp
        return
    import torch.distributed as dist
    with atomic_dir(final) if info.is_main else contextlib.nullcontext() as tmp:
        path = [os.fspath(tmp) if tmp is not None else None]
        dist.broadcast_object_list(path, src=0)
        yield Path(path[0])
        dist.barrier()  # every process's files are in place (DCP fsyncs each) before rank 0 renames


# ------------------------------------------------------------------------------------------------------ write
def write_checkpoint(folder: Path, model: nn.Module, class_names: list[str] | None = None,
                     tensors: dict[str, Tensor] | None = None, meta: dict[str, Any] | None = None) -> None:
    """Write ``model`` (vitkit format) and, if given, the training state into the existing ``folder``."""
    from safetensors.torch import save_file

    import vitkit
    from vitkit.weights import follow_umask
    vitkit.save_pretrained(model, folder, class_names=class_names)
    if meta is not None:
        save_file({k: v.detach().cpu().contiguous() for k, v in (tensors or {}).items()},
                  str(folder / _STATE_TENSORS), metadata={"format": "vitkit-train-state"})
        follow_umask(folder / _STATE_TENSORS)
        (folder / _STATE_JSON).write_text(json.dumps({"format": TRAIN_STATE_FORMAT, **meta}, indent=1))


def save_checkpoint(folder: str | os.PathLike, model: nn.Module, class_names: list[str] | None = None,
                    tensors: dict[str, Tensor] | None = None, meta: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (vitkit format) and, if given, the training state, atomically into ``folder``."""
    with atomic_dir(folder) as tmp:
        write_checkpoint(tmp, model, class_names, tensors, meta)
    return Path(folder)


# ------------------------------------------------------------------------------------------------------- read
def read_train_state_meta(folder: str | os.PathLike, resumable: bool = False) -> dict[str, Any]:
    """``train_state.json`` of a checkpoint, checked: a missing, unreadable or damaged file is an error naming it
    (with ``resumable``, also one that lacks what a resumed run needs)."""
    path = Path(folder) / _STATE_JSON
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no {_STATE_JSON}: it is a model folder, not a resumable checkpoint")
    try:
        meta = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is damaged (not valid JSON: {e}); restore it or start a new run") from None
    if not isinstance(meta, dict) or meta.get("format") != TRAIN_STATE_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"{path}: train state format {found!r} is not {TRAIN_STATE_FORMAT}")
    missing = [k for k in ("state", "optimizer", "rng", "data_order") if k not in meta] if resumable else []
    if resumable and (missing or not isinstance(meta["state"], dict) or "step" not in meta["state"]):
        raise ValueError(f"{path} is damaged (missing {', '.join(missing) or 'state.step'}); restore it or start a "
                         f"new run")
    return meta


def read_train_state(folder: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any]]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    meta = read_train_state_meta(folder)
    path = Path(folder) / _STATE_TENSORS
    try:
        return load_file(str(path)), meta
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} is damaged or missing ({e}); restore it or start a new run") from None


def load_model_weights(model: nn.Module, folder: str | os.PathLike) -> None:
    """Load ``folder/model.safetensors`` into ``model`` exactly (strict: every key, every shape)."""
    from safetensors.torch import load_file
    state = load_file(str(Path(folder) / "model.safetensors"))
    model.load_state_dict(state, strict=True)


# ------------------------------------------------------------------------------------------------- RNG streams
def capture_rng() -> tuple[dict[str, Tensor], dict[str, Any]]:
    """torch CPU / CUDA, NumPy and Python ``random`` states as tensors + JSON scalars."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(keys.astype(np.int64))
    version, internal, gauss_next = random.getstate()
    tensors["rng.python"] = torch.tensor(internal, dtype=torch.int64)
    meta = {"numpy": [kind, int(pos), int(has_gauss), float(cached)], "python": [version, gauss_next]}
    return tensors, meta


def restore_rng(tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = sorted(k for k in tensors if k.startswith("rng.cuda."))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    kind, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, gauss_next = meta["python"]
    random.setstate((version, tuple(int(v) for v in tensors["rng.python"].tolist()), gauss_next))


# -------------------------------------------------------------------------------------------------- optimizer
def optimizer_state(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``opt.state_dict()`` split into tensors (``optimizer.<param>.<key>``) and JSON (hyper-parameters, scalars)."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, entry in sd["state"].items():
        for key, value in entry.items():
            if isinstance(value, Tensor):
                tensors[f"optimizer.{pid}.{key}"] = value.detach().clone().contiguous()
            else:
                scalars.setdefault(str(pid), {})[key] = value
    groups = [{k: v for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars, "num_params": len(sd["state"])}


def _tuples(group: dict[str, Any]) -> dict[str, Any]:
    """JSON turned tuples (``betas``) into lists; give them back as tuples, as the optimizer built them."""
    return {k: tuple(v) if isinstance(v, list) and k != "params" and k != "param_names" else v
            for k, v in group.items()}


def load_optimizer_state(opt: torch.optim.Optimizer, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = value
    for pid, entry in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(entry)
    groups = [_tuples(g) for g in meta["param_groups"]]
    if len(groups) != len(opt.param_groups) or any(len(a["params"]) != len(b["params"])
                                                    for a, b in zip(groups, opt.param_groups)):
        raise ValueError("the checkpoint's optimizer parameter groups do not match this model and recipe")
    opt.load_state_dict({"state": state, "param_groups": groups})
