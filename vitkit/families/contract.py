"""The family contract: what every vitkit model offers, and the ``Family`` declaration each family folder makes.

Every family's model class derives from ``FamilyModel`` and implements its abstract methods; ``check_contract`` (run
when the registry reads a family's declaration) refuses a class that lacks one, so optimiser, task, benchmark and
explanation code can call them without ``hasattr`` fallbacks. What only some families have is an optional capability
with a neutral default here (``set_distilled_training``, ``sampling_points``, ``accepts_any_size``,
``mim_vocab_size`` / ``masked_token_logits``, ``convolutional``), so shared code never asks which family it holds.
The helpers below are shared by the families: ``select_indices`` (which blocks or stages ``forward_intermediates``
returns), ``staged_layer_id`` (layer-wise learning-rate decay for staged models), ``StagedBlocks`` (the blocks of
staged models) and ``zero_init_`` (the ViT paper's zero-initialised classifier, App. B.1.1).
"""
from __future__ import annotations

import abc
import dataclasses
import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Literal, Mapping, Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor, nn

from vitkit.layers.patch_embed import check_image_batch
from vitkit.specs import PreprocessConfig, Reference, ResizeRule, SourceFormat, WeightSpec

__all__ = ["Classifier", "Family", "FamilyModel", "LinearHead", "StagedBlocks", "check_contract", "select_indices",
           "staged_layer_id", "block_layer_id", "block_outputs", "zero_init_", "trunc_normal_linears_", "check_input",
           "token_grid", "tokens_to_map"]


@runtime_checkable
class Classifier(Protocol):
    """What evaluation, prediction, benchmarking and export read of a model: a family model (``FamilyModel``) and an
    exported runtime model (``vitkit.deploy.RuntimeModel``) both have it, so shared code needs no fallbacks."""

    variant_name: str | None  # the registered name it was built as (None: built by hand)
    class_names: list[str] | None  # one per output, when the checkpoint names them
    num_classes: int  # 0 = no head
    data_cfg: PreprocessConfig  # the input the weights expect
    accepts_any_size: bool

    def __call__(self, x: Tensor) -> Tensor: ...


