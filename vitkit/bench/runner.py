"""Throughput, latency and peak memory of one training or inference step.

A *step* is one batch: ``infer`` = a forward pass under ``torch.inference_mode``; ``train`` = forward, cross-entropy
on fixed random labels, backward and an AdamW step. ``bf16`` wraps the forward (and loss) in
``torch.autocast(device_type=..., dtype=torch.bfloat16)``; weights and optimizer state stay fp32. ``compile`` wraps
the model in ``torch.compile`` (default mode), so the first warm-up step includes the compilation. ``channels_last``
puts the model's 4-d weights and the batch in NHWC memory order (``torch.channels_last``, as ``train.channels_last``
does), which is what convolutions care about (``FamilyModel.convolutional``).

Timing protocol for a shared machine: every step is timed on its own (``perf_counter`` around a synchronised step),
several models are timed in interleaved rounds whose order alternates (A B, B A, A B, …) so that a load change
hits all of them alike, a GEMM probe (``machine.GemmProbe``) runs between rounds so the machine's peak is measured
under the same load, and the statistics are medians (plus the 90th percentile of the latency).

Peak memory of a step: on CUDA ``torch.cuda.max_memory_allocated`` above what was allocated before the step; on
Linux CPUs the growth of the resident set: freed heap memory is returned first (glibc ``malloc_trim``), the
high-water mark is reset (``/proc/self/clear_refs``), and ``VmHWM - VmRSS(before)`` is read after one step.
"""
from __future__ import annotations

import contextlib
import copy
import ctypes
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitkit.bench.flops import count_flops
from vitkit.bench.machine import DTYPES, CpuMonitor, GemmProbe, synchronize, wait_for_quiet

__all__ = ["BenchSettings", "BenchResult", "Timings", "make_step", "time_step", "interleave", "peak_memory_mb",
           "benchmark", "logits_of", "summarize", "step_flops", "warm_up",
           "run_interleaved"]

Step = Callable[[], None]


@dataclass(frozen=True)
class BenchSettings:
    batch_size: int = 8
    dtype: Literal["fp32", "bf16"] = "fp32"
    compile: bool = False
    mode: Literal["infer", "train"] = "infer"
    channels_last: bool = False  # the model's 4-d weights and the batch in NHWC memory order
    warmup: int = 3
    iters: int = 10
    device: str = "cpu"
    probes: int = 10  # GEMM-peak samples spread over the timed rounds (0 = no peak measurement)
    probe_size: int = 2048
    quiet: float | None = None  # wait for / repeat rounds until other processes use at most this many cores
    max_wait: float = 600.0  # seconds after which quiet mode accepts every round

    def __post_init__(self) -> None:
        if self.dtype not in ("fp32", "bf16"):
            raise ValueError(f"dtype must be fp32 or bf16, got {self.dtype!r}")
        if self.mode not in ("infer", "train"):
            raise ValueError(f"mode must be infer or train, got {self.mode!r}")
        if self.batch_size < 1 or self.iters < 1 or self.warmup < 0:
            raise ValueError("batch_size and iters must be >= 1, warmup >= 0")


@dataclass
class BenchResult:
    """One model's numbers. Latencies are per batch; FLOPs are per image (2 × MACs, the step's own kind)."""

    label: str
    images_per_s: float
    latency_ms_median: float
    latency_ms_p90: float
    latency_ms_min: float
    peak_mem_mb: float | None
    first_step_s: float  # the first warm-up step (includes torch.compile's compilation)
    foreign_cores: float | None = None  # median CPU cores used by other processes during the timed steps
    minor_faults: float | None = None  # median page faults per timed step (fresh memory touched by the step)
    discarded_rounds: int = 0  # rounds repeated because other processes disturbed them (quiet mode)
    step_gflops_per_image: float | None = None  # forward (infer) or forward + backward (train) FLOPs / 1e9
    achieved_gflops: float | None = None  # step FLOPs × images/s
    peak_gflops: float | None = None  # median GEMM-probe GFLOP/s during this run (the step's dtype)
    peak_fraction: float | None = None  # achieved / peak_gflops
    times_ms: list[float] = field(default_factory=list)
    foreign_cores_per_step: list[float | None] = field(default_factory=list)
    latency_ms_p99: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def logits_of(out: Any) -> Tensor:
    """The logits of a vitkit model (a tensor), a transformers model (``.logits``) or a tuple (first item)."""
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


