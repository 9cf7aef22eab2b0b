"""Benchmarks: parameter and MAC counts (``flops``), throughput / latency / memory of a step (``runner``), the
machine's GEMM peak and memory bandwidth (``machine``), and a same-process comparison against Hugging Face
``transformers`` (``compare``). Results and the commands that produced them: ``vitkit/bench/README.md``.

The names below are imported on first use (PEP 562), so ``python -m vitkit.bench.flops`` runs its module once."""
from __future__ import annotations

import importlib
from typing import Any

_LAZY = {"count_params": "flops", "count_macs": "flops", "count_flops": "flops", "model_stats": "flops",
         "ModelStats": "flops", "BenchSettings": "runner", "BenchResult": "runner", "benchmark": "runner"}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'vitkit.bench' has no attribute {name!r}")
    return getattr(importlib.import_module(f"vitkit.bench.{_LAZY[name]}"), name)
