"""The family contract: what every vitkit model offers, declared once and checked when a family registers.

Every family's model class derives from ``FamilyModel`` and implements its abstract methods; ``check_contract`` (run by
``register_family``) refuses a class that lacks one, so optimiser, task, benchmark and explanation code can call them
without ``hasattr`` fallbacks. The helpers below are shared by the families: ``select_indices`` (which blocks or stages
``forward_intermediates`` returns), ``staged_layer_id`` (layer-wise learning-rate decay for staged models) and
``zero_init_`` (the ViT paper's zero-initialised classifier, App. B.1.1).
"""
from __future__ import annotations

import abc
import dataclasses
import inspect
from typing import Any, Callable, ClassVar, Literal, Sequence

import torch
from torch import Tensor, nn

__all__ = ["FamilyModel", "LinearHead", "check_contract", "select_indices", "staged_layer_id", "block_layer_id",
           "collect_blocks", "zero_init_", "check_input"]


class FamilyModel(nn.Module, metaclass=abc.ABCMeta):
    """Base class of every vitkit model.

    ``forward(x) = forward_head(forward_features(x))`` for ``x`` of shape (B, C, H, W). ``create_model`` sets
    ``variant_name``, ``data_cfg`` (what the weights expect as input), ``class_names`` and ``load_report``.
    """

    config_cls: ClassVar[type]  # the family's config dataclass (must have img_size, in_chans and num_classes)
    #: what ``forward_intermediates`` returns: per-block token sequences (plain models) or per-stage (B, C, H, W) maps
    intermediates: ClassVar[Literal["tokens", "pyramid"]]

    cfg: Any
    num_classes: int

    # ------------------------------------------------------------------------------------------------ forward
    def forward(self, x: Tensor) -> Tensor:
        check_input(x, self.cfg.in_chans)
        return self.forward_head(self.forward_features(x))

    @abc.abstractmethod
    def forward_features(self, x: Tensor) -> Tensor:
        """(B, C, H, W) images → the features before pooling: (B, N, D) tokens or a (B, D, h, w) / (B, h, w, D) map."""

    @abc.abstractmethod
    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Pool the output of ``forward_features`` and classify it; ``pre_logits=True`` returns the classifier's input
        (B, num_features)."""

    @abc.abstractmethod
    def forward_intermediates(self, x: Tensor, indices: int | Sequence[int] | None = None,
                              norm: bool = False) -> list[Tensor]:
        """Outputs of chosen blocks (``intermediates == "tokens"``: (B, N, D) each) or stages (``"pyramid"``:
        (B, C_i, H_i, W_i) each). ``indices``: an int n = the last n, a list = those (negative allowed), None = all.
        ``select_indices`` validates them."""

    # ---------------------------------------------------------------------------------------------- the head
    @abc.abstractmethod
    def classifiers(self) -> list[nn.Linear]:
        """The classifier layers (one, or two for distilled DeiT); empty when the model has no head."""

    @abc.abstractmethod
    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier(s) by zero-initialised ones for ``num_classes`` classes (0 removes them)."""

    # -------------------------------------------------------------------------------------------- optimisation
    @abc.abstractmethod
    def no_weight_decay(self) -> set[str]:
        """Parameter names (full, or the last dotted component) excluded from weight decay besides 1-d tensors."""

    @abc.abstractmethod
    def layer_id(self, param_name: str) -> int:
        """The depth index of a parameter for layer-wise learning-rate decay: 0 = embeddings … ``num_layer_ids - 1`` =
        final norm and head (BEiT's convention; ``staged_layer_id`` for staged models)."""

    @property
    @abc.abstractmethod
    def num_layer_ids(self) -> int:
        """1 + the largest ``layer_id``."""

    # ------------------------------------------------------------------------------------------ weight loading
    @abc.abstractmethod
    def load_pretrained_state(self, state: dict[str, Tensor], report: Any) -> dict[str, Tensor]:
        """Adapt a state dict already in this family's vitkit layout to this model (resize position embeddings and
        bias tables for another input size, replace a classifier of another size, check computed buffers), noting
        every change in ``report``; the loader then checks the result strictly."""


class LinearHead:
    """The classifier part of the contract for a model with one linear head ``self.head`` on ``self.num_features``
    (an ``nn.Identity`` when ``num_classes`` is 0); mixed into a ``FamilyModel`` subclass."""

    def _make_head(self, num_classes: int) -> nn.Module:
        return nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def classifiers(self) -> list[nn.Linear]:
        return [self.head] if isinstance(self.head, nn.Linear) else []

    def reset_classifier(self, num_classes: int) -> None:
        """A new zero-initialised classifier (ViT paper App. B.1.1); 0 removes it."""
        self.num_classes = self.cfg.num_classes = num_classes
        self.head = self._make_head(num_classes)
        zero_init_(*self.classifiers())