def _autocast(settings: BenchSettings):
    if settings.dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(settings.device).type, dtype=DTYPES[settings.dtype])


def make_step(model: nn.Module, x: Tensor, settings: BenchSettings, num_classes: int | None = None) -> Step:
    """A closure running one step of ``model`` on the batch ``x`` (the model is put in eval or train mode; with
    ``settings.channels_last`` its 4-d weights and ``x`` are made NHWC first)."""
    if settings.channels_last:
        model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)  # (B, C, H, W), NHWC strides
    run = torch.compile(model) if settings.compile else model
    if settings.mode == "infer":
        model.eval()

        def infer() -> None:
            with torch.inference_mode(), _autocast(settings):
                logits_of(run(x))
        return infer

    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    labels = torch.arange(x.shape[0], device=x.device) % num_classes if num_classes and num_classes > 1 else None

    def train() -> None:
        with _autocast(settings):
            out = logits_of(run(x)).float()
            loss = F.cross_entropy(out, labels) if labels is not None else out.square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return train


def time_step(step: Step, device: torch.device | str) -> float:
    """Seconds for one synchronised step."""
    synchronize(device)
    start = time.perf_counter()
    step()
    synchronize(device)
    return time.perf_counter() - start


@dataclass
class Timings:
    """Per-step seconds and the other processes' CPU use (cores) during each step, by model; GEMM probe samples;
    rounds thrown away because another process disturbed them (``quiet`` mode)."""

    times: dict[str, list[float]]
    foreign: dict[str, list[float | None]]
    faults: dict[str, list[int | None]]
    probe_gflops: list[float]
    discarded_rounds: int = 0


def interleave(steps: dict[str, Step], iters: int, device: torch.device | str, probe: GemmProbe | None = None,
               probes: int = 0, quiet: float | None = None, max_wait: float = 600.0, settle: int = 0) -> Timings:
    """Time ``iters`` rounds; each round runs every step once, in an order that alternates between rounds
    (A B, B A, …), and a GEMM probe runs between rounds (``probes`` of them, spread evenly).

    ``settle``: untimed runs of each step right before its timed one. Needed when the steps run in different
    runtimes: a runtime's worker threads keep spinning after its step returns (ONNX Runtime's intra-op pool does by
    default), and would slow whatever is timed next (eager DeiT-Tiny at 128 px, batch 8: 168 img/s alone, 80 right
    after an ONNX Runtime step; EPYC-AVX2, 2 threads).

    With ``quiet`` (cores), each round waits until other processes use at most that much CPU, and a round (or a
    probe) during which they used more is thrown away and repeated; after ``max_wait`` seconds every round counts.
    """
    out = Timings({name: [] for name in steps}, {name: [] for name in steps}, {name: [] for name in steps}, [])
    every = max(1, math.ceil(iters / probes)) if probe is not None and probes > 0 else 0
    names = list(steps)
    deadline = time.monotonic() + max_wait

    def disturbed(cores: float | None) -> bool:
        return quiet is not None and cores is not None and cores > quiet and time.monotonic() < deadline

    r = 0
    while r < iters:
        if quiet is not None:
            wait_for_quiet(quiet, deadline)
        times, mons = {}, {}
        for name in (names if r % 2 == 0 else names[::-1]):
            for _ in range(settle):
                steps[name]()
            with CpuMonitor() as mons[name]:
                times[name] = time_step(steps[name], device)
        if any(disturbed(m.foreign_cores) for m in mons.values()):
            out.discarded_rounds += 1
            continue
        for name in names:
            out.times[name].append(times[name])
            out.foreign[name].append(mons[name].foreign_cores)
            out.faults[name].append(mons[name].minor_faults)
        if every and r % every == 0:
            with CpuMonitor() as mon:
                sample = probe.sample()
            if not disturbed(mon.foreign_cores):
                out.probe_gflops.append(sample)
        r += 1
    return out


