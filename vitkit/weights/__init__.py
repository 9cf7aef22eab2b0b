"""Weight import and export.

``read_checkpoint(path, spec)`` recognises the format from the content (vitkit folder, transformers folder or state
dict, JAX ``.npz``, timm / official state dicts in safetensors or ``.pth``), unwraps release containers, converts the
tensors to vitkit's layout with the pure ``state_dict → state_dict`` function of that format (one module per format:
``timm``, ``hf``, ``jax_npz``) and collects config hints the checkpoint implies. ``save_pretrained`` writes vitkit's
own format (``model.safetensors`` + ``config.json``); ``load_model`` rebuilds a model from it without a name.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from vitkit.weights import hf, jax_npz, timm
from vitkit.weights.io import RawCheckpoint, read_raw
from vitkit.weights.report import (CheckpointError, CheckpointMismatchError, LoadReport, UnsafeCheckpointError)

__all__ = ["Loaded", "read_checkpoint", "save_pretrained", "load_model", "unwrap", "CheckpointError",
           "CheckpointMismatchError", "UnsafeCheckpointError", "LoadReport", "FORMAT_VERSION"]

FORMAT_VERSION = 1


@dataclass
class Loaded:
    state_dict: dict[str, Tensor]
    config_hints: dict[str, Any]
    report: LoadReport
    class_names: list[str] | None = None
    data_cfg: dict[str, Any] = field(default_factory=dict)


def unwrap(obj: Any, report: LoadReport) -> dict[str, Any]:
    """Release containers → the bare state dict. T2T-ViT-style files (timm's CheckpointSaver) hold
    ``state_dict_ema``, which is what that official evaluation loads, so it wins over ``state_dict``. DeiT/BEiT
    training checkpoints hold ``model`` and ``model_ema``; their evaluation (``main.py --eval --resume``) runs
    ``model``, so ``model_ema`` is only a fallback."""
    if isinstance(obj, dict):
        for key in ("state_dict_ema", "model", "state_dict", "model_ema", "module"):
            inner = obj.get(key)
            if isinstance(inner, dict) and inner and all(isinstance(v, Tensor) for v in inner.values()):
                report.container = f"{{'{key}': state_dict}}"
                obj = inner
                break
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{report.source}: no state dict found in the file")
    state = {k: v for k, v in obj.items() if isinstance(v, (Tensor,))}
    skipped = sorted(set(obj) - set(state))
    if skipped:
        report.ignored.append(f"non-tensor entries {skipped}")
    if all(k.startswith("module.") for k in state):  # saved from DistributedDataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
        report.notes.append("stripped the 'module.' prefix (DistributedDataParallel)")
    return state


def _from_vitkit(raw: RawCheckpoint, spec, report: LoadReport) -> Loaded:
    cfg = raw.config
    if cfg.get("family") != spec.family:
        raise CheckpointMismatchError(f"{raw.path} holds a {cfg.get('family')} model ({cfg.get('model')}), "
                                      f"not a {spec.family} model like {spec.name}")
    report.format = "vitkit"
    data_cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in (cfg.get("data_cfg") or {}).items()}
    data_cfg.pop("input_size", None)
    return Loaded(dict(raw.tensors), dict(cfg.get("config", {})), report, cfg.get("class_names"), data_cfg)


def _from_hf(raw: RawCheckpoint, spec, report: LoadReport, state: dict[str, Tensor]) -> Loaded:
    report.format = "hf"
    if spec.family not in hf.CONVERTERS:
        raise CheckpointError(f"{raw.path}: transformers checkpoints of family {spec.family} are not supported yet")
    model_type = (raw.config or {}).get("model_type")
    if model_type and hf.MODEL_TYPES.get(model_type) not in (None, spec.family) and spec.family not in ("vit", "deit"):
        raise CheckpointMismatchError(f"{raw.path} is a transformers {model_type!r} model, not {spec.family}")
    hints = hf.config_hints(spec.family, raw.config, state)
    fields = {f.name for f in dataclasses.fields(spec.model_cls.config_cls)}
    if "dist_head" in hints and "dist_head" not in fields:
        raise CheckpointMismatchError(
            f"{raw.path} is a transformers DeiT whose sequence holds a distillation token (DeiTForImageClassification "
            f"or DeiTModel); {spec.name} has none. Load it with a deit_*_distilled_* name (built with "
            f"dist_head=False: the class token alone is classified, as in transformers).")
    return Loaded(hf.CONVERTERS[spec.family](state, report), hints, report, hf.class_names(raw.config))


def _from_jax(raw: RawCheckpoint, spec, report: LoadReport) -> Loaded:
    report.format = "jax"
    if spec.family not in jax_npz.CONVERTERS:
        raise CheckpointError(f"{raw.path}: a JAX ViT checkpoint cannot be loaded into {spec.family} ({spec.name})")
    hints = jax_npz.config_hints(spec.family, raw.tensors)
    return Loaded(jax_npz.CONVERTERS[spec.family](raw.tensors, report), hints, report)


def read_checkpoint(path: str | os.PathLike, spec) -> Loaded:
    """Read and convert a checkpoint for the registered variant ``spec`` (a ``ModelSpec``)."""
    raw = read_raw(path)
    report = LoadReport(source=os.fspath(path))
    if raw.config and raw.config.get("format") == "vitkit":
        return _from_vitkit(raw, spec, report)
    if raw.kind == "npz" or (raw.kind != "torch" and jax_npz.looks_like_jax(raw.tensors)):
        return _from_jax(raw, spec, report)
    state = unwrap(raw.tensors, report)
    if (raw.config and "model_type" in raw.config) or hf.looks_like_hf(state):
        return _from_hf(raw, spec, report, state)
    if spec.family not in timm.CONVERTERS:
        raise CheckpointError(f"{raw.path}: no converter for family {spec.family}")
    report.format = "official" if report.container else "timm"
    return Loaded(timm.CONVERTERS[spec.family](state, report), timm.config_hints(spec.family, state), report)


def save_pretrained(model: nn.Module, folder: str | os.PathLike, class_names: list[str] | None = None) -> str:
    """Write ``model`` in vitkit's own format: ``model.safetensors`` + ``config.json``, each atomically."""
    from dataclasses import asdict

    from safetensors.torch import save_file

    from vitkit.config import to_dict
    from vitkit.registry import get_spec
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    name = getattr(model, "variant_name", None)
    if name is None:
        raise ValueError("save_pretrained needs a model built by vitkit.create_model")
    config = {"format": "vitkit", "format_version": FORMAT_VERSION, "model": name, "family": get_spec(name).family,
              "config": to_dict(model.cfg), "data_cfg": to_dict(asdict(model.data_cfg)),
              "class_names": class_names if class_names is not None else getattr(model, "class_names", None)}
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    _atomic(os.path.join(folder, "model.safetensors"), lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    _atomic(os.path.join(folder, "config.json"),
            lambda tmp: open(tmp, "w").write(json.dumps(config, indent=1, sort_keys=True)))
    return folder


def follow_umask(path: str | os.PathLike) -> None:
    """Give a written file the permissions the user's umask asks for (safetensors creates its files 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def _atomic(path: str, write) -> None:
    """Write to a temporary name in the same folder, flush it to disk, then rename over ``path``."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        write(tmp)
        follow_umask(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_model(path: str | os.PathLike, **kwargs: Any) -> nn.Module:
    """Rebuild a model saved by ``save_pretrained`` (the variant name comes from its config.json)."""
    from vitkit.registry import create_model
    cfg_path = os.path.join(os.fspath(path), "config.json")
    if not os.path.isfile(cfg_path):
        raise CheckpointError(f"{path}: not a vitkit model folder (no config.json); use "
                              f"create_model(name, pretrained=path) for other formats")
    cfg = json.load(open(cfg_path))
    if cfg.get("format") != "vitkit":
        raise CheckpointError(f"{path}: config.json is not vitkit's; use create_model(name, pretrained=path)")
    return create_model(cfg["model"], pretrained=path, **kwargs)
