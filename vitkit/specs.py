"""Plain data describing registered models: what their weights expect as input, where their public weights live, which
checkpoint formats a family reads, and the registry entry that ties them together.

A leaf module: it imports nothing from vitkit but the config helpers, so the registry, the weight loaders and the
family files can all depend on it without import cycles.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Literal, Mapping

if TYPE_CHECKING:  # only for annotations
    from torch import Tensor, nn

__all__ = ["PreprocessConfig", "WeightSpec", "SourceFormat", "Reference", "ModelSpec", "CheckpointView", "ResizeRule",
           "IMAGENET_MEAN", "IMAGENET_STD", "INCEPTION_MEAN", "INCEPTION_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_MEAN = (0.5, 0.5, 0.5)  # Google's ViT checkpoints: pixels scaled to [-1, 1]
INCEPTION_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class PreprocessConfig:
    """What the model's weights expect as input (timm's pretrained_cfg data fields)."""

    input_size: tuple[int, int, int] = (3, 224, 224)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: Literal["bicubic", "bilinear", "nearest"] = "bicubic"
    crop_pct: float = 0.875  # eval: resize the short side to size / crop_pct, then centre-crop
    # eval resize (timm's crop_mode): "center" keeps the aspect ratio (the short side to size / crop_pct), "squash"
    # resizes both sides to size / crop_pct, aspect not kept (e.g. CvT's and Swin's 384 evaluations), then the crop
    crop_mode: Literal["center", "squash"] = "center"
    channel_order: Literal["RGB", "BGR"] = "RGB"  # MobileViT's official weights expect BGR
    label_set: str | None = "imagenet-1k"  # names of the head's classes when the checkpoint carries none

    def with_size(self, img_size: int | tuple[int, int]) -> "PreprocessConfig":
        h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
        return dataclasses.replace(self, input_size=(self.input_size[0], int(h), int(w)))


@dataclass(frozen=True)
class WeightSpec:
    """A variant's default public weights: where to download them and how to check them."""

    url: str  # an https URL, or "hf-hub:owner/repo" for a Hugging Face Hub repository
    source_format: str  # a format name the family registers: official | timm | hf | jax
    # full hash when published; else the hash prefix of the release file name is checked; with neither, the hash of
    # the first download is recorded beside the file and checked on every later use (vitkit.weights.hub)
    sha256: str | None = None
    filename: str | None = None  # file inside a Hub repository; for a URL, the cache name (default: the URL's)
    num_classes: int = 1000
    notes: str = ""
    # the container entry to load from a release file holding several state dicts (T2T-ViT's "state_dict_ema");
    # None: the file holds one, or ``vitkit.weights.unwrap``'s default choice is the released one
    checkpoint_key: str | None = None


@dataclass(frozen=True)
class CheckpointView:
    """What a format detector may look at: the tensors' names and shapes, the container and a folder's config."""

    keys: frozenset[str]
    shapes: Mapping[str, tuple[int, ...]]
    kind: str  # safetensors | torch | npz | folder
    container: str = ""  # the release wrapper the state dict came out of, e.g. "model" or "state_dict_ema"
    config: Mapping[str, Any] | None = None  # a transformers folder's config.json

    def has(self, *keys: str) -> bool:
        return all(k in self.keys for k in keys)

    def any_startswith(self, *prefixes: str) -> bool:
        return any(k.startswith(prefixes) for k in self.keys)

    @property
    def model_type(self) -> str | None:
        return (self.config or {}).get("model_type")


@dataclass(frozen=True)
class SourceFormat:
    """One public checkpoint format of a family, owned by the family's converter module.

    ``detect`` recognises it from a ``CheckpointView`` (key signature, container, config.json); ``convert`` is the pure
    ``state_dict → state_dict`` function into the family's vitkit layout; ``hints`` reads architecture hints the
    checkpoint implies (head size, activation, …); ``infer`` names a registered variant for a checkpoint that
    describes its own architecture (``vitkit convert`` without ``--model``); ``twin`` builds the source library's own
    model with a vitkit model's weights (transformers, for parity tests and ``bench --compare``); ``data_cfg`` holds
    the ``PreprocessConfig`` fields the weights of this source expect when they differ between sources of one family
    (MobileViT: BGR for the official files, RGB for timm's port); loading replaces the variant's and reports it.
    """

    name: str  # official | timm | hf | jax
    detect: Callable[[CheckpointView], bool]
    convert: Callable[[dict[str, Any], Any], dict[str, "Tensor"]]  # (state, LoadReport) → vitkit state
    hints: Callable[[dict[str, Any], Mapping[str, Any] | None], dict[str, Any]] = lambda state, config: {}
    infer: Callable[[CheckpointView], tuple[str, dict[str, Any]] | None] | None = None
    twin: Callable[["nn.Module"], "nn.Module"] | None = None
    description: str = ""
    data_cfg: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ResizeRule:
    """How a family fits position tables to another input size when it loads weights of one source (a format name,
    or ``format/origin`` when the converter names the code that wrote the file, e.g. ``jax/big_vision``): the way
    that source's own code does it, named in the load report.

    ``pos_embed``: a scheme of ``vitkit.layers.pos_embed.POS_EMBED_RESIZES`` for the absolute table; ``source``: the
    official file@commit it follows; ``rel_pos``: the relative-position table method
    (``vitkit.layers.pos_embed_rel.RESIZE_METHODS``), None for a family without such tables; ``rel_pos_source``: its
    file@commit."""

    pos_embed: str
    source: str
    rel_pos: str | None = None
    rel_pos_source: str = ""


@dataclass(frozen=True)
class Reference:
    """Published size of a variant: parameters (millions, 1000-class head) and forward GMACs at its native
    resolution (the papers' "GFLOPs"), with where the numbers come from."""

    params_m: float
    gmacs: float
    source: str
    params_tol: float = 0.006  # absolute, in millions: tables print two decimals
    macs_rtol: float = 0.01  # papers' "FLOPs" agree with counted MACs to about 1% (their rounding)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str
    model_cls: type
    config: dict[str, Any]
    data_cfg: PreprocessConfig = PreprocessConfig()
    weights: WeightSpec | None = None
    paper: str = ""
    formats: tuple[SourceFormat, ...] = ()
    reference: Reference | None = None
    tiny: dict[str, Any] = field(default_factory=dict)  # overrides for a fast forward/backward of this variant
    # training-recipe values the family's official fine-tuning uses, in recipe-section layout, e.g.
    # {"optim": {"layer_decay": 0.65}}; a recipe that sets a key itself wins (vitkit.train.config.resolve)
    train_defaults: dict[str, Any] = field(default_factory=dict)
    # source (format name, or format/origin) → how its position tables are resized for another input size
    resize: Mapping[str, ResizeRule] = field(default_factory=dict)
    # schemes a user may pick instead with create_model(pos_embed_resize=); empty: the family offers no choice
    resize_choices: tuple[str, ...] = ()

    def format(self, name: str) -> SourceFormat | None:
        return next((f for f in self.formats if f.name == name), None)
