"""Running an exported model: ONNX Runtime, OpenVINO, or ``torch.export``'s module, behind one ``nn.Module`` facade so
that ``predict``, ``eval`` and ``bench`` treat it like any vitkit model (``--runtime``, or an export folder given as
the model).

``open_runtime(folder)`` opens what ``export_model`` wrote; ``to_runtime(model, "onnxruntime")`` exports an eager
model to a temporary folder (with the parity check) and opens it. Both return a ``RuntimeModel``: ``forward(x)`` takes
the same (B, C, H, W) float32 tensor as the eager model and returns logits; ``data_cfg``, ``class_names``,
``num_classes`` and ``variant_name`` come from the export's ``vitkit.json``; ``precision`` says what the runtime
reports it computes in (OpenVINO is asked for fp32, or bf16 by ``openvino-bf16``, and read back).
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import os
import tempfile
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["RUNTIMES", "RuntimeModel", "open_runtime", "to_runtime", "is_export_folder", "open_export_folder",
           "keep_signal_stack"]

from vitkit.deploy.names import FORMATS, OPENVINO_PRECISION, RUNTIMES

Runner = Callable[[np.ndarray], np.ndarray]


class RuntimeModel(nn.Module):
    """An exported model as a module: inference only, on the CPU, float32 in and out; a
    ``vitkit.families.contract.Classifier`` like the family model it was exported from."""

    accepts_any_size = False  # exported for its data_cfg's input size

    def __init__(self, run: Runner, meta: dict[str, Any], runtime: str, source: nn.Module | None = None,
                 precision: str = "fp32", note: str | None = None):
        super().__init__()
        self.__dict__["source"] = source  # the eager model it was exported from, when known (not a submodule)
        from vitkit.specs import PreprocessConfig
        self._run = run
        self.runtime = runtime
        self.meta = meta
        self.precision = "int8" if meta.get("int8") else precision  # int8 weights, else what the runtime reports
        self.note = note  # e.g. that bf16 was asked for but the CPU computes in fp32
        cfg = dict(meta["data_cfg"])
        self.data_cfg = PreprocessConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()})
        self.class_names = meta.get("class_names")
        self.num_classes = meta["num_classes"]
        self.variant_name = meta.get("model")

    def forward(self, x: Tensor) -> Tensor:
        out = self._run(np.ascontiguousarray(x.detach().float().cpu().numpy()))
        return torch.from_numpy(np.asarray(out))

    def extra_repr(self) -> str:
        return f"runtime={self.runtime}, model={self.variant_name}, precision={self.precision}"


def _threads() -> int:
    return torch.get_num_threads()


def _onnxruntime(path: str, runtime: str) -> tuple[Runner, str, str | None]:
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = _threads()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return (lambda x: session.run(None, {name: x})[0]), "fp32", None


class _SignalStack(ctypes.Structure):
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


@contextlib.contextmanager
def keep_signal_stack() -> Iterator[None]:
    """Restore the calling thread's alternate signal stack (``sigaltstack(2)``) after the block. OpenVINO's
    ``compile_model`` (2026.4, CPU plugin) installs a stack of its own on the calling thread and later unmaps it;
    Python runs every signal handler on that stack (``SA_ONSTACK``), so the next SIGINT, SIGTERM or SIGCHLD that
    reached the process during a blocking call killed it with a segmentation fault. No-op where libc has no
    ``sigaltstack``."""
    libc = ctypes.CDLL(None, use_errno=True)
    get_set = getattr(libc, "sigaltstack", None)
    saved = _SignalStack()
    if get_set is None or get_set(None, ctypes.byref(saved)) != 0:
        yield
        return
    try:
        yield
    finally:
        get_set(ctypes.byref(saved), None)


def _openvino(path: str, runtime: str) -> tuple[Runner, str, str | None]:
    """Compile for the CPU with the inference precision of ``runtime`` asked for, then read back what the plugin
    chose: a CPU without native bf16 computes a bf16 request in fp32, and says so."""
    import openvino as ov
    import openvino.properties.hint as hints
    asked = OPENVINO_PRECISION[runtime]
    config = {"INFERENCE_NUM_THREADS": _threads(), "PERFORMANCE_HINT": "LATENCY",
              hints.inference_precision: getattr(ov.Type, asked)}
    with keep_signal_stack():
        compiled = ov.Core().compile_model(path, "CPU", config)
    got = compiled.get_property(hints.inference_precision).get_type_name()  # "f32", "bf16"
    precision = {"f32": "fp32"}.get(got, got)
    note = None
    if got != asked:
        note = (f"{runtime}: {asked} was asked for, OpenVINO computes in {got} on this CPU"
                + (" (bf16 is not native here)" if asked == "bf16" else ""))
    request = compiled.create_infer_request()
    output = compiled.output(0)
    return (lambda x: request.infer({0: x})[output].copy()), precision, note


def _torch_export(path: str, runtime: str) -> tuple[Runner, str, str | None]:
    module = torch.export.load(path).module()

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(x)).numpy()
    return run, "fp32", None


_OPENERS = {"onnxruntime": _onnxruntime, "openvino": _openvino, "openvino-bf16": _openvino,
            "torch-export": _torch_export}


def _runtimes_of(fmt: str) -> list[str]:
    return [name for name, f in RUNTIMES.items() if f == fmt]


def open_runtime(folder: str | os.PathLike, meta: dict[str, Any] | None = None,
                 runtime: str | None = None) -> RuntimeModel:
    """Open an exported folder in ``runtime`` (default: the runtime its ``vitkit.json`` names, else the runtime of
    its format, in fp32; ``openvino-bf16`` for an OpenVINO folder computed in bf16)."""
    folder = os.fspath(folder)
    if meta is None:
        with open(os.path.join(folder, "vitkit.json")) as f:
            meta = json.load(f)
    runtime = runtime or meta.get("runtime") or _runtimes_of(meta["format"])[0]  # "runtime": export --fastest
    if RUNTIMES.get(runtime) != meta["format"]:
        raise ValueError(f"{folder} is a {meta['format']} export: it runs in "
                         f"{' or '.join(_runtimes_of(meta['format']))}, not {runtime}")
    run, precision, note = _OPENERS[runtime](os.path.join(folder, meta["file"]), runtime)
    return RuntimeModel(run, meta, runtime, precision=precision, note=note)


def is_export_folder(path: str | os.PathLike | None) -> bool:
    """Whether ``path`` is a folder written by ``export_model`` (it holds a ``vitkit.json`` naming its format)."""
    if path is None or not os.path.isfile(os.path.join(os.fspath(path), "vitkit.json")):
        return False
    try:
        with open(os.path.join(os.fspath(path), "vitkit.json")) as f:
            return json.load(f).get("format") in FORMATS
    except (OSError, ValueError, AttributeError):
        return False


def open_export_folder(folder: str | os.PathLike, runtime: str = "eager", int8: bool = False) -> RuntimeModel:
    """An export folder given as the model of ``predict``, ``eval`` or ``bench``: it runs as it was exported (int8 or
    not); ``runtime`` "eager" means the runtime of its format, any other must run that format."""
    folder = os.fspath(folder)
    model = open_runtime(folder, runtime=None if runtime == "eager" else runtime)
    if int8 and not model.meta.get("int8"):
        raise ValueError(f"{folder} holds fp32 weights: int8 is chosen when exporting (vitkit export ... --int8)")
    return model


def to_runtime(model: nn.Module, runtime: str, int8: bool = False, images: Tensor | None = None) -> nn.Module:
    """``model`` itself for "eager"; otherwise the model exported (parity-checked in ``runtime``) to a temporary
    folder and opened in ``runtime``. The folder is deleted once opened (the runtimes keep the model in memory)."""
    from vitkit.deploy.export import export_model
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; choose from {', '.join(RUNTIMES)}")
    if runtime == "eager":
        if int8:
            raise ValueError("--int8 needs --runtime onnxruntime")
        return model
    with tempfile.TemporaryDirectory(prefix="vitkit-runtime-") as tmp:
        result = export_model(model, os.path.join(tmp, "model"), RUNTIMES[runtime], int8=int8, images=images,
                              runtime=runtime)
        opened = open_runtime(result.folder, runtime=runtime)
    opened.__dict__["source"] = model
    opened.parity = result.parity
    return opened
