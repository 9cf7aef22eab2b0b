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

import contextlib
import functools
from typing import Any, Iterator, Sequence

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


_RUNNING = ("running_mean", "running_var", "num_batches_tracked")


@contextlib.contextmanager
def _batch_statistics_only(module: nn.Module) -> Iterator[None]:
    """While a checkpointed block is recomputed: its BatchNorm layers update copies of their running statistics
    (``running_mean``, ``running_var``, ``num_batches_tracked``), which are dropped afterwards, so the buffers move
    once per forward pass. Training-mode BatchNorm normalises by the batch's own statistics
    (torch/nn/modules/batchnorm.py ``_BatchNorm.forward``), so the recomputed output is the forward's. The buffers
    are swapped rather than withheld (``track_running_stats=False``): ``F.batch_norm`` saves the running statistics
    for its backward, and the recomputation must save what the forward saved."""
    saved = [(m, {k: m._buffers[k] for k in _RUNNING if m._buffers.get(k) is not None})
             for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m, buffers in saved:
        m._buffers.update({k: v.clone() for k, v in buffers.items()})
    try:
        yield
    finally:
        for m, buffers in saved:
            m._buffers.update(buffers)


def _recompute_contexts(module: nn.Module) -> tuple[contextlib.AbstractContextManager,
                                                    contextlib.AbstractContextManager]:
    """``torch.utils.checkpoint``'s ``context_fn``: nothing around the forward pass, ``_batch_statistics_only``
    around the recomputation."""
    return contextlib.nullcontext(), _batch_statistics_only(module)


def _checkpointed(forward, module: nn.Module, *args, **kwargs):
    """The block's forward, recomputed in the backward pass instead of keeping its activations (while training
    with gradients); the random state is replayed, so dropout and drop-path draw the same masks, and BatchNorm
    statistics are updated by the forward pass only (``_batch_statistics_only``). Under ``torch.compile`` the
    recomputation is the compiler's (its ``context_fn`` must be a TorchDispatchMode), so none is passed."""
    if not (module.training and torch.is_grad_enabled()):
        return forward(module, *args, **kwargs)
    if torch.compiler.is_compiling():
        return checkpoint(forward, module, *args, use_reentrant=False, **kwargs)
    return checkpoint(forward, module, *args, use_reentrant=False,
                      context_fn=functools.partial(_recompute_contexts, module), **kwargs)


def set_grad_checkpointing(model: FamilyModel, enable: bool = True) -> None:
    """Checkpoint every block of ``model.named_blocks()`` (or stop). The blocks keep their names and state dict
    keys: the checkpointed forward is an attribute of the block instance."""
    for _, block in model.named_blocks():
        if enable:
            block.forward = functools.partial(_checkpointed, type(block).forward, block)
        else:
            block.__dict__.pop("forward", None)