def check_contract(model_cls: type) -> None:
    """Raise ``TypeError`` naming whatever part of the family contract ``model_cls`` lacks."""
    if not (isinstance(model_cls, type) and issubclass(model_cls, FamilyModel)):
        raise TypeError(f"{model_cls!r} must derive from vitkit.models.base.FamilyModel")
    problems = [f"{name}() is not implemented" for name in sorted(getattr(model_cls, "__abstractmethods__", ()))]
    cfg_cls = getattr(model_cls, "config_cls", None)
    if cfg_cls is None or not dataclasses.is_dataclass(cfg_cls):
        problems.append("config_cls is not a dataclass")
    else:
        fields = {f.name for f in dataclasses.fields(cfg_cls)}
        problems += [f"config_cls {cfg_cls.__name__} has no {f!r} field" for f in ("img_size", "in_chans",
                                                                                     "num_classes") if f not in fields]
    if getattr(model_cls, "intermediates", None) not in ("tokens", "pyramid"):
        problems.append("intermediates must be 'tokens' or 'pyramid'")
    signature = inspect.signature(model_cls.forward_head)
    if "pre_logits" not in signature.parameters:
        problems.append("forward_head() takes no pre_logits argument")
    if problems:
        raise TypeError(f"{model_cls.__name__} does not meet the family contract: {'; '.join(problems)}")


# ------------------------------------------------------------------------------------------------------ helpers
def check_input(x: Any, in_chans: int) -> None:
    """A model takes a (B, C, H, W) float tensor; anything else is a ValueError that says so."""
    if not isinstance(x, Tensor):
        raise ValueError(f"expected a (B, {in_chans}, H, W) tensor, got {type(x).__name__}")
    if x.ndim != 4 or x.shape[1] != in_chans:
        hint = " (add a batch dimension: x.unsqueeze(0))" if x.ndim == 3 and x.shape[0] == in_chans else ""
        raise ValueError(f"expected a (B, {in_chans}, H, W) tensor, got shape {tuple(x.shape)}{hint}")
    if not x.is_floating_point():
        raise ValueError(f"expected a floating-point tensor, got {x.dtype} (normalise the images first)")


def select_indices(indices: int | Sequence[int] | None, count: int, what: str = "block") -> list[int]:
    """Validated, sorted, non-negative indices into ``count`` blocks or stages: an int n = the last n, a sequence =
    those (negative counts from the end), None = all."""
    if indices is None:
        return list(range(count))
    if isinstance(indices, int):
        if not 1 <= indices <= count:
            raise ValueError(f"indices={indices}: ask for the last 1..{count} {what}s")
        return list(range(count - indices, count))
    indices = list(indices)
    bad = [i for i in indices if not -count <= i < count]
    if bad or not indices:
        raise ValueError(f"{what} indices {bad or indices} out of range for {count} {what}s (-{count}..{count - 1})")
    return sorted({i % count for i in indices})


def collect_blocks(blocks: Sequence[nn.Module], x: Tensor, indices: int | Sequence[int] | None,
                   finish: Callable[[Tensor], Tensor]) -> list[Tensor]:
    """``forward_intermediates`` of a plain model: run ``blocks`` on the embedded tokens ``x`` up to the last block
    ``indices`` selects (``select_indices``) and return ``finish(output)`` of each selected block."""
    wanted = select_indices(indices, len(blocks))
    outs = []
    for i, blk in enumerate(blocks[: wanted[-1] + 1]):
        x = blk(x)
        if i in wanted:
            outs.append(finish(x))
    return outs


def staged_layer_id(depths: Sequence[int], stage: int | None, block: int | None = None) -> int:
    """Layer id of a parameter of a staged (hierarchical) model, for layer-wise learning-rate decay.

    Follows Swin's fine-tuning code (microsoft/SimMIM ``optimizer.py: get_swin_layer``), which numbers the blocks of
    all stages consecutively from 1 (0 = patch embedding):
    - ``stage=None``: the stem / patch embedding → 0; ``stage=len(depths)``: final norm and head → sum(depths) + 1;
    - block ``j`` of stage ``i`` → sum(depths[:i]) + j + 1;
    - ``block=None`` inside stage ``i`` ≥ 1: the downsampling layer that feeds stage ``i`` (patch merging) →
      sum(depths[:i]), the value get_swin_layer gives ``layers.{i-1}.downsample`` (it sits between the two stages,
      one step below the first block it feeds).
    """
    if stage is None:
        return 0
    if stage >= len(depths):
        return sum(depths) + 1
    if block is None:
        return sum(depths[:stage])
    return sum(depths[:stage]) + block + 1


def block_layer_id(param_name: str, depth: int, embed_prefixes: tuple[str, ...]) -> int:
    """Layer id of a parameter of a plain (one-stage) model whose blocks are ``blocks.{i}``: 0 for names starting with
    one of ``embed_prefixes`` (patch embedding, tokens, position table), i + 1 for block i, depth + 1 for the rest
    (final norm, pooling, head): BEiT's layer-decay numbering."""
    if param_name.startswith(embed_prefixes):
        return 0
    if param_name.startswith("blocks."):
        return int(param_name.split(".")[1]) + 1
    return depth + 1


def zero_init_(*layers: nn.Module) -> None:
    """Zero the weight and bias of each Linear (the ViT paper's zero-initialised classifier, App. B.1.1)."""
    with torch.no_grad():
        for layer in layers:
            if isinstance(layer, nn.Linear):
                layer.weight.zero_()
                if layer.bias is not None:
                    layer.bias.zero_()
