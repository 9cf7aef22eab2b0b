"""Exporting a vitkit model to run outside eager PyTorch, with an automatic parity check in the exported model's own
runtime.

``export_model(model, out, fmt)`` writes a folder:
- ``model.onnx`` (ONNX, ``torch.onnx.export``: see ``_write_onnx`` for which exporter), ``model.pt2``
  (``torch.export.save``) or ``model.xml`` + ``model.bin`` (OpenVINO IR, converted from the ONNX graph);
- ``vitkit.json``: the model name, its config, the preprocessing (size, mean/std, crop, interpolation, channel order),
  the class names, the input/output names, the int8 scheme and why it was chosen, and the parity numbers the export
  was accepted with.
The ONNX file also carries the preprocessing and class names in its ``metadata_props``. Such a folder is a model:
``vitkit predict``, ``eval`` and ``bench`` run it directly (``vitkit.deploy.runtime.open_runtime``).

The batch dimension is dynamic. Before the folder is renamed into place the exported model is run in its own runtime
(ONNX Runtime, ``torch.export``'s module, OpenVINO asked for fp32) on random inputs at two batch sizes and on real
images when given, and compared with eager PyTorch:
- fp32 must agree to ``atol`` (1e-4);
- int8 (``vitkit.deploy.quantize``: ONNX Runtime dynamic or static, OpenVINO static through NNCF) and OpenVINO
  computing in bf16 (runtime ``openvino-bf16``) change the numbers by design: the logits must keep a cosine
  similarity >= 0.99 on every input, and the real images (``images``) their top-1 class, >= 99% of them or all but
  one (so 28 of the 29 shipped photos pass, and 1,980 of 2,000 images).
  Static int8 (calibrated) is gated on the real images only (the check images, else the calibration images): its
  activation ranges are fitted to images, and random noise falls outside them by construction (an OpenVINO int8
  DeiT measured cosine 0.95 on noise and 0.992 on the photos); the noise rows are still run and reported.
A model whose head is all zeros (random init: the ViT paper's zero head) has logits that do not depend on the input,
so comparing them proves nothing: its check compares the pre-logit features instead (a copy without its head,
exported the same way), and says so; the file written is the model as given. A failed check is a failed export:
nothing is left at ``out`` and ``ExportError`` carries the numbers.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import torch
from torch import Tensor, nn

__all__ = ["FORMATS", "ExportError", "Parity", "ExportResult", "export_model", "metadata_of", "check_parity"]

from vitkit.deploy.names import FORMATS, RUNTIMES

#: formats with an int8 export → whether it needs calibration images: ONNX Runtime's quantiser is dynamic or static
#: (QDQ), OpenVINO's (NNCF) static only
INT8_NEEDS_CALIBRATION = {"onnx": False, "openvino": True}

FILES = {"onnx": "model.onnx", "torch-export": "model.pt2", "openvino": "model.xml"}
INPUT, OUTPUT = "pixel_values", "logits"
MIN_COSINE = 0.99  # int8 and bf16: every input's logits keep their direction
IMAGE_BATCH = 32  # the check runs real images in batches of this size
MIN_TOP1 = 0.99  # ... and the real images their top-1 class: 99% of them, or all but one


class ExportError(RuntimeError):
    """The export failed or its parity check did not pass: the message's first line says why, the next lines give
    the numbers (``parity``, when the check ran)."""

    def __init__(self, message: str, parity: "Parity | None" = None):
        super().__init__(message)
        self.parity = parity


@dataclass
class Parity:
    """How the exported model agreed with eager PyTorch on each check input."""

    inputs: list[str] = field(default_factory=list)  # e.g. "random batch 1", "images (29)"
    max_abs_diff: list[float] = field(default_factory=list)
    cosine_min: list[float] = field(default_factory=list)
    top1_agreement: list[float] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)  # inputs in each batch
    real: list[bool] = field(default_factory=list)  # real images (the top-1 rule's inputs), not random noise
    atol: float = 1e-4
    precision: str = "fp32"  # fp32, int8 or bf16: what the exported model computes in, and so the rule it meets
    compared: str = "logits"  # "pre-logits" when the head is all zeros (see the module docstring)
    calibrated: bool = False  # static int8: activation ranges fitted to real images, so only those are gated

    @property
    def int8(self) -> bool:
        return self.precision == "int8"

    def add(self, name: str, ref: Tensor, got: Tensor, real: bool) -> None:
        """One row: ``got`` against the reference logits ``ref`` (N, classes) on the inputs called ``name``."""
        self.inputs.append(name)
        self.sizes.append(len(ref))
        self.real.append(real)
        self.max_abs_diff.append((got - ref).abs().max().item())
        self.cosine_min.append(torch.nn.functional.cosine_similarity(got, ref, dim=-1).min().item())
        self.top1_agreement.append((got.argmax(-1) == ref.argmax(-1)).float().mean().item())

    @staticmethod
    def allowed_top1_misses(n: int) -> int:
        return max(1, int(n * (1 - MIN_TOP1) + 1e-9))

    @property
    def passed(self) -> bool:
        return not self.failures()

    def failures(self) -> list[str]:
        """One short phrase per input that breaks the rule."""
        out = []
        for name, d, c, a, n, real in zip(self.inputs, self.max_abs_diff, self.cosine_min, self.top1_agreement,
                                          self.sizes, self.real):
            if self.precision == "fp32":
                if not d <= self.atol:
                    out.append(f"{name}: max |diff| {d:.2e} > {self.atol:g}")
                continue
            if self.calibrated and not real:  # noise lies outside the calibrated ranges by construction
                continue
            if not c >= MIN_COSINE:  # quantisation or bf16: the logits keep their direction
                out.append(f"{name}: min cosine {c:.4f} < {MIN_COSINE:g}")
            misses = round((1 - a) * n)
            if real and self.compared == "logits" and misses > self.allowed_top1_misses(n):  # features: no classes
                out.append(f"{name}: top-1 agreement {n - misses}/{n}")
        return out

    def rule(self) -> str:
        if self.precision == "fp32":
            return f"fp32: max |diff| <= {self.atol:g}"
        top1 = "" if self.compared != "logits" else \
            f", top-1 agreement on real images >= {MIN_TOP1:.0%} or all but one"
        inputs = "every real image (static ranges: random inputs are reported, not gated)" if self.calibrated \
            else "every input"
        return f"{self.precision}: cosine similarity >= {MIN_COSINE:g} on {inputs}{top1}"

    def summary(self) -> str:
        rows = [f"{name}: max |diff| {d:.2e}, min cosine {c:.6f}, top-1 agreement {a:.0%}"
                + (f" ({round(a * n)}/{n})" if n > 3 else "")
                for name, d, c, a, n in zip(self.inputs, self.max_abs_diff, self.cosine_min, self.top1_agreement,
                                            self.sizes or [0] * len(self.inputs))]
        if self.compared != "logits":
            rows.insert(0, "the head is all zeros, so every logit is the same for every input: compared the "
                           "pre-logit features (the model without its head, exported the same way)")
        return f"parity ({self.rule()}): {'passed' if self.passed else 'FAILED'}\n  " + "\n  ".join(rows)


@dataclass
class ExportResult:
    folder: str
    format: str
    parity: Parity
    int8: bool = False
    quantization: dict[str, Any] | None = None  # the int8 scheme, why it was chosen, what was measured


def metadata_of(model: nn.Module, fmt: str, int8: bool) -> dict[str, Any]:
    import vitkit
    from vitkit.config import to_dict
    return {"format": fmt, "vitkit_version": vitkit.__version__, "model": model.variant_name,
            "config": to_dict(model.cfg), "data_cfg": to_dict(dataclasses.asdict(model.data_cfg)),
            "class_names": model.class_names, "num_classes": model.num_classes,
            "input": INPUT, "output": OUTPUT, "int8": int8, "file": FILES[fmt]}


def _example(model: nn.Module, batch: int, seed: int = 0) -> Tensor:
    C, H, W = model.data_cfg.input_size
    return torch.randn(batch, C, H, W, generator=torch.Generator().manual_seed(seed))


# -------------------------------------------------------------------------------------------------- writers
def _write_onnx(model: nn.Module, path: str, opset: int) -> str:
    """Write ``model`` as ONNX with a dynamic batch axis; returns the exporter used.

    The TorchScript-based exporter (``dynamo=False``) is tried first: it is 10-20x faster than the ``torch.export``-
    based one here and its graphs run as fast in ONNX Runtime. If it cannot trace the model (or a future torch drops
    it), the ``torch.export``-based exporter runs instead. ``vitkit.json`` records which one wrote the file."""
    import logging
    import warnings
    x = _example(model, 2)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (x,), path, dynamo=False, input_names=[INPUT], output_names=[OUTPUT],
                              dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}}, opset_version=min(opset, 17))
        return "torchscript"
    except Exception:  # any tracing failure: the other exporter may handle the model
        for name in ("torch.onnx", "torch.export", "torch._dynamo"):
            logging.getLogger(name).setLevel(logging.ERROR)
        batch = torch.export.Dim("batch", min=1, max=4096)
        program = torch.onnx.export(model, (x,), dynamo=True, input_names=[INPUT], output_names=[OUTPUT],
                                    dynamic_shapes={"x": {0: batch}}, opset_version=opset, verbose=False)
        program.save(path)
        return "dynamo"


def _write_torch_export(model: nn.Module, path: str) -> str:
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(model, (_example(model, 2),), dynamic_shapes={"x": {0: batch}})
    torch.export.save(program, path)
    return "torch.export"


def _write_openvino(model: nn.Module, path: str, opset: int) -> str:
    import openvino as ov
    onnx_path = os.path.join(os.path.dirname(path), "_intermediate.onnx")
    exporter = _write_onnx(model, onnx_path, opset)
    ov_model = ov.convert_model(onnx_path)
    ov.save_model(ov_model, path, compress_to_fp16=False)
    for leftover in (onnx_path, onnx_path + ".data"):
        if os.path.exists(leftover):
            os.remove(leftover)
    return f"{exporter} ONNX → openvino.convert_model"


def _embed_onnx_metadata(path: str, meta: dict[str, Any]) -> None:
    import onnx
    proto = onnx.load(path)
    for key in ("model", "data_cfg", "class_names"):
        entry = proto.metadata_props.add()
        entry.key, entry.value = f"vitkit.{key}", json.dumps(meta[key])
    onnx.save(proto, path)


# ------------------------------------------------------------------------------------------------ the export
def export_model(model: nn.Module, out: str | os.PathLike, fmt: Literal["onnx", "torch-export", "openvino"] = "onnx",
                 *, int8: bool = False, opset: int = 18, images: Tensor | None = None, atol: float = 1e-4,
                 force: bool = False, calibration: Tensor | None = None, runtime: str | None = None) -> ExportResult:
    """Export ``model`` to the folder ``out`` and check it in its own runtime (see the module docstring).

    ``images``: preprocessed real images (B, C, H, W) for the parity check, besides random inputs.
    ``calibration``: preprocessed real images for static int8 quantisation (``vitkit.deploy.quantize``); without them
    int8 is dynamic. ``runtime``: the runtime the check runs in (default: the format's own, in fp32;
    ``openvino-bf16`` checks OpenVINO computing in bf16, with the agreement rule).
    """
    out = os.fspath(out)
    runtime = runtime or next(name for name, f in RUNTIMES.items() if f == fmt)
    _check_request(model, out, fmt, int8, force, calibration, runtime)
    model = model.eval()
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".export-", dir=parent)
    try:
        meta = _export_checked(model, staging, fmt, int8, opset, images, atol, calibration, runtime)
        parity = Parity(**meta["parity"])
        if not parity.passed:
            raise ExportError(f"the exported {fmt} model does not match eager PyTorch ({'; '.join(parity.failures())})"
                              f"; nothing was written\n" + parity.summary(), parity)
        if os.path.isdir(out):
            shutil.rmtree(out)  # only reached with force=True on a non-empty folder, or an empty one
        os.replace(staging, out)
        os.chmod(out, 0o777 & ~_umask())
    finally:
        if os.path.isdir(staging):
            shutil.rmtree(staging)
    return ExportResult(out, fmt, parity, int8, meta.get("quantization"))


def _export_checked(model: nn.Module, folder: str, fmt: str, int8: bool, opset: int, images: Tensor | None,
                    atol: float, calibration: Tensor | None, runtime: str) -> dict[str, Any]:
    """Write the model file and ``vitkit.json`` into ``folder``, the parity numbers included; return the metadata."""
    from vitkit.deploy.runtime import open_runtime
    path = os.path.join(folder, FILES[fmt])
    with torch.no_grad():
        exporter = _write(model, path, fmt, opset)
    meta = {**metadata_of(model, fmt, int8), "exporter": exporter}
    if int8:
        from vitkit.deploy.quantize import quantize
        meta["quantization"] = quantize(path, fmt, calibration)
    if fmt == "onnx":
        _embed_onnx_metadata(path, meta)
    opened = open_runtime(folder, meta, runtime=runtime)
    precision = "int8" if int8 else ("bf16" if runtime == "openvino-bf16" else "fp32")
    calibrated = int8 and calibration is not None
    if calibrated and images is None:
        images = calibration  # static int8 is gated on real images: without check images, on those it calibrated on
    if _head_is_zero(model):
        _check_constant_logits(model, opened, atol)
        parity = _check_body(model, folder, fmt, int8, opset, images, atol, calibration, runtime, precision)
    else:
        parity = check_parity(model, opened, images, atol, precision, calibrated)
    meta["parity"] = dataclasses.asdict(parity)
    if opened.note:
        meta["runtime_note"] = opened.note
    with open(os.path.join(folder, "vitkit.json"), "w") as f:
        json.dump(meta, f, indent=1)
    return meta


def _head_is_zero(model: nn.Module) -> bool:
    heads = model.classifiers() if hasattr(model, "classifiers") else []
    return bool(heads) and all(not head.weight.any() for head in heads)


def _check_constant_logits(model: nn.Module, opened: nn.Module, atol: float) -> None:
    """The file written still runs and gives the eager model's (input-independent) logits."""
    x = _example(model, 1, seed=1)
    with torch.no_grad():
        diff = (opened(x).float() - model(x).float()).abs().max().item()
    if diff > atol:
        raise ExportError(f"the exported model's logits differ from eager PyTorch by {diff:.2e} (> {atol:g}) for a "
                          f"model whose head is all zeros; nothing was written")


