"""The model registry: variant name → family, model class, config, preprocessing, checkpoint formats; ``create_model``;
and vitkit's own model folders (``save_pretrained`` / ``load_model``).

Families are discovered, not listed: every folder of ``vitkit.families`` is imported once, and each declares a
``Family`` (``FAMILY`` in its ``__init__.py``) with its variant table (plain data), its data configs, its checkpoint
formats (owned by its ``formats`` module), its named public weights, a tiny configuration for tests and a reference
table of published sizes. Registration checks the family contract (``vitkit.families.contract.check_contract``) and
validates every variant's config, so a broken family fails when it is read, not at build time.

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
from typing import Any, Mapping, Sequence

from torch import nn

from vitkit.config import ConfigError, config_diff, from_dict, to_dict
from vitkit.families.contract import Family
from vitkit.layers.pos_embed import POS_EMBED_RESIZES, get_pos_embed_resize
from vitkit.layers.pos_embed_rel import RESIZE_METHODS
from vitkit.specs import (IMAGENET_MEAN, IMAGENET_STD, INCEPTION_MEAN, INCEPTION_STD, ModelSpec, PreprocessConfig,
                          Reference, ResizeRule, SourceFormat, WeightSpec)
from vitkit.weights import FORMAT_VERSION, Loaded, checkpoint_view, detect_format, read_checkpoint, unwrap
from vitkit.weights.adapt import finish_load
from vitkit.weights.io import follow_umask, read_raw
from vitkit.weights.load_report import CheckpointError, CheckpointMismatchError, LoadReport

__all__ = ["PreprocessConfig", "WeightSpec", "ModelSpec", "Reference", "SourceFormat",
           "list_models", "list_families", "get_spec", "create_model", "save_pretrained", "load_model",
           "infer_variant", "all_formats", "IMAGENET_MEAN", "IMAGENET_STD", "INCEPTION_MEAN", "INCEPTION_STD"]

log = logging.getLogger(__name__)

_REGISTRY: dict[str, ModelSpec] = {}
_FAMILIES: dict[str, Family] = {}
_loaded = False


def register(family: Family) -> None:
    """Register every variant of a family's declaration (``FAMILY`` in its folder's ``__init__.py``).

    The model class must meet the family contract and every variant's config must validate, so a broken family fails
    when it is read, not at build time; nothing is registered if one entry is bad.
    """
    from vitkit.families.contract import check_contract
    for cls in {family.model_cls, *family.model_classes.values()}:
        check_contract(cls)
    _check_resize(family.name, family.resize, family.resize_choices)
    specs = []
    for name, cfg in family.variants.items():
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        cls = family.model_class(name)
        from_dict(cls.config_cls, dict(cfg), where=name)  # fail on a bad table entry
        data_cfg = family.data_cfgs if isinstance(family.data_cfgs, PreprocessConfig) else family.data_cfgs[name]
        img_size = cfg.get("img_size", _field_default(cls.config_cls, "img_size"))
        tiny_cfg = family.tiny(name, dict(cfg)) if callable(family.tiny) else dict(family.tiny or {})
        specs.append(ModelSpec(name, family.name, cls, dict(cfg), data_cfg.with_size(img_size),
                               family.weights.get(name), family.paper, tuple(family.formats),
                               family.references.get(name), tiny_cfg, dict(family.train_defaults.get(name, {})),
                               dict(family.resize), tuple(family.resize_choices)))
    for spec in specs:
        _REGISTRY[spec.name] = spec
    _FAMILIES[family.name] = family


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
    """Read every family folder's declaration (``vitkit.families.<name>.FAMILY``) once, parents first."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    import vitkit.families as families
    declared = {}
    for info in sorted(pkgutil.iter_modules(families.__path__), key=lambda m: m.name):
        if info.ispkg:
            family = importlib.import_module(f"vitkit.families.{info.name}").FAMILY
            declared[family.name] = family
    for family in sorted(declared.values(), key=lambda f: f.parent is not None):
        register(family)


