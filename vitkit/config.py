"""Typed, validated configuration: dataclasses built from plain dicts, where an unknown key or a value of the wrong
type is an error that names it.

Used by the model registry (architecture overrides) and by the training CLI (recipe sections). Layering follows
dinov2/minGPT: defaults → file → ``--set a.b=c``, and the resolved result is written out next to the run.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Literal, Sequence, Union, get_args, get_origin

import yaml

__all__ = ["ConfigError", "from_dict", "to_dict", "config_diff", "check_value", "check_ranges", "apply_dotted",
           "parse_overrides", "parse_scalar", "merge"]


class ConfigError(ValueError):
    """A configuration key is unknown or its value has the wrong type or range."""


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def check_value(value: Any, tp: Any, where: str) -> Any:
    """Return ``value`` coerced to ``tp`` (int → float, list → tuple) or raise ``ConfigError`` naming ``where``."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        errors = []
        for arm in get_args(tp):
            try:
                return check_value(value, arm, where)
            except ConfigError as e:
                if arm is not type(None):
                    errors.append(e)
        if len(errors) == 1:  # an optional value: the one real type's message (e.g. "expected a finite number")
            raise errors[0]
        raise ConfigError(f"{where}: {value!r} is not a valid {_type_name(tp)}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{where}: expected None, got {value!r}")
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise ConfigError(f"{where}: {value!r} is not one of {list(get_args(tp))}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a {origin.__name__}, got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
            items = [check_value(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args))]
        else:
            arm = args[0] if args else Any
            items = [check_value(v, arm, f"{where}[{i}]") for i, v in enumerate(value)]
        return origin(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for section {tp.__name__}, got {value!r}")
        return from_dict(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:  # an int beyond float range
                number = math.inf
            if not math.isfinite(number):  # passes every range check (nan) or means nothing (inf)
                raise ConfigError(f"{where}: expected a finite number, got {value!r}")
            return number
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; every key must be a field and every value must fit the field's type.

    Nested dataclass fields accept nested mappings. A dataclass may define ``validate(self)`` for range checks;
    it is called after construction and should raise ``ConfigError``.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown config key{'s' if len(unknown) > 1 else ''} {', '.join(prefix + k for k in unknown)} "
            f"(valid keys{' of ' + where if where else ''}: {', '.join(sorted(names))})")
    kwargs = {k: check_value(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def to_dict(obj: Any) -> Any:
    """Dataclass → plain dict/list/scalars (tuples become lists), ready for YAML or JSON."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj



def check_ranges(cfg: Any, *, positive: Sequence[str] = (), rates: Sequence[str] = (),
                 non_negative: Sequence[str] = ()) -> None:
    """Raise ``ConfigError`` naming the first field of ``cfg`` out of its range: ``positive`` fields > 0 (every entry of
    a sequence), ``rates`` (dropout, stochastic depth) in [0, 1), ``non_negative`` fields >= 0."""
    for name in rates:
        if not 0.0 <= getattr(cfg, name) < 1.0:
            raise ConfigError(f"{name} must be in [0, 1), got {getattr(cfg, name)}")
    for names, ok, what in ((positive, lambda v: v > 0, "positive"), (non_negative, lambda v: v >= 0, ">= 0")):
        for name in names:
            value = getattr(cfg, name)
            if not all(ok(v) for v in (value if isinstance(value, (list, tuple)) else (value,))):
                shown = list(value) if isinstance(value, (list, tuple)) else value
                raise ConfigError(f"{name} must be {what}, got {shown}")

def config_diff(cfg: Any, reference: Any) -> dict[str, Any]:
    """The fields of dataclass ``cfg`` whose values differ from ``reference`` (same class), as plain data."""
    a, b = to_dict(cfg), to_dict(reference)
    return {k: v for k, v in a.items() if v != b.get(k)}


def parse_scalar(text: str) -> Any:
    """Parse the value of ``--set key=value`` as YAML (``3`` → int, ``1e-3`` → float, ``[1,2]`` → list)."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
        try:
            return float(value)
        except ValueError:
            return value
    return value


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["depth=7", "embed_dim=96"]`` (``--set`` flags) → ``{"depth": 7, "embed_dim": 96}``, values as YAML scalars."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        out[key.strip()] = parse_scalar(value)
    return out


def apply_dotted(data: dict[str, Any], assignment: str) -> dict[str, Any]:
    """Apply one ``a.b.c=value`` assignment to a nested dict, in place; returns ``data``."""
    if "=" not in assignment:
        raise ConfigError(f"--set expects key=value, got {assignment!r}")
    key, text = assignment.split("=", 1)
    parts = key.strip().split(".")
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {p} is not a section")
    node[parts[-1]] = parse_scalar(text)
    return data


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge: mappings merge key by key, anything else in ``override`` replaces ``base``."""
    out = dict(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out