class FamilyModel(nn.Module, metaclass=abc.ABCMeta):
    """Base class of every vitkit model.

    ``forward(x) = forward_head(forward_features(x))`` for ``x`` of shape (B, C, H, W). ``create_model`` sets
    ``variant_name``, ``data_cfg`` (what the weights expect as input), ``class_names`` and ``load_report``.
    """

    config_cls: ClassVar[type]  # the family's config dataclass (must have img_size, in_chans and num_classes)
    #: what ``forward_intermediates`` returns: per-block token sequences (plain models) or per-stage (B, C, H, W) maps
    intermediates: ClassVar[Literal["tokens", "pyramid"]]

    #: export formats (vitkit.deploy) this family cannot produce yet → why; ``vitkit export`` refuses them by name
    unsupported_exports: ClassVar[dict[str, str]] = {}

    #: tokens before the patch grid in ``forward_features``' sequence (class, distillation); token models set it
    num_prefix_tokens: int = 0

    #: state-dict keys of the weights that see the input channels (a stem convolution, or a linear layer over
    #: unfolded patches): a checkpoint for another ``in_chans`` is fitted to them (``weights.adapt``)
    input_weights: ClassVar[tuple[str, ...]] = ()
    #: why the input layers of a checkpoint cannot be fitted to another ``in_chans``, for a family where they cannot
    #: (None: ``input_weights`` are fitted); loading such a checkpoint for another ``in_chans`` is then refused
    fixed_input_channels: ClassVar[str | None] = None
    #: True when convolutions whose windows overlap (kernel larger than stride) run beyond a patchify stem: in the
    #: blocks, a convolutional tokenizer or stem, a CNN backbone. Their cost depends on the memory format, so
    #: ``train.channels_last`` (NHWC weights and inputs, PyTorch's "Channels Last Memory Format" tutorial) is for
    #: them; False: at most patchify convolutions (kernel = stride, a linear map of each patch)
    convolutional: ClassVar[bool] = False

    cfg: Any
    num_classes: int
    # set by create_model; the defaults describe a model built by hand from its config
    variant_name: str | None = None
    class_names: list[str] | None = None
    data_cfg: PreprocessConfig = PreprocessConfig()
    load_report: Any = None

    # ------------------------------------------------------------------------------------------------ forward
    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Logits (B, num_classes); with a (B, N) boolean ``mask`` over the patches, the masked-image-modelling
        logits at the masked positions (``masked_token_logits``), so wrappers (DDP, ``torch.compile``) see one
        forward."""
        check_input(x, self.cfg.in_chans)
        if mask is not None:
            return self.masked_token_logits(x, mask)
        return self.forward_head(self.forward_features(x))

    @abc.abstractmethod
    def forward_features(self, x: Tensor) -> Tensor:
        """(B, C, H, W) images → the features before pooling, in every family (B, prefix + h·w, D) tokens: the prefix
        tokens (``num_prefix_tokens``: class, distillation) first, then the last grid's positions in row-major order
        (a pyramid model's last-stage map, flattened). ``feature_map`` lays them out as (B, D, h, w)."""

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

    # ------------------------------------------------------------------------------------------- explanations
    def readout_weights(self, features: Tensor) -> Tensor | None:
        """(B, N) weights over the tokens of ``forward_features`` that the head reads, for attention rollout and
        relevance; None for pyramid models (no token read-out). Default: the first token (a class token). Families
        that pool otherwise (mean pooling, CCT's sequence pooling, DeiT's two tokens) override it."""
        if self.intermediates == "pyramid":
            return None
        weights = features.new_zeros(features.shape[:2])  # (B, N)
        weights[:, 0] = 1.0
        return weights

    def patch_embedding_filters(self) -> Tensor | None:
        """(D, C, P, P) filters of a linear patch embedding (the ViT paper's Figure 7, left); None for a model without
        one (convolutional stems, soft splits, hierarchical models)."""
        return None

    def position_embedding_grid(self) -> tuple[Tensor, tuple[int, int]] | None:
        """The learned absolute position embeddings of the patch grid, (h·w, D), and the grid (h, w) (Figure 7,
        centre); None for a model without them."""
        return None

    def feature_map(self, features: Tensor, image_hw: tuple[int, int]) -> Tensor:
        """The output of ``forward_features`` for an ``image_hw`` input as a (B, C, h, w) map of its spatial tokens
        (prefix tokens dropped; a view, so gradients flow), for Grad-CAM and feature extraction. A family whose
        grid cannot be told from the token count and the image's aspect ratio overrides it."""
        return tokens_to_map(features, self.num_prefix_tokens, image_hw)

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


    # ------------------------------------------------------------------------------------------------ backbone
    @abc.abstractmethod
    def named_blocks(self) -> list[tuple[str, nn.Module]]:
        """(name, module) of the repeated residual units in forward order: the unit of activation checkpointing
        (``set_grad_checkpointing``) and of sharding (FSDP wraps each)."""

    def feature_names(self) -> list[str]:
        """The module name of each output of ``forward_intermediates`` (``feature_info``'s ``module``): the blocks
        of a token model; a pyramid model names its stages."""
        if self.intermediates == "pyramid":
            raise NotImplementedError(f"{type(self).__name__} must name its stages (feature_names)")
        return [name for name, _ in self.named_blocks()]

    @property
    def feature_info(self) -> list[dict[str, Any]]:
        """Per block (token models) or stage (pyramid models): ``num_chs``, ``reduction``, ``module``, ``index``, as
        timm's ``feature_info`` (``vitkit.families.backbone``)."""
        if "_feature_info" not in self.__dict__:
            from vitkit.families.backbone import feature_info
            self.__dict__["_feature_info"] = feature_info(self)
        return self.__dict__["_feature_info"]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of storing them (``named_blocks``): equal
        gradients, lower peak memory."""
        from vitkit.families.backbone import set_grad_checkpointing
        set_grad_checkpointing(self, enable)

    # ------------------------------------------------------------------------------------ optional capabilities
    def set_distilled_training(self, enable: bool = True) -> bool:
        """Make a training-mode forward return (class-head logits, distillation-head logits), the two outputs DeiT's
        hard or soft distillation trains (Touvron et al. 2021 §4); True when the model has a distillation head and
        did so. Default: one head, False: a distillation task then uses the one output for both terms."""
        return False

    def sampling_points(self, x: Tensor) -> dict[str, dict[str, Tensor]]:
        """Per layer that samples its keys at learned positions: ``{"pixels": (B, groups, Hk, Wk, 2),
        "reference_pixels": ...}`` in input pixels (x, y), for ``x``; empty for models whose keys sit on a fixed
        grid (the default)."""
        return {}

    @property
    def accepts_any_size(self) -> bool:
        """True when ``forward`` takes inputs of another size than ``cfg.img_size`` (tables resampled at forward
        time); False (the default) when another size needs a model built for it."""
        return False

    @property
    def mim_vocab_size(self) -> int:
        """The number of visual tokens the masked-image-modelling head predicts (``masked_token_logits``); 0 (the
        default): the model has no such head."""
        return 0

    def masked_token_logits(self, x: Tensor, mask: Tensor) -> Tensor:
        """Masked image modelling: (B, C, H, W) images and a (B, N) bool ``mask`` over the N patch positions
        (row-major, the order of ``forward_features``' tokens after the prefix) → (M, ``mim_vocab_size``) logits of
        the M masked positions, in the order ``features[mask]`` takes them (image by image, row-major). The masked
        patches' embeddings are replaced by a learned mask token before the encoder. Default: no such head, a
        one-line ValueError."""
        raise ValueError(f"{type(self).__name__} has no masked-image-modelling head (mim_vocab_size is 0)")


class StagedBlocks:
    """``named_blocks`` and ``feature_names`` of a staged model whose stages are ``self.<stages_attr>[i]``, each
    holding its ``blocks``: list it before ``FamilyModel``, as ``MyModel(StagedBlocks, LinearHead, FamilyModel)``."""

    stages_attr: ClassVar[str] = "stages"

    def named_blocks(self) -> list[tuple[str, nn.Module]]:
        stages = getattr(self, self.stages_attr)
        return [(f"{self.stages_attr}.{i}.blocks.{j}", blk) for i, stage in enumerate(stages)
                for j, blk in enumerate(stage.blocks)]

    def feature_names(self) -> list[str]:
        return [f"{self.stages_attr}.{i}" for i in range(len(getattr(self, self.stages_attr)))]


class LinearHead:
    """The head of a ``FamilyModel`` whose classifier is one ``nn.Linear`` ``self.head`` on ``self.num_features``
    (``nn.Identity`` when there are no classes): list it as ``MyModel(LinearHead, FamilyModel)``."""

    head: nn.Module
    num_features: int

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
        raise TypeError(f"{model_cls!r} must derive from vitkit.families.contract.FamilyModel")
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
    check_image_batch(x, in_chans)


def tokens_to_map(tokens: Tensor, prefix: int, image_hw: tuple[int, int]) -> Tensor:
    """(B, prefix + h·w, C) tokens → (B, C, h, w): the spatial tokens on the grid the image's aspect ratio implies."""
    patches = tokens[:, prefix:]  # (B, h·w, C)
    h, w = token_grid(patches.shape[1], image_hw)
    return patches.transpose(1, 2).reshape(tokens.shape[0], -1, h, w)  # (B, C, h, w)


def token_grid(num_patches: int, image_hw: tuple[int, int]) -> tuple[int, int]:
    """The (h, w) grid of ``num_patches`` tokens laid over an H×W image (its aspect ratio decides a non-square one)."""
    H, W = image_hw
    h = round(math.sqrt(num_patches * H / W))
    for cand in sorted({h, h - 1, h + 1}, key=lambda c: abs(c - h)):
        if cand > 0 and num_patches % cand == 0:
            return cand, num_patches // cand
    raise ValueError(f"{num_patches} tokens do not form a grid over a {H}x{W} image")


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


def block_outputs(blocks: Sequence[nn.Module], x: Tensor, wanted: list[int], *args) -> list[Tensor]:
    """The outputs of blocks ``wanted`` (sorted indices, from ``select_indices``) of a chain of blocks run on ``x``
    (each also given ``args``, e.g. a shared relative-position bias); blocks after the last wanted one are not run."""
    outs = []
    for i, blk in enumerate(blocks[: wanted[-1] + 1]):
        x = blk(x, *args)
        if i in wanted:
            outs.append(x)
    return outs


def block_layer_id(param_name: str, depth: int, embed_prefixes: tuple[str, ...]) -> int:
    """Layer id of a parameter of a plain (one-stage) model for layer-wise learning-rate decay, BEiT's numbering:
    the embeddings (names starting with ``embed_prefixes``) → 0, ``blocks.{i}.*`` → i + 1, the rest (final norm,
    head) → depth + 1."""
    if param_name.startswith(embed_prefixes):
        return 0
    if param_name.startswith("blocks."):
        return int(param_name.split(".")[1]) + 1
    return depth + 1


def trunc_normal_linears_(module: nn.Module, std: float = 0.02) -> None:
    """timm's ViT initialisation of every Linear in ``module``: truncated-normal(std) weights, zero biases."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def zero_init_(*layers: nn.Module) -> None:
    """Zero the weight and bias of each Linear (the ViT paper's zero-initialised classifier, App. B.1.1)."""
    with torch.no_grad():
        for layer in layers:
            if isinstance(layer, nn.Linear):
                layer.weight.zero_()
                if layer.bias is not None:
                    layer.bias.zero_()


# -------------------------------------------------------------------------------------------------- declaration
@dataclass(frozen=True)
class Family:
    """What a family folder declares in its ``__init__.py`` as ``FAMILY``; the registry reads these declarations.

    ``model_cls`` meets the contract above; ``variants``: name → config overrides (plain data, validated when the
    family is read); ``data_cfgs``: per variant (or one for all), sized by the variant's ``img_size``; ``formats``:
    the checkpoint formats the family reads, most specific signature first; ``weights``: variant → named public
    weights; ``references``: variant → published size; ``tiny``: overrides (or ``f(name, config) → overrides``)
    small enough for a forward and backward pass in the test suite; ``train_defaults``: per variant, recipe values
    its official fine-tuning uses; ``resize``: source (format, or ``format/origin``) → how that source's code resizes
    position tables; ``resize_choices``: the schemes ``create_model(pos_embed_resize=)`` may pick instead;
    ``model_classes``: variants built by another class that meets the contract (DeiT's plain variants are ViTs);
    ``parent``: the family whose folder this one builds on (a declared sub-family), if any; ``task_fields``:
    config fields that belong to the pre-training task rather than the trunk (a pre-training head, its pooling):
    a checkpoint loaded for another number of classes does not impose them, the variant's own values hold.
    """

    name: str
    label: str  # how people write it: "Swin", "DAT++"
    paper: str
    model_cls: type
    variants: Mapping[str, dict[str, Any]]
    data_cfgs: Mapping[str, PreprocessConfig] | PreprocessConfig
    formats: tuple[SourceFormat, ...] = ()
    weights: Mapping[str, WeightSpec] = field(default_factory=dict)
    references: Mapping[str, Reference] = field(default_factory=dict)
    tiny: dict[str, Any] | Callable[[str, dict[str, Any]], dict[str, Any]] | None = None
    train_defaults: Mapping[str, dict[str, Any]] = field(default_factory=dict)
    resize: Mapping[str, ResizeRule] = field(default_factory=dict)
    resize_choices: tuple[str, ...] = ()
    model_classes: Mapping[str, type] = field(default_factory=dict)
    parent: str | None = None
    task_fields: tuple[str, ...] = ()

    def model_class(self, variant: str) -> type:
        return self.model_classes.get(variant, self.model_cls)