# --------------------------------------------------------------------------------------------------- memory
def _proc_status_kb(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_rss_peak() -> bool:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap memory back, so the baseline is what is live
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def peak_memory_mb(step: Step, device: torch.device | str) -> float | None:
    """Memory one step needs above what is held before it (MiB); None where it cannot be measured."""
    device = torch.device(device)
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20
    if device.type != "cpu" or not _reset_rss_peak():
        return None
    base = _proc_status_kb("VmRSS")
    step()
    peak = _proc_status_kb("VmHWM")
    return None if base is None or peak is None else max(0, peak - base) / 1024


# ------------------------------------------------------------------------------------------------ statistics
def summarize(label: str, times: list[float], batch_size: int, first_step_s: float = float("nan"),
              peak_mem_mb: float | None = None, flops_per_image: float | None = None,
              peak_gflops: float | None = None, foreign: list[float | None] | None = None,
              faults: list[int | None] | None = None) -> BenchResult:
    ms = sorted(t * 1e3 for t in times)
    median = statistics.median(ms)
    p90 = ms[min(len(ms) - 1, math.ceil(0.9 * len(ms)) - 1)]
    p99 = ms[min(len(ms) - 1, math.ceil(0.99 * len(ms)) - 1)]
    ips = batch_size / (median / 1e3)
    achieved = flops_per_image * ips / 1e9 if flops_per_image else None
    loads = [f for f in foreign or [] if f is not None]
    flts = [f for f in faults or [] if f is not None]
    return BenchResult(
        label, images_per_s=ips, latency_ms_median=median, latency_ms_p90=p90, latency_ms_min=ms[0],
        peak_mem_mb=peak_mem_mb, first_step_s=first_step_s, foreign_cores=statistics.median(loads) if loads else None,
        minor_faults=statistics.median(flts) if flts else None,
        step_gflops_per_image=flops_per_image / 1e9 if flops_per_image else None, achieved_gflops=achieved,
        peak_gflops=peak_gflops, peak_fraction=achieved / peak_gflops if achieved and peak_gflops else None,
        times_ms=[t * 1e3 for t in times], foreign_cores_per_step=list(foreign or []), latency_ms_p99=p99)


def step_flops(model: nn.Module, input_size: tuple[int, int, int], mode: str) -> int | None:
    """FLOPs per image of one step, counted on a meta-device twin of a vitkit model (None for other models)."""
    from vitkit.deploy.runtime import RuntimeModel
    from vitkit.families.contract import FamilyModel
    if isinstance(model, RuntimeModel) and model.source is not None:
        model = model.source  # an exported model computes what its eager source computes
    if not isinstance(model, FamilyModel):
        return None
    with torch.device("meta"):
        twin = type(model)(copy.deepcopy(model.cfg))
    return count_flops(twin, input_size, backward=(mode == "train"))


def warm_up(steps: dict[str, Step], settings: BenchSettings) -> dict[str, float]:
    """Run the warm-up steps (interleaved); return the duration of each model's first step."""
    first = {name: time_step(step, settings.device) for name, step in steps.items()}
    for _ in range(max(0, settings.warmup - 1)):
        for step in steps.values():
            step()
    return first


def run_interleaved(steps: dict[str, Step], settings: BenchSettings, settle: int = 0) -> Timings:
    """``interleave`` with the settings' rounds, probes and quiet mode (``settle``: see ``interleave``)."""
    probe = GemmProbe(settings.probe_size, DTYPES[settings.dtype], settings.device) if settings.probes else None
    return interleave(steps, settings.iters, settings.device, probe, settings.probes, settings.quiet,
                      settings.max_wait, settle)


def benchmark(model: nn.Module, settings: BenchSettings = BenchSettings(),
              input_size: tuple[int, int, int] | None = None, label: str = "vitkit",
              flops_per_image: int | None = None) -> BenchResult:
    """Benchmark one model: warm-up, one memory-measured step, then ``settings.iters`` timed steps with GEMM probes.

    ``input_size`` (C, H, W) defaults to ``model.data_cfg.input_size``; ``flops_per_image`` to the count of
    ``step_flops`` (vitkit models only).
    """
    input_size = tuple(input_size or model.data_cfg.input_size)
    model.to(settings.device)
    x = torch.randn(settings.batch_size, *input_size, generator=torch.Generator().manual_seed(0)).to(settings.device)
    step = make_step(model, x, settings, getattr(model, "num_classes", None))
    if flops_per_image is None:
        flops_per_image = step_flops(model, input_size, settings.mode)
    first = warm_up({label: step}, settings)[label]
    mem = peak_memory_mb(step, settings.device)
    timed = run_interleaved({label: step}, settings)
    peak = statistics.median(timed.probe_gflops) if timed.probe_gflops else None
    res = summarize(label, timed.times[label], settings.batch_size, first, mem, flops_per_image, peak,
                    timed.foreign[label], timed.faults[label])
    res.discarded_rounds = timed.discarded_rounds
    return res
