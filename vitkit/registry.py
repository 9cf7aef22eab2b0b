"""The model registry: variant name → (family, model class, config defaults, preprocessing), and ``create_model``.

Variants are plain data registered by each family file (``register_family``). ``create_model`` validates overrides
against the family's config dataclass before anything is built, reads a ``pretrained`` checkpoint in any supported
format, lets the checkpoint fill in what it implies (e.g. tanh-GELU for JAX files, the head size), builds the model and
loads the converted weights through the family's ``load_pretrained_state``.
"""
from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import logging
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import nn

from vitkit.config import ConfigError, from_dict, to_dict

__all__ = ["PreprocessConfig", "WeightSpec", "ModelSpec", "register_family", "list_models", "get_spec",
           "create_model", "IMAGENET_MEAN", "IMAGENET_STD", "INCEPTION_MEAN", "INCEPTION_STD"]

log = logging.getLogger(__name__)

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
    channel_order: Literal["RGB", "BGR"] = "RGB"
    label_set: str | None = "imagenet-1k"  # names of the head's classes when the checkpoint carries none

    def with_size(self, img_size: int | tuple[int, int]) -> "PreprocessConfig":
        h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
        return dataclasses.replace(self, input_size=(self.input_size[0], int(h), int(w)))


@dataclass(frozen=True)
class WeightSpec:
    """A variant's default public weights: where to download them and how to check them."""

    url: str  # an https URL, or "hf-hub:owner/repo" for a Hugging Face Hub repository
    source_format: str  # timm | official | hf | jax | vitkit
    sha256: str | None = None  # full hash when known; else the hash prefix of the release file name is checked
    filename: str | None = None  # file inside a Hub repository
    num_classes: int = 1000
    notes: str = ""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str
    model_cls: type
    config: dict[str, Any]
    data_cfg: PreprocessConfig = PreprocessConfig()
    weights: WeightSpec | None = None
    paper: str = ""


_REGISTRY: dict[str, ModelSpec] = {}
_FAMILY_MODULES = ("vit", "deit")
_loaded = False


def register_family(family: str, model_cls: type, variants: dict[str, dict[str, Any]],
                    data_cfgs: dict[str, PreprocessConfig], weights: dict[str, WeightSpec] | None = None,
                    paper: str = "") -> None:
    """Register every ``name → config overrides`` of a family table. Configs are validated now, not at build time."""
    for name, cfg in variants.items():
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        from_dict(model_cls.config_cls, dict(cfg), where=name)  # fail at import on a bad table entry
        data_cfg = data_cfgs[name].with_size(cfg.get("img_size", 224))
        _REGISTRY[name] = ModelSpec(name, family, model_cls, dict(cfg), data_cfg,
                                    (weights or _catalog()).get(name), paper)


def _catalog() -> dict[str, WeightSpec]:
    from vitkit.weights.catalog import WEIGHTS
    return WEIGHTS


def _ensure_loaded() -> None:
    global _loaded
    if not _loaded:
        import importlib
        for mod in _FAMILY_MODULES:
            importlib.import_module(f"vitkit.models.{mod}")
        _loaded = True


def list_models(pattern: str = "*") -> list[str]:
    """Registered variant names matching a shell-style ``pattern`` (e.g. ``"deit*"``), sorted."""
    _ensure_loaded()
    return sorted(n for n in _REGISTRY if fnmatch.fnmatchcase(n, pattern))


# Families being added (DESIGN.md), by the prefix of their timm-style names: a name of one of them that is not
# registered is "not in vitkit yet", not a misspelt ViT.
_COMING = {"swin": "Swin", "pvt": "PVT", "cvt": "CvT", "dat": "DAT", "beit": "BEiT", "cct": "CCT", "t2t": "T2T-ViT",
           "mobilevit": "MobileViT"}


def _coming_family(name: str) -> str | None:
    for prefix, label in _COMING.items():
        if name.lower().startswith(prefix) and not any(n.startswith(prefix) for n in _REGISTRY):
            return label
    return None


