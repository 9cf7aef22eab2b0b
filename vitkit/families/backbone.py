"""Every family as a backbone, timm-compatible where timm has the API: ``feature_info``, ``features_only`` models
returning NCHW maps, and activation checkpointing per block.

``feature_info`` is read off ``forward_intermediates`` of a twin of the model on the meta device (shapes only), at
the model's native size, so it cannot disagree with what the model returns: one entry per block (token models) or
stage (pyramid models), with timm's keys ``num_chs`` (channels of the map), ``reduction`` (input pixels per map
cell) and ``module`` (the block's or stage's name). ``FeatureExtractor`` (``create_model(..., features_only=True)``) returns the chosen
entries as (B, C, H, W) maps for every family: token models' block outputs are laid out on their patch grid with the
prefix tokens (class, distillation) dropped, as ``FamilyModel.feature_map`` does.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from vitkit.families.contract import FamilyModel, select_indices, token_grid

__all__ = ["feature_info", "FeatureExtractor", "set_grad_checkpointing", "default_out_indices"]


_SHAPES: dict[tuple[type, str, tuple[int, ...]], list[tuple[int, ...]]] = {}  # (class, repr(cfg), input size)


def _shapes(model: FamilyModel) -> list[tuple[int, ...]]:
    """The shapes ``forward_intermediates`` gives for one image of the model's native size, from a twin built on
    the meta device (shapes only: nothing is computed, and the model itself is not run). Kept per (class, config,
    input size): the shapes are a function of those alone, and a meta forward pass costs up to seconds."""
    key = (type(model), repr(model.cfg), tuple(model.data_cfg.input_size))
    if key not in _SHAPES:
        _, H, W = model.data_cfg.input_size
        with torch.device("meta"):
            twin = type(model)(model.cfg).eval()
        with torch.no_grad():
            outs = twin.forward_intermediates(torch.empty(1, model.cfg.in_chans, H, W, device="meta"))
        if len(_SHAPES) >= 256:
            _SHAPES.clear()
        _SHAPES[key] = [tuple(o.shape) for o in outs]
    return _SHAPES[key]


def feature_info(model: FamilyModel) -> list[dict[str, Any]]:
    """One dict per block or stage: ``num_chs``, ``reduction`` (as timm's ``feature_info``), ``module`` and
    ``index``. A token model's block of (B, prefix + h·w, D) tokens has D channels and reduction H / h."""
    _, H, W = model.data_cfg.input_size
    shapes, names = _shapes(model), model.feature_names()
    if len(shapes) != len(names):
        raise RuntimeError(f"{type(model).__name__}: forward_intermediates gives {len(shapes)} outputs but "
                           f"feature_names() names {len(names)}")
    info = []
    for i, (shape, name) in enumerate(zip(shapes, names)):
        if model.intermediates == "pyramid":  # (1, C, h, w)
            chs, h = shape[1], shape[2]
        else:  # (1, prefix + h·w, D)
            chs, h = shape[2], token_grid(shape[1] - model.num_prefix_tokens, (H, W))[0]
        info.append({"index": i, "module": name, "num_chs": int(chs), "reduction": int(round(H / h))})
    return info


def default_out_indices(model: FamilyModel) -> tuple[int, ...]:
    """timm's defaults: every stage of a pyramid model; the last three blocks of a token model."""
    count = len(model.feature_info)
    return tuple(range(count)) if model.intermediates == "pyramid" else tuple(range(max(0, count - 3), count))


class FeatureExtractor(nn.Module):
    """A family model whose forward returns the (B, C, H, W) maps of ``out_indices`` (blocks or stages, negative
    counted from the end), shallow to deep; ``feature_info`` lists just those. The classifier is removed."""

    def __init__(self, model: FamilyModel, out_indices: Sequence[int] | None = None):
        super().__init__()
        count = len(model.feature_info)
        indices = default_out_indices(model) if out_indices is None else out_indices
        self.out_indices = tuple(select_indices(list(indices), count, "feature"))
        model.reset_classifier(0)
        self.model = model
        self.feature_info = [model.feature_info[i] for i in self.out_indices]
        self.data_cfg, self.variant_name = model.data_cfg, model.variant_name

    def forward(self, x: Tensor) -> list[Tensor]:
        outs = self.model.forward_intermediates(x, indices=list(self.out_indices))
        if self.model.intermediates == "pyramid":
            return outs
        return [self.model.feature_map(o, x.shape[-2:]) for o in outs]  # (B, D, h, w) each


def _checkpointed(forward, module: nn.Module, *args, **kwargs):
    """The block's forward, recomputed in the backward pass instead of keeping its activations (while training
    with gradients); the random state is replayed, so dropout and drop-path draw the same masks."""
    if module.training and torch.is_grad_enabled():
        return checkpoint(forward, module, *args, use_reentrant=False, **kwargs)
    return forward(module, *args, **kwargs)


def set_grad_checkpointing(model: FamilyModel, enable: bool = True) -> None:
    """Checkpoint every block of ``model.named_blocks()`` (or stop). The blocks keep their names and state dict
    keys: the checkpointed forward is an attribute of the block instance."""
    for _, block in model.named_blocks():
        if enable:
            block.forward = functools.partial(_checkpointed, type(block).forward, block)
        else:
            block.__dict__.pop("forward", None)
