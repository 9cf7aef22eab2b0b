"""Optimisers with weight-decay exclusions and layer-wise learning-rate decay.

Parameter groups follow MAE ``util/lr_decay.py:param_groups_lrd`` (the BEiT convention): every parameter gets the
layer id its model reports (``model.layer_id(name)``: 0 = embeddings, i + 1 = block i, last = final norm and head)
and the learning-rate scale ``layer_decay ** (num_layer_ids - 1 - layer_id)``; 1-d parameters (biases, norm
weights), ``*.bias`` and the names in ``model.no_weight_decay()`` get no weight decay (nanoGPT / timm
``param_groups_weight_decay``). Each group carries ``lr_scale``, which the schedule multiplies in. Under FSDP the
optimizer is built after sharding, on the sharded parameters: they keep their names and their global shapes, so the
layer ids, the 1-d rule and the groups are those of the whole model.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vitkit.train.config import OptimConfig

__all__ = ["param_groups", "build_optimizer", "skips_weight_decay", "freeze_layers"]


def skips_weight_decay(name: str, param: torch.Tensor, no_decay_names: set[str]) -> bool:
    """Biases, norm weights and other 1-d tensors, and the model's ``no_weight_decay()`` names (exact, or as the last
    component of a dotted name, e.g. a relative-position table inside every block)."""
    return (param.ndim <= 1 or name.endswith(".bias") or name in no_decay_names
            or name.rsplit(".", 1)[-1] in no_decay_names)


def _layer_scale(model: nn.Module, name: str, layer_decay: float | None) -> tuple[int, float]:
    if layer_decay is None or layer_decay == 1.0:
        return 0, 1.0
    layer = model.layer_id(name)
    return layer, layer_decay ** (model.num_layer_ids - 1 - layer)


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float | None = None) -> list[dict[str, Any]]:
    """Group trainable parameters by (layer, decay/no-decay); groups are ordered by first appearance, so the same
    model always yields the same groups (optimizer state is saved and restored by position)."""
    no_decay = set(model.no_weight_decay())  # every vitkit model has it (the family contract)
    groups: dict[str, dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = skips_weight_decay(name, p, no_decay)
        layer, scale = _layer_scale(model, name, layer_decay)
        key = f"layer_{layer}_{'no_decay' if skip else 'decay'}"
        if key not in groups:
            groups[key] = {"name": key, "params": [], "param_names": [], "lr_scale": scale,
                           "weight_decay": 0.0 if skip else weight_decay}
        groups[key]["params"].append(p)
        groups[key]["param_names"].append(name)
    return list(groups.values())


def freeze_layers(model: nn.Module, n: int) -> list[str]:
    """Stop the gradient of every parameter whose ``layer_id`` is below ``n`` (the embeddings and the first
    ``n - 1`` blocks): partial fine-tuning, as in the "freeze the first k blocks" transfer baselines (e.g. Yosinski et
    al. 2014, "How transferable are features", §4; MAE §4.3 partial fine-tuning). Returns the frozen names."""
    if n <= 0:
        return []
    if n >= model.num_layer_ids:
        raise ValueError(f"optim.freeze_layers {n} would freeze every layer ({model.num_layer_ids} layer ids, the "
                         f"last being the head)")
    frozen = []
    for name, p in model.named_parameters():
        if model.layer_id(name) < n:
            p.requires_grad_(False)
            frozen.append(name)
    return frozen


def build_optimizer(model: nn.Module, cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    """AdamW (decoupled weight decay, Loshchilov & Hutter) or SGD with momentum over ``param_groups``.

    ``lr`` is the peak learning rate after any batch scaling; the schedule sets each group's ``lr`` every step.
    """
    groups = param_groups(model, cfg.weight_decay, cfg.layer_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=cfg.betas, eps=cfg.eps, foreach=True)
    return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov, foreach=True)
