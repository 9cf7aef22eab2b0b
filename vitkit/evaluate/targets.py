"""What to evaluate: a training run folder, a vitkit model folder, or a registered name plus any checkpoint.

Run folders (``runs/<name>/``, laid out in ``vitkit.runs``) hold ``config.yaml`` and ``checkpoints/{best,last}/``, each a vitkit
model folder; ``best`` is preferred because it is the checkpoint the run selected on its validation split.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import yaml
from torch import nn

from vitkit.runs import is_run_folder, run_checkpoint

__all__ = ["Target", "load_target", "NAMED_WEIGHTS_NEED_A_MODEL", "is_run_folder", "is_vitkit_folder",
           "run_checkpoint", "default_device"]

log = logging.getLogger(__name__)


@dataclass
class Target:
    model: nn.Module
    description: str  # e.g. "runs/x/checkpoints/best (vit_tiny_patch16_224)"
    run_dir: str | None = None
    checkpoint: str | None = None  # the file or folder the weights came from; None for random weights
    run_config: dict[str, Any] | None = None  # the run's resolved config.yaml


def is_vitkit_folder(path: str | os.PathLike) -> bool:
    cfg = os.path.join(os.fspath(path), "config.json")
    if not os.path.isfile(cfg):
        return False
    try:
        with open(cfg) as f:
            return json.load(f).get("format") == "vitkit"
    except (OSError, ValueError, AttributeError):
        return False


def _read_run_config(run_dir: str) -> dict[str, Any] | None:
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(path):
        log.warning("%s has no config.yaml; the data section must come from --data-config/--set", run_dir)
        return None
    with open(path) as f:
        cfg = yaml.safe_load(f) or {}
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    return cfg


def load_target(path: str | os.PathLike | bool | None = None, model_name: str | None = None) -> Target:
    """Build the model to evaluate.

    - ``path`` a run folder: its best (else last) checkpoint, plus the run's config.yaml;
    - ``path`` a vitkit model folder: ``vitkit.load_model(path)``;
    - ``path`` True or the literal ``true`` (``--pretrained true``): ``model_name``'s named weights from the catalog,
      downloaded once into the verified cache (``vitkit.weights.hub``); ``./true`` is a path;
    - ``model_name`` given: ``vitkit.create_model(model_name, pretrained=...)`` with the checkpoint above or ``path``
      itself in any format vitkit reads (random weights, with a warning, when ``path`` is None).
    """
    import vitkit
    from vitkit.weights.hub import requests_named_weights
    if requests_named_weights(path):
        return _named_weights(model_name)
    path = os.fspath(path) if path not in (None, False) else None  # false: no weights (a recipe's teacher_pretrained)
    if path is not None and not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or folder")
    run_dir = path if path is not None and is_run_folder(path) else None
    checkpoint = run_checkpoint(run_dir) if run_dir else path
    run_config = _read_run_config(run_dir) if run_dir else None
    if model_name:
        model = vitkit.create_model(model_name, pretrained=checkpoint)
    elif checkpoint and is_vitkit_folder(checkpoint):
        model = vitkit.load_model(checkpoint)
    elif checkpoint:
        raise ValueError(f"{checkpoint} is not a vitkit model or run folder; name the architecture with "
                         f"--model NAME to load it (`vitkit models` lists the names)")
    else:
        raise ValueError("nothing to load: give --model NAME (and --pretrained PATH), or a vitkit model/run folder")
    if checkpoint is None:
        log.warning("no weights given: %s is randomly initialised, its predictions are meaningless", model_name)
    described = f"{checkpoint} ({model.variant_name})" if checkpoint else f"{model.variant_name} (random weights)"
    return Target(model, described, run_dir, checkpoint, run_config)


NAMED_WEIGHTS_NEED_A_MODEL = ("--pretrained true loads a variant's named weights: name the variant with --model NAME "
                              "(`vitkit models --pretrained` lists those that have them)")


def _named_weights(model_name: str | None) -> Target:
    """The catalog's named weights of ``model_name`` (``--pretrained true``)."""
    import vitkit
    if not model_name:
        raise ValueError(NAMED_WEIGHTS_NEED_A_MODEL)
    model = vitkit.create_model(model_name, pretrained=True)
    weights = vitkit.get_spec(model_name).weights
    checkpoint = model.load_report.source  # the verified file in the cache
    return Target(model, f"{checkpoint} ({model_name}, named weights from {weights.url})", checkpoint=checkpoint)


def default_device(requested: str | None = None) -> torch.device:
    """``requested`` if given (checked: ``vitkit.hardware.parse_device``), else the first accelerator PyTorch reports
    (CUDA, then Apple MPS), else the CPU."""
    from vitkit.hardware import parse_device
    return parse_device(requested)