def _check_body(model: nn.Module, folder: str, fmt: str, int8: bool, opset: int, images: Tensor | None, atol: float,
                calibration: Tensor | None, runtime: str, precision: str) -> Parity:
    """Parity of the pre-logit features: a copy of ``model`` without its head, exported and checked the same way."""
    from vitkit.deploy.runtime import open_runtime
    body = copy.deepcopy(model)
    body.reset_classifier(0)
    with tempfile.TemporaryDirectory(prefix=".body-", dir=folder) as tmp:
        path = os.path.join(tmp, FILES[fmt])
        with torch.no_grad():
            _write(body, path, fmt, opset)
        meta = metadata_of(body, fmt, int8)
        if int8:
            from vitkit.deploy.quantize import quantize
            quantize(path, fmt, calibration)
        parity = check_parity(body, open_runtime(tmp, meta, runtime=runtime), images, atol, precision,
                              calibrated=int8 and calibration is not None)
    parity.compared = "pre-logits"
    return parity


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _check_request(model: nn.Module, out: str, fmt: str, int8: bool, force: bool, calibration: Tensor | None,
                   runtime: str) -> None:
    from vitkit.registry import get_spec
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}")
    if int8 and fmt not in INT8_NEEDS_CALIBRATION:
        raise ValueError(f"--int8 is written by ONNX Runtime's or OpenVINO's quantiser: use --format onnx or "
                         f"openvino, not {fmt}")
    if int8 and INT8_NEEDS_CALIBRATION[fmt] and calibration is None:
        raise ValueError(f"--format {fmt} --int8 is static int8 (NNCF): give calibration images with --calibrate DIR")
    if calibration is not None and not int8:
        raise ValueError("--calibrate calibrates int8 quantisation: add --int8")
    if RUNTIMES.get(runtime) != fmt:
        raise ValueError(f"runtime {runtime!r} does not run the {fmt} format")
    reason = type(model).unsupported_exports.get(fmt)  # declared by the family (FamilyModel)
    if reason:
        raise ExportError(f"{get_spec(model.variant_name).family} models cannot be exported to {fmt} yet: {reason}")
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)) and not force:
        raise ValueError(f"{out} exists and is not empty; choose another folder or pass --force to replace it")