def list_models(pattern: str = "*") -> list[str]:
    """Registered variant names matching a shell-style ``pattern`` (e.g. ``"deit*"``; case-insensitive, as timm's
    filter is), sorted."""
    _ensure_loaded()
    return sorted(n for n in _REGISTRY if fnmatch.fnmatchcase(n, pattern.lower()))


def list_families() -> list[str]:
    _ensure_loaded()
    return sorted({s.family for s in _REGISTRY.values()})


def get_spec(name: str) -> ModelSpec:
    _ensure_loaded()
    if name not in _REGISTRY:
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
                 pos_embed_resize: str | None = None, features_only: bool = False,
                 out_indices: Sequence[int] | None = None, **overrides: Any) -> nn.Module:
    """Build a registered variant, optionally loading weights from a checkpoint in any supported format.

    ``num_classes`` different from the checkpoint's head gives a new zero-initialised head (the ViT paper's
    fine-tuning); ``img_size`` different from the checkpoint's resizes position embeddings and relative-position
    tables. Every such change is logged and kept in ``model.load_report``. ``checkpoint_key`` picks the state dict of
    a release file that holds several (e.g. ``"state_dict"`` instead of the EMA weights ``"state_dict_ema"`` that
    T2T-ViT's evaluation loads by default; ``vitkit.weights.unwrap``). Position tables are resized the way the
    checkpoint's source code does it (the family's ``Family.resize``, named in the report); ``pos_embed_resize`` picks
    another scheme for the absolute table (e.g. ``"bicubic_antialias"``, timm's filter; ``"sinusoid"`` for a
    sinusoid table). ``features_only=True`` returns a backbone (``vitkit.families.backbone.FeatureExtractor``) whose
    forward gives the (B, C, H, W) maps of ``out_indices`` (blocks or stages; timm's defaults when None). An
    ``in_chans`` other than the checkpoint's fits its first layer's weights as timm's ``adapt_input_conv`` does.
    """
    spec = get_spec(name)
    if out_indices is not None and not features_only:
        raise ValueError("out_indices chooses the maps of a backbone: pass features_only=True with it")
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
    if pretrained is True:  # the catalog's named weights: the file, and the entry of it that was released
        from vitkit.weights.hub import resolve_pretrained
        pretrained = resolve_pretrained(spec)
        checkpoint_key = checkpoint_key if checkpoint_key is not None else spec.weights.checkpoint_key
    if pretrained:
        loaded = read_checkpoint(pretrained, spec, all_formats(), key=checkpoint_key)
        _check_hints(spec, loaded.config_hints, os.fspath(pretrained))
    hints = {k: v for k, v in (loaded.config_hints if loaded else {}).items() if k not in explicit}
    if "num_classes" in explicit and loaded and loaded.config_hints.get("num_classes") != explicit["num_classes"]:
        for key in _FAMILIES[spec.family].task_fields:  # a new task: the variant's head, not the checkpoint's
            hints.pop(key, None)
    cfg = from_dict(spec.model_cls.config_cls, {**spec.config, **hints, **explicit}, where=name)
    model = spec.model_cls(cfg)
    model.variant_name = name
    model.data_cfg = spec.data_cfg.with_size(cfg.img_size)
    model.class_names = None
    model.load_report = None
    if loaded is not None:
        loaded.report.resize = _resize_rule(spec, loaded.report, pos_embed_resize)
        _load_into(model, loaded, hints, spec)
    if features_only:
        from vitkit.families.backbone import FeatureExtractor
        return FeatureExtractor(model, out_indices)
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
    if loaded.class_names and len(loaded.class_names) == model.num_classes:
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
    name = model.variant_name
    if name is None:
        raise ValueError("save_pretrained needs a model built by vitkit.create_model")
    config = {"format": "vitkit", "format_version": FORMAT_VERSION, "model": name, "family": get_spec(name).family,
              "config": to_dict(model.cfg), "data_cfg": to_dict(dataclasses.asdict(model.data_cfg)),
              "class_names": class_names if class_names is not None else model.class_names}
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
