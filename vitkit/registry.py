"""The model registry: variant name → family, model class, config, preprocessing, checkpoint formats; ``create_model``;
and vitkit's own model folders (``save_pretrained`` / ``load_model``).

Families are discovered, not listed: every module of ``vitkit.models`` is imported once, and each family module calls
``register_family`` with its variant table (plain data), its data configs, its checkpoint formats (owned by its
converter module), its named public weights, a tiny configuration for tests and a reference table of published
sizes. Registration checks the family contract (``vitkit.models.base.check_contract``) and validates every variant's
config, so a broken family fails at import, not at build time.

``create_model`` validates overrides against the family's config dataclass before anything is built, reads a
``pretrained`` checkpoint in any format the family registers, lets the checkpoint fill in what it implies (the head
size, the activation of JAX files, …), builds the model and loads the converted weights through the family's
``load_pretrained_state``.
"""
from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import importlib
import json
import logging
import os
import pkgutil
import re
from typing import Any, Callable, Mapping

from torch import nn

from vitkit.config import ConfigError, config_diff, from_dict, to_dict
from vitkit.layers.pos_embed import POS_EMBED_RESIZES, get_pos_embed_resize
from vitkit.layers.pos_embed_rel import RESIZE_METHODS
from vitkit.specs import (IMAGENET_MEAN, IMAGENET_STD, INCEPTION_MEAN, INCEPTION_STD, ModelSpec, PreprocessConfig,
                          Reference, ResizeRule, SourceFormat, WeightSpec)
from vitkit.weights import FORMAT_VERSION, Loaded, checkpoint_view, detect_format, read_checkpoint, unwrap
from vitkit.weights.adapt import finish_load
from vitkit.weights.io import follow_umask, read_raw
from vitkit.weights.report import CheckpointError, CheckpointMismatchError, LoadReport

__all__ = ["PreprocessConfig", "WeightSpec", "ModelSpec", "Reference", "SourceFormat", "register_family",
           "list_models", "list_families", "get_spec", "create_model", "save_pretrained", "load_model",
           "infer_variant", "all_formats", "IMAGENET_MEAN", "IMAGENET_STD", "INCEPTION_MEAN", "INCEPTION_STD"]

log = logging.getLogger(__name__)

_REGISTRY: dict[str, ModelSpec] = {}
_loaded = False


def register_family(family: str, model_cls: type, variants: Mapping[str, dict[str, Any]],
                    data_cfgs: Mapping[str, PreprocessConfig] | PreprocessConfig, *,
                    formats: tuple[SourceFormat, ...] = (), weights: Mapping[str, WeightSpec] | None = None,
                    references: Mapping[str, Reference] | None = None,
                    tiny: dict[str, Any] | Callable[[str, dict[str, Any]], dict[str, Any]] | None = None,
                    train_defaults: Mapping[str, dict[str, Any]] | None = None, paper: str = "",
                    resize: Mapping[str, ResizeRule] | None = None, resize_choices: tuple[str, ...] = ()) -> None:
    """Register every ``name → config overrides`` entry of a family's variant table.

    ``data_cfgs``: per variant (or one for all), sized by the variant's ``img_size``. ``formats``: the checkpoint
    formats the family reads, most specific signature first. ``tiny``: overrides (or ``f(name, config) → overrides``)
    that make a variant small enough for a forward and backward pass in the test suite. ``train_defaults``: per
    variant, recipe values its official fine-tuning uses (e.g. BEiT's layer-wise learning-rate decay), applied under
    any recipe that does not set them. ``resize``: source (format name, or ``format/origin``) → how that source's code
    resizes position tables for another input size; ``resize_choices``: the schemes ``create_model(pos_embed_resize=)``
    may pick instead. Contract and configs are checked now; nothing is registered if one entry is bad.
    """
    from vitkit.models.base import check_contract
    check_contract(model_cls)
    _check_resize(family, resize or {}, resize_choices)
    specs = []
    for name, cfg in variants.items():
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        from_dict(model_cls.config_cls, dict(cfg), where=name)  # fail at import on a bad table entry
        data_cfg = data_cfgs if isinstance(data_cfgs, PreprocessConfig) else data_cfgs[name]
        img_size = cfg.get("img_size", _field_default(model_cls.config_cls, "img_size"))
        tiny_cfg = tiny(name, dict(cfg)) if callable(tiny) else dict(tiny or {})
        specs.append(ModelSpec(name, family, model_cls, dict(cfg), data_cfg.with_size(img_size),
                               (weights or {}).get(name), paper, tuple(formats), (references or {}).get(name),
                               tiny_cfg, dict((train_defaults or {}).get(name, {})), dict(resize or {}),
                               tuple(resize_choices)))
    for spec in specs:
        _REGISTRY[spec.name] = spec