def get_spec(name: str) -> ModelSpec:
    _ensure_loaded()
    if name not in _REGISTRY:
        coming = _coming_family(name)
        if coming:
            raise ValueError(f"unknown model {name!r}: the {coming} family is not in vitkit yet (registered families: "
                             f"{', '.join(sorted({s.family for s in _REGISTRY.values()}))}; `vitkit models` lists "
                             f"the variants)")
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; `vitkit models` lists them"
        raise ValueError(f"unknown model {name!r}{hint}")
    return _REGISTRY[name]


def _check_overrides(spec: ModelSpec, overrides: dict[str, Any]) -> None:
    fields = {f.name for f in dataclasses.fields(spec.model_cls.config_cls)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ConfigError(f"unknown argument{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} for {spec.name} "
                          f"(valid: {', '.join(sorted(fields))})")


def create_model(name: str, pretrained: str | bool | None = None, num_classes: int | None = None,
                 img_size: int | tuple[int, int] | None = None, **overrides: Any) -> nn.Module:
    """Build a registered variant, optionally loading weights from a checkpoint in any supported format.

    ``num_classes`` different from the checkpoint's head gives a new zero-initialised head (the ViT paper's
    fine-tuning); ``img_size`` different from the checkpoint's resamples the position embeddings. Every such change is
    logged and kept in ``model.load_report``.
    """
    spec = get_spec(name)
    _check_overrides(spec, overrides)
    explicit = dict(overrides)
    if num_classes is not None:
        explicit["num_classes"] = num_classes
    if img_size is not None:
        explicit["img_size"] = img_size
    loaded = None
    if pretrained is True:
        from vitkit.weights.hub import resolve_pretrained
        pretrained = resolve_pretrained(spec)
    if pretrained:
        from vitkit.weights import read_checkpoint
        loaded = read_checkpoint(pretrained, spec)
    hints = {k: v for k, v in (loaded.config_hints if loaded else {}).items() if k not in explicit}
    if "num_classes" in explicit and loaded and loaded.config_hints.get("num_classes") != explicit["num_classes"]:
        hints.pop("representation_size", None)  # a new task replaces the whole pre-training head (App. B.1.1)
    cfg = from_dict(spec.model_cls.config_cls, {**spec.config, **hints, **explicit}, where=name)
    model = spec.model_cls(cfg)
    model.variant_name = name
    model.data_cfg = spec.data_cfg.with_size(cfg.img_size) if hasattr(cfg, "img_size") else spec.data_cfg
    model.class_names = None
    model.load_report = None
    if loaded is not None:
        _load_into(model, loaded, hints, spec)
    return model


def _load_into(model: nn.Module, loaded: Any, hints: dict[str, Any], spec: ModelSpec) -> None:
    from vitkit.weights.adapt import finish_load
    report = loaded.report
    if report.format == "vitkit":  # the whole architecture comes back: name only what differs from the variant
        default = from_dict(spec.model_cls.config_cls, dict(spec.config), where=spec.name)
        changed = [f"{k}={getattr(model.cfg, k)!r}" for k in hints
                   if hasattr(default, k) and getattr(model.cfg, k) != getattr(default, k)]
        report.notes.append("architecture restored from config.json"
                            + (f": {', '.join(changed)}" if changed else " (the variant's defaults)"))
    else:
        for k, v in hints.items():
            report.notes.append(f"config {k}={v!r} taken from the checkpoint")
    finish_load(model, loaded.state_dict, report)
    if loaded.class_names and len(loaded.class_names) == getattr(model, "num_classes", -1):
        model.class_names = list(loaded.class_names)
    if loaded.data_cfg:
        model.data_cfg = dataclasses.replace(model.data_cfg, **loaded.data_cfg)
    model.load_report = report
    log.info("%s", report.summary())


def model_config_dict(model: nn.Module) -> dict[str, Any]:
    """The full architecture config of a built model, as plain data (written into vitkit's config.json)."""
    return to_dict(model.cfg)
