"""Parameters and MACs of every registered variant, precomputed per family (``<family>.json`` beside this file), so
``vitkit models`` lists ~170 variants without building any of them (nor importing torch).

Each file records, per variant, its parameter count, forward MACs, input size and a fingerprint of its registered
config (``fingerprint``), plus the sha256 of the source file that registers the family. ``load`` trusts the files
only while every family module's source is unchanged and every module has a file (a cheap check: no torch); when one
changed, the caller imports the registry and recomputes the missing or stale entries (``vitkit.bench.flops``).
Regenerate after adding or changing variants: ``python -m vitkit.bench.flops --update [FAMILY ...]``. A new family
adds its own ``<family>.json`` (discovered by file name); no shared code changes.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

__all__ = ["STATS_DIR", "MODELS_DIR", "FORMAT", "fingerprint", "source_hash", "read_all", "write_family",
           "family_modules", "fresh"]

STATS_DIR = Path(__file__).resolve().parent
MODELS_DIR = STATS_DIR.parent
FORMAT = 1


def fingerprint(model_class: str, config: dict[str, Any], input_size: tuple[int, ...] | list[int]) -> str:
    """A short hash of what a variant's counts depend on: its model class, registered config and native input size."""
    text = json.dumps({"class": model_class, "config": config, "input_size": list(input_size)}, sort_keys=True,
                      default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def source_hash(module_file: Path) -> str:
    return hashlib.sha256(module_file.read_bytes()).hexdigest()


def family_modules() -> list[Path]:
    """The family files of vitkit/models (every ``*.py`` but the package's own)."""
    return sorted(p for p in MODELS_DIR.glob("*.py") if not p.name.startswith("_"))


def read_all() -> dict[str, dict[str, Any]]:
    """``{family: file contents}`` of every stats file."""
    out = {}
    for path in sorted(STATS_DIR.glob("*.json")):
        data = json.loads(path.read_text())
        if data.get("format") == FORMAT:
            out[path.stem] = data
    return out


def fresh(files: dict[str, dict[str, Any]]) -> bool:
    """True when every module a stats file was computed from is unchanged and no other module of vitkit/models
    registers a family (a text check for ``register_family(``: support modules such as shared bases or format
    converters have no stats file and need none)."""
    recorded = {f["module"]: f["module_sha256"] for f in files.values()}
    for module in family_modules():
        if module.name in recorded:
            if recorded[module.name] != source_hash(module):
                return False
        elif "register_family(" in module.read_text():
            return False
    return True


def write_family(family: str, module_file: Path, variants: dict[str, dict[str, Any]]) -> Path:
    path = STATS_DIR / f"{family}.json"
    head = {"format": FORMAT, "family": family, "module": module_file.name, "module_sha256": source_hash(module_file)}
    lines = [f" {json.dumps(k)}: {json.dumps(v)}," for k, v in head.items()]
    body = [f"  {json.dumps(k)}: {json.dumps(variants[k], sort_keys=True)}" for k in sorted(variants)]
    path.write_text("{\n" + "\n".join(lines) + '\n "variants": {\n' + ",\n".join(body) + "\n }\n}\n")  # a line each
    return path