def _check_resize(family: str, resize: Mapping[str, ResizeRule], choices: tuple[str, ...]) -> None:
    """Every scheme a family's resize table names, or offers, exists (a typo fails at import)."""
    named = [r.pos_embed for r in resize.values()] + list(choices)
    bad = [n for n in named if n not in POS_EMBED_RESIZES]
    bad += [r.rel_pos for r in resize.values() if r.rel_pos is not None and r.rel_pos not in RESIZE_METHODS]
    if bad:
        raise ValueError(f"{family}: unknown resize scheme(s) {bad} (position tables: {', '.join(POS_EMBED_RESIZES)}; "
                         f"relative-position tables: {', '.join(RESIZE_METHODS)})")


def _field_default(cls: type, name: str) -> Any:
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


def _ensure_loaded() -> None:
    """Import every module of ``vitkit.models`` once; family modules register themselves on import."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    import vitkit.models as models
    for info in sorted(pkgutil.iter_modules(models.__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"vitkit.models.{info.name}")


def list_models(pattern: str = "*") -> list[str]:
    """Registered variant names matching a shell-style ``pattern`` (e.g. ``"deit*"``; case-insensitive, as timm's
    filter is), sorted."""
    _ensure_loaded()
    return sorted(n for n in _REGISTRY if fnmatch.fnmatchcase(n, pattern.lower()))


def list_families() -> list[str]:
    _ensure_loaded()
    return sorted({s.family for s in _REGISTRY.values()})


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
        raise ValueError(f"unknown model {name!r}; {_suggest(name)}")
    return _REGISTRY[name]


def _suggest(name: str, shown: int = 3) -> str:
    """The "did you mean ...?" hint for an unknown name. A short name (``vit_tiny``, ``swin_tiny``) stands for the
    variants it abbreviates: the registered names that start with it, else those holding its ``_``-separated parts in
    order (``tiny_224``); those with published weights first, then the shortest. Otherwise difflib, for a typo."""
    query = name.lower()
    parts = [p for p in query.split("_") if p]
    in_order = re.compile(".*".join(map(re.escape, parts)))
    prefixed = [n for n in _REGISTRY if n.startswith(query)]
    found = prefixed or [n for n in _REGISTRY if parts and in_order.search(n)]
    if not found:
        close = difflib.get_close_matches(query, list(_REGISTRY), n=shown)
        return f"did you mean {', '.join(close)}?" if close else "`vitkit models` lists them"
    found.sort(key=lambda n: (_REGISTRY[n].weights is None, len(n), _natural(n)))
    best = [n for n in found if _REGISTRY[n].weights is not None] or found  # named weights: what people mean
    best = best[:shown]
    hint = f"did you mean {' or '.join(best) if len(best) == 2 else ', '.join(best)}?"
    if len(found) > len(best):
        pattern = f"{query}*" if prefixed else f"*{'*'.join(parts)}*"
        hint += f" (`vitkit models '{pattern}'` lists all {len(found)})"
    return hint


def _natural(name: str) -> list:
    """Sort key that orders numbers by value: patch8 before patch16."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def all_formats() -> list[tuple[str, SourceFormat]]:
    """(family, format) for every format some registered family reads, each once per family."""
    _ensure_loaded()
    seen: dict[tuple[str, int], tuple[str, SourceFormat]] = {}
    for spec in _REGISTRY.values():
        for fmt in spec.formats:
            seen.setdefault((spec.family, id(fmt)), (spec.family, fmt))
    return list(seen.values())


def _check_hints(spec: ModelSpec, hints: dict[str, Any], source: str) -> None:
    """A checkpoint that implies a setting the variant's config cannot express belongs to another class of the
    family: name the variants that can hold it."""
    fields = {f.name for f in dataclasses.fields(spec.model_cls.config_cls)}
    foreign = sorted(set(hints) - fields)
    if not foreign:
        return
    able = [n for n in list_models() if _REGISTRY[n].family == spec.family and
            set(foreign) <= {f.name for f in dataclasses.fields(_REGISTRY[n].model_cls.config_cls)}]
    what = ", ".join(f"{k}={hints[k]!r}" for k in foreign)
    raise CheckpointMismatchError(f"{source} implies {what}, which {spec.name} cannot be built with"
                                  + (f"; load it with a variant such as {', '.join(difflib.get_close_matches(spec.name, able, 3, 0))}"
                                     if able else ""))


