"""Reading checkpoint files safely. The format is recognised from the content, never from the file name.

``.pth``/``.bin``/``.pth.tar`` files go through ``torch.load(weights_only=True)`` only: a pickle that needs arbitrary
code (``__reduce__`` to ``os.system`` and the like) is refused before anything runs. ``.npz`` files are read with
``allow_pickle=False``.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from vitkit.weights.load_report import CheckpointError, UnsafeCheckpointError

__all__ = ["RawCheckpoint", "read_raw", "sniff", "follow_umask"]

_SAFETENSORS_MAX_HEADER = 100 * 1024 * 1024


@dataclass
class RawCheckpoint:
    path: str
    kind: str  # safetensors | torch | npz | folder
    tensors: dict[str, Any]  # name → torch.Tensor or np.ndarray (npz), or a nested container for torch files
    config: dict[str, Any] | None = None  # config.json of a folder
    extra: dict[str, Any] = field(default_factory=dict)


def sniff(path: str) -> str:
    """The container kind of a file, from its first bytes."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: file is empty or truncated ({len(head)} bytes)")
        if head[:2] == b"PK":
            try:
                with zipfile.ZipFile(path) as z:  # npz and torch's zip format are both zip archives
                    names = z.namelist()
            except (zipfile.BadZipFile, EOFError, OSError) as e:  # cut short: the central directory is missing
                raise CheckpointError(f"{path}: corrupt or truncated zip archive (.pth/.npz): {e}") from None
            if names and all(n.endswith(".npy") for n in names):
                return "npz"
            return "torch"
        if head[:2] in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05"):
            return "torch"  # legacy (non-zip) torch.save or a bare pickle
        n = int.from_bytes(head, "little")
        if 0 < n < _SAFETENSORS_MAX_HEADER:
            if f.read(1) == b"{":
                return "safetensors"
    raise CheckpointError(f"{path}: not a checkpoint vitkit can read (expected safetensors, a PyTorch .pth/.bin, "
                          f"a JAX .npz or a model folder)")


def _read_safetensors(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    try:
        return load_file(path)
    except Exception as e:  # safetensors raises its own error types for truncation and bad headers
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({e})") from None


def _read_torch(path: str) -> Any:
    try:
        # a file object, not the path: torch 2.13 hands any "*.safetensors" path to safetensors (name, not content)
        # argparse.Namespace: timm's CheckpointSaver stores the training arguments (T2T-ViT's release files); it is a
        # plain attribute holder, rebuilt without running code, so the restricted unpickler may create it
        with open(path, "rb") as f, warnings.catch_warnings(), torch.serialization.safe_globals([argparse.Namespace]):
            warnings.filterwarnings("ignore", message="Detected pickle protocol")  # refused below if it matters
            return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        blocked = re.search(r"GLOBAL ([\w.]+)", str(e))  # torch names the first global it refused
        stopped = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", str(e))
        what = (f"it references {blocked.group(1)}" if blocked else
                f"torch's restricted unpickler stopped at: {stopped.group(1).strip()}" if stopped else
                str(e).strip().splitlines()[0])
        raise UnsafeCheckpointError(
            f"{path}: refused to unpickle: the file needs arbitrary Python objects to load, which could run code "
            f"({what}; nothing was executed: torch.load(weights_only=True) stopped before creating it). If you "
            f"trust the file, convert it yourself to safetensors; vitkit never unpickles blindly.") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"{path}: corrupt or truncated PyTorch file ({str(e).splitlines()[0]})") from None


def _read_npz(path: str) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise CheckpointError(f"{path}: corrupt or truncated .npz file ({e})") from None


def _find_weights(folder: str) -> str:
    for name in ("model.safetensors", "pytorch_model.bin", "model.pth", "checkpoint.pth"):
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    if os.path.isfile(os.path.join(folder, "model.safetensors.index.json")):
        raise CheckpointError(f"{folder}: sharded checkpoints are not supported yet; merge the shards first")
    raise CheckpointError(f"{folder}: no model.safetensors or pytorch_model.bin in this folder")


def read_raw(path: str | os.PathLike) -> RawCheckpoint:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if os.path.isdir(path):
        cfg_path = os.path.join(path, "config.json")
        config = json.load(open(cfg_path)) if os.path.isfile(cfg_path) else None
        inner = read_raw(_find_weights(path))
        return RawCheckpoint(path, "folder", inner.tensors, config, {"weights_file": inner.path})
    kind = sniff(path)
    reader = {"safetensors": _read_safetensors, "torch": _read_torch, "npz": _read_npz}[kind]
    return RawCheckpoint(path, kind, reader(path))


def follow_umask(path: str | os.PathLike) -> None:
    """Give a written file the permissions the user's umask asks for (safetensors creates its files 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)
