"""Running an exported model: ONNX Runtime, OpenVINO, or ``torch.export``'s module, behind one ``nn.Module`` facade so
that ``predict``, ``eval`` and ``bench`` treat it like any vitkit model (``--runtime``).

``open_runtime(folder)`` opens what ``export_model`` wrote; ``to_runtime(model, "onnxruntime")`` exports an eager
model to a temporary folder (with the parity check) and opens it. Both return a ``RuntimeModel``: ``forward(x)`` takes
the same (B, C, H, W) float32 tensor as the eager model and returns logits; ``data_cfg``, ``class_names``,
``num_classes`` and ``variant_name`` come from the export's ``vitkit.json``.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["RUNTIMES", "RuntimeModel", "open_runtime", "to_runtime"]

from vitkit.deploy.names import RUNTIMES


class RuntimeModel(nn.Module):
    """An exported model as a module: inference only, on the CPU, float32 in and out."""

    def __init__(self, run: Callable[[np.ndarray], np.ndarray], meta: dict[str, Any], runtime: str,
                 source: nn.Module | None = None):
        super().__init__()
        self.__dict__["source"] = source  # the eager model it was exported from, when known (not a submodule)
        from vitkit.specs import PreprocessConfig
        self._run = run
        self.runtime = runtime
        self.meta = meta
        cfg = dict(meta["data_cfg"])
        self.data_cfg = PreprocessConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()})
        self.class_names = meta.get("class_names")
        self.num_classes = meta["num_classes"]
        self.variant_name = meta.get("model")

    def forward(self, x: Tensor) -> Tensor:
        out = self._run(np.ascontiguousarray(x.detach().float().cpu().numpy()))
        return torch.from_numpy(np.asarray(out))

    def extra_repr(self) -> str:
        return f"runtime={self.runtime}, model={self.variant_name}, int8={self.meta.get('int8', False)}"


def _threads() -> int:
    return torch.get_num_threads()


def _onnxruntime(path: str, meta: dict[str, Any]) -> Callable[[np.ndarray], np.ndarray]:
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = _threads()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


def _openvino(path: str, meta: dict[str, Any], hint: str | None = None) -> Callable[[np.ndarray], np.ndarray]:
    import openvino as ov
    core = ov.Core()
    config = {"INFERENCE_NUM_THREADS": _threads(), "PERFORMANCE_HINT": "LATENCY"}
    if hint:
        config["INFERENCE_PRECISION_HINT"] = hint
    compiled = core.compile_model(path, "CPU", config)
    request = compiled.create_infer_request()
    output = compiled.output(0)
    return lambda x: request.infer({0: x})[output].copy()


def _torch_export(path: str, meta: dict[str, Any]) -> Callable[[np.ndarray], np.ndarray]:
    module = torch.export.load(path).module()

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(x)).numpy()
    return run


_OPENERS = {"onnx": ("onnxruntime", _onnxruntime), "openvino": ("openvino", _openvino),
            "torch-export": ("torch-export", _torch_export)}


def open_runtime(folder: str | os.PathLike, meta: dict[str, Any] | None = None,
                 precision_hint: str | None = None) -> RuntimeModel:
    """Open an exported folder in the runtime of its format (``precision_hint``: OpenVINO's inference precision,
    e.g. "bf16"; None keeps the model's fp32)."""
    folder = os.fspath(folder)
    if meta is None:
        with open(os.path.join(folder, "vitkit.json")) as f:
            meta = json.load(f)
    runtime, opener = _OPENERS[meta["format"]]
    path = os.path.join(folder, meta["file"])
    run = opener(path, meta, precision_hint) if runtime == "openvino" else opener(path, meta)
    return RuntimeModel(run, meta, runtime)


def to_runtime(model: nn.Module, runtime: str, int8: bool = False, images: Tensor | None = None) -> nn.Module:
    """``model`` itself for "eager"; otherwise the model exported (parity-checked) to a temporary folder and opened
    in ``runtime``. The folder is deleted once opened (the runtimes keep the model in memory)."""
    from vitkit.deploy.export import export_model
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; choose from {', '.join(RUNTIMES)}")
    if runtime == "eager":
        if int8:
            raise ValueError("--int8 needs --runtime onnxruntime")
        return model
    with tempfile.TemporaryDirectory(prefix="vitkit-runtime-") as tmp:
        result = export_model(model, os.path.join(tmp, "model"), RUNTIMES[runtime], int8=int8, images=images)
        opened = open_runtime(result.folder)
    opened.__dict__["source"] = model
    opened.parity = result.parity
    return opened