def _check_arguments(spec: ModelSpec, explicit: dict[str, Any]) -> None:
    """Unknown or ill-typed arguments are errors naming them. Ranges and combinations (``validate``) are checked when
    the config is complete, after the checkpoint's own settings (e.g. its patch size) are in."""
    import typing

    from vitkit.config import check_value
    cls = spec.model_cls.config_cls
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(explicit) - fields)
    refused = getattr(cls, "refused_options", {})  # official constructor arguments the family does not take, and why
    for key in unknown:
        if key in refused:
            raise ConfigError(f"{key} (an argument of the official {spec.family} constructor): {refused[key]}")
    if unknown:
        raise ConfigError(f"unknown argument{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} for {spec.name} "
                          f"(valid: {', '.join(sorted(fields))})")
    hints = typing.get_type_hints(cls)
    for key, value in explicit.items():
        check_value(value, hints[key], f"{spec.name}.{key}")


def create_model(name: str, pretrained: str | bool | None = None, num_classes: int | None = None,
                 img_size: int | tuple[int, int] | None = None, *, checkpoint_key: str | None = None,
                 pos_embed_resize: str | None = None, **overrides: Any) -> nn.Module:
    """Build a registered variant, optionally loading weights from a checkpoint in any supported format.

    ``num_classes`` different from the checkpoint's head gives a new zero-initialised head (the ViT paper's
    fine-tuning); ``img_size`` different from the checkpoint's resizes position embeddings and relative-position
    tables. Every such change is logged and kept in ``model.load_report``. ``checkpoint_key`` picks the state dict of
    a release file that holds several (e.g. ``"state_dict"`` instead of the EMA weights ``"state_dict_ema"`` that
    T2T-ViT's evaluation loads by default; ``vitkit.weights.unwrap``). Position tables are resized the way the
    checkpoint's source code does it (``register_family(resize=)``, named in the report); ``pos_embed_resize`` picks
    another scheme for the absolute table (e.g. ``"bicubic_antialias"``, timm's filter; ``"sinusoid"`` for T2T-ViT).
    """
    spec = get_spec(name)
    if checkpoint_key is not None and not pretrained:
        raise ValueError(f"checkpoint_key={checkpoint_key!r} needs a checkpoint: pass pretrained=")
    check_pos_embed_resize(spec, pos_embed_resize, bool(pretrained))
    explicit = dict(overrides)
    if num_classes is not None:
        explicit["num_classes"] = num_classes
    if img_size is not None:
        explicit["img_size"] = img_size
    _check_arguments(spec, explicit)  # names a bad argument before any checkpoint is read
    loaded = None
    if pretrained is True:
        from vitkit.weights.hub import resolve_pretrained
        pretrained = resolve_pretrained(spec)
    if pretrained:
        loaded = read_checkpoint(pretrained, spec, all_formats(), key=checkpoint_key)
        _check_hints(spec, loaded.config_hints, os.fspath(pretrained))
    hints = {k: v for k, v in (loaded.config_hints if loaded else {}).items() if k not in explicit}
    if "num_classes" in explicit and loaded and loaded.config_hints.get("num_classes") != explicit["num_classes"]:
        hints.pop("representation_size", None)  # a new task replaces the whole pre-training head (App. B.1.1)
    cfg = from_dict(spec.model_cls.config_cls, {**spec.config, **hints, **explicit}, where=name)
    model = spec.model_cls(cfg)
    model.variant_name = name
    model.data_cfg = spec.data_cfg.with_size(cfg.img_size)
    model.class_names = None
    model.load_report = None
    if loaded is not None:
        loaded.report.resize = _resize_rule(spec, loaded.report, pos_embed_resize)
        _load_into(model, loaded, hints, spec)
    return model


def check_pos_embed_resize(spec: ModelSpec, choice: str | None, pretrained: bool) -> None:
    """``pos_embed_resize=`` must name a scheme the family offers, and needs a checkpoint (a randomly initialised model
    has nothing to resize)."""
    if choice is None:
        return
    if not spec.resize_choices:
        raise ValueError(f"pos_embed_resize={choice!r}: {spec.name} ({spec.family}) has no position table whose "
                         f"resize can be chosen")
    if choice not in spec.resize_choices:
        raise ValueError(f"pos_embed_resize={choice!r} is not a scheme {spec.name} offers; choose from "
                         f"{', '.join(spec.resize_choices)}")
    if not pretrained:
        raise ValueError(f"pos_embed_resize={choice!r} needs a checkpoint: pass pretrained= (a randomly initialised "
                         f"model has nothing to resize)")


def _resize_rule(spec: ModelSpec, report: LoadReport, choice: str | None = None) -> ResizeRule | None:
    """The family's rule for the checkpoint's source (``format/origin`` first, then the format), with a
    ``pos_embed_resize`` choice in place of its absolute-table scheme (the source then names the choice)."""
    rule = spec.resize.get(f"{report.format}/{report.origin}") or spec.resize.get(report.format)
    if choice is None:
        return rule
    chosen = f"{get_pos_embed_resize(choice).origin}, chosen with pos_embed_resize={choice!r}"
    if rule is None:
        return ResizeRule(choice, chosen)
    return dataclasses.replace(rule, pos_embed=choice, source=chosen, rel_pos_source=rule.rel_pos_source or rule.source)