def _write(model: nn.Module, path: str, fmt: str, opset: int) -> str:
    try:
        if fmt == "onnx":
            return _write_onnx(model, path, opset)
        if fmt == "torch-export":
            return _write_torch_export(model, path)
        return _write_openvino(model, path, opset)
    except ImportError as e:
        raise ExportError(f"exporting to {fmt} needs {e.name}: pip install 'vitkit[export]'") from None
    except Exception as e:  # the exporters raise many error types; the first line says what failed
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"{model.variant_name or type(model).__name__} could not be exported to {fmt}: "
                          f"{type(e).__name__}: {first}") from e


# ------------------------------------------------------------------------------------------------ the check
def check_parity(model: nn.Module, runtime, images: Tensor | None, atol: float = 1e-4,
                 precision: str = "fp32", calibrated: bool = False) -> Parity:
    """Compare ``runtime`` with eager ``model`` on random batches of 1 and 3 (the batch axis is dynamic) and on
    ``images``; ``precision`` (fp32, int8, bf16) selects the rule (see the module docstring); ``calibrated``: static
    int8, gated on the real images only."""
    checks: list[tuple[str, Tensor]] = [("random batch 1", _example(model, 1, seed=1)),
                                        ("random batch 3", _example(model, 3, seed=2))]
    if images is not None and len(images):
        checks.append((f"images ({len(images)})", images))
    parity = Parity(atol=atol, precision=precision, calibrated=calibrated)
    for name, x in checks:
        with torch.no_grad():  # images in batches of IMAGE_BATCH, as eval would run them (int8 scales are per batch)
            ref = torch.cat([model(b).float() for b in x.split(IMAGE_BATCH)])
            got = torch.cat([runtime(b).float() for b in x.split(IMAGE_BATCH)])
        parity.add(name, ref, got, real=name.startswith("images"))
    return parity


def check_exported(folder: str | os.PathLike, model: nn.Module, images: Sequence[Tensor] | None = None) -> Parity:
    """Re-run the parity check of an exported folder against ``model`` (e.g. after copying it elsewhere)."""
    from vitkit.deploy.runtime import open_runtime
    with open(os.path.join(os.fspath(folder), "vitkit.json")) as f:
        meta = json.load(f)
    batch = torch.stack(list(images)) if images else None
    precision = "int8" if meta.get("int8") else "fp32"
    calibrated = bool((meta.get("quantization") or {}).get("calibration_images"))
    return check_parity(model, open_runtime(os.fspath(folder), meta), batch, precision=precision,
                        calibrated=calibrated)
