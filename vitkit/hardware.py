"""What the device running a command can do, asked once and shared by train, eval, predict and bench: which device
a name means (validated: a device this build or machine lacks is a one-line error), whether bf16 runs natively
(mixed precision ``auto``), and the one line that names the machine beside every measured number.

bf16 on a CPU is fast only with native support (AVX-512 BF16 / AMX, or AVX-512 where oneDNN converts cheaply:
``torch.ops.mkldnn._is_mkldnn_bf16_supported()``); on an AVX2-only CPU it is emulated and several times slower than
fp32 (measured on an AVX2-only AMD EPYC: DeiT-Tiny inference 1.12 vs 2.86 img/s). So ``auto`` picks bf16 where it
is native and fp32 elsewhere, and never assumes.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
from typing import Iterator

import torch

__all__ = ["AMP_CHOICES", "CPU_KINDS", "simulate_cpu", "cpu_flags", "bf16_native", "resolve_amp", "amp_dtype",
           "parse_device", "cpu_info", "machine_line", "precision_line"]

log = logging.getLogger(__name__)

AMP_CHOICES = ("auto", "bf16", "fp16", "none")  # none = full fp32


# The three CPU kinds vitkit is built and tested on, as the probe describes them. ``VITKIT_CPU_KIND`` (or
# ``simulate_cpu``) makes the probe answer as one of them, so that a branch chosen by the hardware (what ``auto``
# picks, the int8 weight scheme, OpenVINO's precision) is tested on every machine, not only on the CPU at hand.
# The kernels that actually run are still the machine's own: only vitkit's decisions follow the simulated kind.
CPU_KINDS: dict[str, dict[str, bool]] = {
    "avx2": {"bf16_native": False, "avx512": False, "vnni": False, "amx": False},        # AMD EPYC (Zen 1-3)
    "avx512-bf16": {"bf16_native": True, "avx512": True, "vnni": True, "amx": False},   # AMD EPYC (Zen 4+)
    "amx": {"bf16_native": True, "avx512": True, "vnni": True, "amx": True},            # Intel Xeon (Sapphire Rapids+)
}
CPU_KIND_ENV = "VITKIT_CPU_KIND"


def _simulated_kind() -> str | None:
    kind = os.environ.get(CPU_KIND_ENV, "").strip().lower()
    if not kind:
        return None
    if kind not in CPU_KINDS:
        raise ValueError(f"{CPU_KIND_ENV}={kind!r}: not a CPU kind (use one of {', '.join(CPU_KINDS)})")
    return kind


@contextlib.contextmanager
def simulate_cpu(kind: str) -> Iterator[None]:
    """Within the block (and in subprocesses started in it), the probe answers as a CPU of ``kind``."""
    if kind not in CPU_KINDS:
        raise ValueError(f"not a CPU kind: {kind!r} (use one of {', '.join(CPU_KINDS)})")
    saved = os.environ.get(CPU_KIND_ENV)
    os.environ[CPU_KIND_ENV] = kind
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(CPU_KIND_ENV, None)
        else:
            os.environ[CPU_KIND_ENV] = saved


def cpu_flags() -> dict[str, bool]:
    """bf16_native, avx512, vnni, amx of this CPU, or of the simulated kind (``VITKIT_CPU_KIND``)."""
    kind = _simulated_kind()
    return dict(CPU_KINDS[kind]) if kind else dict(_real_cpu_flags())


@functools.lru_cache(maxsize=1)
def _real_cpu_flags() -> dict[str, bool]:
    flags = _proc_cpuinfo()[1]
    capability = torch.backends.cpu.get_cpu_capability()
    try:
        bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (RuntimeError, AttributeError):
        bf16 = False
    return {"bf16_native": bf16, "avx512": "avx512f" in flags or capability.startswith("AVX512"),
            "vnni": bool({"avx512_vnni", "avx_vnni", "amx_int8"} & flags), "amx": "amx_bf16" in flags}


def bf16_native(device: torch.device | str = "cpu") -> bool:
    """True when ``device`` computes in bf16 natively (fast), False when it would emulate it or cannot say."""
    device = torch.device(device)
    try:
        if device.type == "cpu":
            return cpu_flags()["bf16_native"]
        if device.type == "cuda":
            return bool(torch.cuda.is_bf16_supported())
    except (RuntimeError, AttributeError):
        return False
    return False


def resolve_amp(amp: str, device: torch.device | str) -> str:
    """``auto`` → ``bf16`` where ``bf16_native(device)``, else ``none`` (fp32); any other choice is kept."""
    if amp not in AMP_CHOICES:
        raise ValueError(f"mixed precision must be one of {', '.join(AMP_CHOICES)}, got {amp!r}")
    if amp != "auto":
        return amp
    return "bf16" if bf16_native(device) else "none"


def amp_dtype(amp: str) -> torch.dtype | None:
    """The autocast dtype of a resolved choice (``none`` → None: full fp32)."""
    return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def precision_line(requested: str, resolved: str, device: torch.device | str) -> str:
    """The line a command shows about its precision (and why, when ``auto`` chose)."""
    name = "fp32" if resolved == "none" else resolved
    if requested != "auto":
        return f"precision: {name}"
    native = "native" if bf16_native(device) else "not native"
    where = machine_line() if torch.device(device).type == "cpu" else str(device)
    return f"precision: auto -> {name} (bf16 is {native} on {where})"


def parse_device(text: str | None, what: str = "--device") -> torch.device:
    """A device name the user gave, checked: a malformed name or one this build/machine lacks raises ValueError
    naming ``what``. ``None`` or ``auto``: CUDA if available, else Apple MPS, else the CPU."""
    if text is None or text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise ValueError(f"{what} {text}: not a device name (use cpu, cuda, cuda:N or mps)") from None
    if device.type == "cuda":
        if not torch.backends.cuda.is_built():
            raise ValueError(f"{what} {text}: this torch build has no CUDA support (torch {torch.__version__}); "
                             f"use cpu")
        if not torch.cuda.is_available():
            raise ValueError(f"{what} {text}: no CUDA GPU is visible to this process; use cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{what} {text}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ValueError(f"{what} {text}: Apple MPS is not available here; use cpu")
    elif device.type not in ("cpu", "meta"):
        raise ValueError(f"{what} {text}: vitkit runs on cpu, cuda or mps, not {device.type}")
    return device


@functools.lru_cache(maxsize=1)
def _proc_cpuinfo() -> tuple[str, frozenset[str]]:
    """The model name and flags of the first CPU in /proc/cpuinfo (empty where there is none)."""
    model, flags = "", frozenset()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and not model:
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = frozenset(value.split())
    except OSError:
        pass
    return model, flags


def cpu_info() -> dict[str, object]:
    """Model name, usable cores, and the probe's flags (bf16 native, AVX-512, VNNI, AMX); a simulated kind
    (``VITKIT_CPU_KIND``) is named in the model string, so no number is ever attributed to the wrong CPU."""
    import platform
    model = re.sub(r"\s+", " ", _proc_cpuinfo()[0] or platform.processor() or platform.machine() or "unknown CPU")
    kind = _simulated_kind()
    if kind:
        model = f"{model} (simulating {kind})"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return {"model": model, "cores": cores, **cpu_flags(), "capability": torch.backends.cpu.get_cpu_capability()}


def machine_line() -> str:
    """e.g. ``AMD EPYC, 2 cores, bf16 native: no, AVX-512: no, VNNI: no, AMX: no``: printed beside every measured number."""
    c = cpu_info()
    yes = {True: "yes", False: "no"}
    return (f"{c['model']}, {c['cores']} core{'s' if c['cores'] != 1 else ''}, bf16 native: {yes[c['bf16_native']]}, "
            f"AVX-512: {yes[c['avx512']]}, VNNI: {yes[c['vnni']]}, AMX: {yes[c['amx']]}")
