"""Parameters and MACs of every registered variant, precomputed per family (``stats.json`` in each family folder), so
``vitkit models`` lists every variant without building any of them (nor importing torch).

Each file records, per variant, its parameter count, forward MACs, input size and a fingerprint of what the counts
depend on as registered (model class name, config, input size): a variant whose registered config changed is counted
again when the registry is at hand. The counts themselves are verified directly: the contract suite counts every
variant on the meta device (against its published size) and requires the file's entry to equal that count, so
editing a docstring or a comment forces no refresh, and a change that alters a count fails a test that names the
command. Regenerate after adding or changing variants: ``python -m vitkit.bench.flops --update [FAMILY ...]``.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

__all__ = ["FAMILIES_DIR", "FORMAT", "fingerprint", "read_all", "write_family", "family_folders", "fresh"]

FAMILIES_DIR = Path(__file__).resolve().parent
FORMAT = 2


def fingerprint(model_class: str, config: dict[str, Any], input_size: tuple[int, ...] | list[int]) -> str:
    """A short hash of what a variant's counts depend on as registered: its model class's name, registered config and
    native input size."""
    text = json.dumps({"class": model_class, "config": config, "input_size": list(input_size)}, sort_keys=True,
                      default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def family_folders() -> list[Path]:
    """Every family folder (a package of vitkit/families)."""
    return sorted(p.parent for p in FAMILIES_DIR.glob("*/__init__.py"))


def read_all() -> dict[str, dict[str, Any]]:
    """``{family: file contents}`` of every stats file."""
    out = {}
    for path in sorted(FAMILIES_DIR.glob("*/stats.json")):
        data = json.loads(path.read_text())
        if data.get("format") == FORMAT:
            out[data["family"]] = data
    return out


def fresh(files: dict[str, dict[str, Any]]) -> bool:
    """True when every family folder has a stats file (a cheap check, no torch): a new family without one sends
    ``vitkit models`` to the registry, which counts it."""
    return all((folder / "stats.json").is_file() for folder in family_folders()) and bool(files)


def write_family(family: str, folder: Path, variants: dict[str, dict[str, Any]]) -> Path:
    path = folder / "stats.json"
    head = {"format": FORMAT, "family": family}
    lines = [f" {json.dumps(k)}: {json.dumps(v)}," for k, v in head.items()]
    body = [f"  {json.dumps(k)}: {json.dumps(variants[k], sort_keys=True)}" for k in sorted(variants)]
    path.write_text("{\n" + "\n".join(lines) + '\n "variants": {\n' + ",\n".join(body) + "\n }\n}\n")  # a line each
    return path
