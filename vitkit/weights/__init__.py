"""Reading checkpoints of any supported format into a family's vitkit layout.

``read_checkpoint(path, spec)`` reads the file or folder safely (``io``), unwraps release containers, and asks the
family's registered ``SourceFormat``s (``spec.formats``, owned by the family's converter module) which one the content
is: a key signature, a container, a transformers ``config.json``. The matching format's pure converter turns the
tensors into the family's layout and its hints say what the checkpoint implies about the architecture. vitkit's own
folders (``config.json`` with ``"format": "vitkit"``) need no conversion. This package keeps only what all families
share: safe reading, containers, the key-rename tables (``keymap``), the adaptation steps (``adapt``), the load report
and the download cache (``hub``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import Tensor

from vitkit.specs import CheckpointView, ModelSpec, SourceFormat
from vitkit.weights.io import RawCheckpoint, follow_umask, read_raw
from vitkit.weights.load_report import CheckpointError, CheckpointMismatchError, LoadReport, UnsafeCheckpointError

__all__ = ["Loaded", "follow_umask", "read_checkpoint", "unwrap", "checkpoint_view", "detect_format", "CheckpointError",
           "CheckpointMismatchError", "UnsafeCheckpointError", "LoadReport", "FORMAT_VERSION"]

FORMAT_VERSION = 1


@dataclass
class Loaded:
    state_dict: dict[str, Tensor]
    config_hints: dict[str, Any]
    report: LoadReport
    class_names: list[str] | None = None
    data_cfg: dict[str, Any] = field(default_factory=dict)


_CONTAINERS = ("state_dict_ema", "model", "state_dict", "model_ema", "module", "net")


def _is_state_dict(value: Any) -> bool:
    return isinstance(value, dict) and bool(value) and all(isinstance(v, Tensor) for v in value.values())


def _same_tensors(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)


def unwrap(obj: Any, report: LoadReport, key: str | None = None) -> tuple[dict[str, Any], str]:
    """Release containers → (the bare state dict, the container key or "").

    ``key`` names the entry to load (``checkpoint_key`` of ``create_model``); an entry that is not there is an error
    listing the ones that are. By default the first of ``_CONTAINERS`` present wins: T2T-ViT-style files (timm's
    CheckpointSaver) hold ``state_dict_ema``, which is what that official evaluation loads, so it wins over
    ``state_dict``. DeiT/BEiT training checkpoints hold ``model`` and ``model_ema``; their evaluation (``main.py
    --eval --resume``) runs ``model``, so ``model_ema`` is only a fallback. T2T-ViT's CIFAR files hold ``net``. The
    report names the entry loaded and the other state dicts the file holds (and whether they are identical)."""
    container = ""
    held = [k for k, v in obj.items() if _is_state_dict(v)] if isinstance(obj, dict) else []
    if key is not None and key not in held:
        what = f"state dicts under {', '.join(repr(k) for k in held)}" if held else "a bare state dict, no container"
        raise CheckpointError(f"{report.source}: checkpoint_key={key!r} is not in the file (it holds {what})")
    chosen = key if key is not None else next((k for k in _CONTAINERS if k in held), None)
    if chosen is not None:
        report.container = f"{{'{chosen}': state_dict}}"
        others = [f"{k!r} ({'identical' if _same_tensors(obj[k], obj[chosen]) else 'different weights'})"
                  for k in held if k != chosen]
        if others:
            report.notes.append(f"loaded {chosen!r}; the file also holds {', '.join(others)}: choose another with "
                                f"checkpoint_key=")
        obj, container = obj[chosen], chosen
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{report.source}: no state dict found in the file")
    state = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    skipped = sorted(set(obj) - set(state))
    if skipped:
        report.ignored.append(f"non-tensor entries {skipped}")
    if state and all(k.startswith("module.") for k in state):  # saved from DistributedDataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
        report.notes.append("stripped the 'module.' prefix (DistributedDataParallel)")
    return state, container


def checkpoint_view(state: dict[str, Any], kind: str, container: str = "",
                    config: dict[str, Any] | None = None) -> CheckpointView:
    return CheckpointView(frozenset(state), {k: tuple(v.shape) for k, v in state.items()}, kind, container, config)


def detect_format(view: CheckpointView, formats: Iterable[SourceFormat]) -> SourceFormat | None:
    """The first of ``formats`` (a family's, most specific first) whose detector recognises the checkpoint."""
    return next((f for f in formats if f.detect(view)), None)


def _from_vitkit(raw: RawCheckpoint, spec: ModelSpec, report: LoadReport) -> Loaded:
    cfg = raw.config
    if cfg.get("family") != spec.family:
        raise CheckpointMismatchError(f"{raw.path} holds a {cfg.get('family')} model ({cfg.get('model')}), "
                                      f"not a {spec.family} model like {spec.name}")
    report.format = "vitkit"
    data_cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in (cfg.get("data_cfg") or {}).items()}
    data_cfg.pop("input_size", None)
    return Loaded(dict(raw.tensors), dict(cfg.get("config", {})), report, cfg.get("class_names"), data_cfg)