def _load_into(model: nn.Module, loaded: Loaded, hints: dict[str, Any], spec: ModelSpec) -> None:
    report = loaded.report
    if report.format == "vitkit":  # the whole architecture comes back: name only what differs from the variant
        default = from_dict(spec.model_cls.config_cls, dict(spec.config), where=spec.name)
        diff = config_diff(model.cfg, default)
        changed = [f"{k}={diff[k]!r}" for k in hints if k in diff]
        report.notes.append("architecture restored from config.json"
                            + (f": {', '.join(changed)}" if changed else " (the variant's defaults)"))
    else:
        for k, v in hints.items():
            report.notes.append(f"config {k}={v!r} taken from the checkpoint")
    report.source_config = dict(loaded.config_hints)  # what the checkpoint itself was built for (e.g. its img_size)
    finish_load(model, loaded.state_dict, report)
    if loaded.class_names and len(loaded.class_names) == getattr(model, "num_classes", -1):
        model.class_names = list(loaded.class_names)
    if loaded.data_cfg:
        model.data_cfg = dataclasses.replace(model.data_cfg, **loaded.data_cfg)
        if report.format != "vitkit":  # a format's own preprocessing (SourceFormat.data_cfg)
            report.notes.append(f"preprocessing set for {report.format} weights: "
                                + ", ".join(f"{k}={v!r}" for k, v in loaded.data_cfg.items()))
    model.load_report = report
    log.info("%s", report.summary())


def model_config_dict(model: nn.Module) -> dict[str, Any]:
    """The full architecture config of a built model, as plain data (written into vitkit's config.json)."""
    return to_dict(model.cfg)


# --------------------------------------------------------------------------------------- vitkit's own format
def save_pretrained(model: nn.Module, folder: str | os.PathLike, class_names: list[str] | None = None) -> str:
    """Write ``model`` in vitkit's own format: ``model.safetensors`` + ``config.json``, each atomically."""
    from safetensors.torch import save_file
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    name = getattr(model, "variant_name", None)
    if name is None:
        raise ValueError("save_pretrained needs a model built by vitkit.create_model")
    config = {"format": "vitkit", "format_version": FORMAT_VERSION, "model": name, "family": get_spec(name).family,
              "config": to_dict(model.cfg), "data_cfg": to_dict(dataclasses.asdict(model.data_cfg)),
              "class_names": class_names if class_names is not None else getattr(model, "class_names", None)}
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    _atomic(os.path.join(folder, "model.safetensors"), lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    _atomic(os.path.join(folder, "config.json"),
            lambda tmp: open(tmp, "w").write(json.dumps(config, indent=1, sort_keys=True)))
    return folder


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
    cfg_path = os.path.join(os.fspath(path), "config.json")
    if not os.path.isfile(cfg_path):
        raise CheckpointError(f"{path}: not a vitkit model folder (no config.json); use "
                              f"create_model(name, pretrained=path) for other formats")
    with open(cfg_path) as f:
        cfg = json.load(f)
    if cfg.get("format") != "vitkit":
        raise CheckpointError(f"{path}: config.json is not vitkit's; use create_model(name, pretrained=path)")
    return create_model(cfg["model"], pretrained=path, **kwargs)


def infer_variant(path: str | os.PathLike) -> tuple[str, dict[str, Any]]:
    """(variant name, overrides) for a checkpoint that describes its own architecture: a vitkit folder, or a format
    whose family can name the variant (a transformers folder's config.json, a JAX .npz)."""
    raw = read_raw(path)
    if raw.config and raw.config.get("format") == "vitkit":
        return raw.config["model"], {}
    report = LoadReport(source=os.fspath(path))
    state, container = (raw.tensors, "") if raw.kind == "npz" else unwrap(raw.tensors, report)
    view = checkpoint_view(state, raw.kind, container, raw.config)
    for family, fmt in all_formats():
        if fmt.infer is not None and detect_format(view, [fmt]) is not None:
            found = fmt.infer(view)
            if found is not None:
                return found
    looks = sorted({f"{fmt.name} {family}" for family, fmt in all_formats() if fmt.detect(view)})
    kind = f"a {' or '.join(looks)} checkpoint" if looks else "this checkpoint"
    raise ValueError(f"{path}: {kind} does not say which variant it is (preprocessing, number of heads); pass "
                     f"--model, e.g. --model {list_models()[0]}")
