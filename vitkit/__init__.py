"""vitkit: Vision Transformers on PyTorch, faithful to the papers, loading every public checkpoint format.

The public names are imported on first use (PEP 562), so ``import vitkit`` (and ``vitkit --help``) does not import
torch until a model is built or loaded.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "create_model": "vitkit.registry", "list_models": "vitkit.registry", "get_spec": "vitkit.registry",
    "PreprocessConfig": "vitkit.registry", "load_model": "vitkit.registry", "save_pretrained": "vitkit.registry",
    "record_attention": "vitkit.layers.attention",
}
__all__ = ["create_model", "list_models", "get_spec", "load_model", "save_pretrained", "record_attention",
           "PreprocessConfig", "__version__"]


_SUBMODULES = {"registry", "layers", "models", "weights", "explain", "deploy", "bench", "data", "train", "evaluate",
               "tokenizers"}


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:  # ``vitkit.registry.list_families()`` after a plain ``import vitkit``
        return importlib.import_module(f"vitkit.{name}")
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'vitkit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