def _no_format_error(raw: RawCheckpoint, spec: ModelSpec, view: CheckpointView,
                     others: Iterable[tuple[str, SourceFormat]]) -> CheckpointMismatchError:
    known = ", ".join(f.name for f in spec.formats) or "none"
    looks = sorted({f"{fmt.name} {family}" for family, fmt in others if family != spec.family and fmt.detect(view)})
    what = f"it looks like a {' or '.join(looks)} checkpoint" if looks else "no format of any family matches it"
    sample = ", ".join(sorted(view.keys)[:4])
    return CheckpointMismatchError(f"{raw.path} is not a {spec.family} checkpoint vitkit can read ({what}; "
                                   f"{spec.family} formats: {known}; first keys: {sample})")


def read_checkpoint(path: str | os.PathLike, spec: ModelSpec,
                    others: Iterable[tuple[str, SourceFormat]] = (), key: str | None = None) -> Loaded:
    """Read and convert a checkpoint for the registered variant ``spec``. ``others`` (family, format) pairs of every
    registered family only serve a better error: which family a checkpoint that fits none of ``spec``'s formats
    looks like. ``key``: the container entry to load (``unwrap``)."""
    raw = read_raw(path)
    report = LoadReport(source=os.fspath(path))
    is_vitkit = bool(raw.config) and raw.config.get("format") == "vitkit"
    if key is not None and (raw.kind in ("npz", "safetensors") or is_vitkit):
        raise CheckpointError(f"{path}: checkpoint_key={key!r} selects a state dict inside a .pth/.bin container; "
                              f"this {'vitkit folder' if is_vitkit else raw.kind + ' file'} holds only one")
    if is_vitkit:
        return _from_vitkit(raw, spec, report)
    state, container = (raw.tensors, "") if raw.kind == "npz" else unwrap(raw.tensors, report, key)
    view = checkpoint_view(state, raw.kind, container, raw.config)
    fmt = detect_format(view, spec.formats)
    if fmt is None:
        raise _no_format_error(raw, spec, view, others)
    report.format = fmt.name
    hints = fmt.hints(state, raw.config)
    class_names = _hf_class_names(raw.config) if fmt.name == "hf" else None
    return Loaded(fmt.convert(state, report), hints, report, class_names, dict(fmt.data_cfg))


def _hf_class_names(config: dict | None) -> list[str] | None:
    """transformers' id2label as a list, unless it holds only placeholder names (LABEL_0, …)."""
    import re
    labels = (config or {}).get("id2label")
    if not labels:
        return None
    names = [labels[str(i)] if str(i) in labels else labels.get(i) for i in range(len(labels))]
    if any(n is None for n in names) or all(re.fullmatch(r"LABEL_\d+", n) for n in names):
        return None
    return names
