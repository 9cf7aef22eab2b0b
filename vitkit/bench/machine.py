"""What this machine can do at best: matrix-multiply throughput and memory bandwidth.

A model's speed means little without the machine's ceiling next to it. ``GemmProbe`` times one large square
``torch.mm`` (2·n³ FLOPs); the benchmark runner interleaves such probes with the model's timed rounds, so the peak
and the model are measured under the same load on a shared machine. ``copy_bandwidth`` times a large tensor copy
(bytes read + bytes written per second), the ceiling of memory-bound operations (LayerNorm, GELU, residual adds).
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch

__all__ = ["synchronize", "GemmProbe", "gemm_peak", "copy_bandwidth", "machine_limits", "DTYPES", "CpuMonitor",
           "wait_for_quiet", "quiet_sample"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def synchronize(device: torch.device | str) -> None:
    """Wait for queued kernels (CUDA/XPU/MPS run asynchronously; CPU work is already done)."""
    device = torch.device(device)
    if device.type != "cpu":
        getattr(torch, device.type).synchronize(device)


class CpuMonitor:
    """What happened on the machine while a block of code ran (Linux; fields are ``None`` elsewhere).

    ``foreign_cores``: CPU used by *other* processes, in cores: all busy time of the machine (``/proc/stat``) minus
    this process's own (``/proc/self/stat``), divided by the wall time. On a shared machine it tells a clean
    measurement (≈ 0) from one that competed for the cores. Resolution is the kernel tick (10 ms), so it is
    meaningful for blocks of ~100 ms and more.
    ``minor_faults``: page faults of this process (first touches of freshly mapped memory; each costs a few µs).
    """

    _TICK = 100.0  # USER_HZ

    @staticmethod
    def _ticks() -> tuple[float, float] | None:
        try:
            with open("/proc/stat") as f:
                cpu = [float(v) for v in f.readline().split()[1:]]
            with open("/proc/self/stat") as f:
                own = f.read().rsplit(")", 1)[1].split()
        except (OSError, ValueError, IndexError):
            return None
        busy = sum(cpu) - cpu[3] - cpu[4]  # all but idle and iowait
        return busy, float(own[11]) + float(own[12])  # utime + stime (fields 14, 15)

    @staticmethod
    def _faults() -> int | None:
        try:
            import resource
            return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        except (ImportError, OSError):
            return None

    def __enter__(self) -> "CpuMonitor":
        self.foreign_cores: float | None = None
        self.minor_faults: int | None = None
        self._faults0, self._start, self._t0 = self._faults(), self._ticks(), time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        end, wall, faults = self._ticks(), time.perf_counter() - self._t0, self._faults()
        if self._start is not None and end is not None and wall > 0:
            foreign = (end[0] - self._start[0]) - (end[1] - self._start[1])
            self.foreign_cores = max(0.0, foreign / self._TICK / wall)
        if faults is not None and self._faults0 is not None:
            self.minor_faults = faults - self._faults0


def wait_for_quiet(threshold: float, deadline: float, poll: float = 0.5) -> bool:
    """Sleep until other processes use at most ``threshold`` cores (sampled over ``poll`` s) or ``deadline``
    (``time.monotonic``) passes; True if the machine became quiet (or its load cannot be read)."""
    while time.monotonic() < deadline:
        with CpuMonitor() as mon:
            time.sleep(poll)
        if mon.foreign_cores is None or mon.foreign_cores <= threshold:
            return True
    return False


def quiet_sample(measure: Callable[[], float], quiet: float | None, deadline: float) -> float:
    """``measure()`` once the machine is quiet; repeated while other processes disturb it (until ``deadline``)."""
    while True:
        if quiet is not None:
            wait_for_quiet(quiet, deadline)
        with CpuMonitor() as mon:
            value = measure()
        cores = mon.foreign_cores
        if quiet is None or cores is None or cores <= quiet or time.monotonic() >= deadline:
            return value


class GemmProbe:
    """One n×n @ n×n product in ``dtype`` on ``device``; ``sample()`` returns its throughput in GFLOP/s."""

    def __init__(self, n: int = 2048, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        gen = torch.Generator().manual_seed(0)
        self.n, self.device = n, torch.device(device)
        self.a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
        self.b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
        self.c = torch.empty(n, n, device=device, dtype=dtype)
        torch.mm(self.a, self.b, out=self.c)  # first call: library initialisation, page faults of c

    def sample(self) -> float:
        synchronize(self.device)
        start = time.perf_counter()
        torch.mm(self.a, self.b, out=self.c)
        synchronize(self.device)
        return 2 * self.n ** 3 / (time.perf_counter() - start) / 1e9


def _stats(samples: list[float]) -> dict[str, float]:
    return {"median": statistics.median(samples), "best": max(samples), "n": len(samples)}


def gemm_size(dtype: torch.dtype, device: torch.device | str, seconds: float, largest: int = 4096) -> int:
    """The n (a multiple of 256, 512..``largest``) whose n×n product takes about ``seconds`` here: one 512² product
    is timed and the size scaled by the cube root (emulated bf16 on an AVX2 CPU is ~10x slower than fp32, so a fixed
    4096² would take seconds per sample)."""
    probe = GemmProbe(512, dtype, device)
    rate = max(probe.sample(), 1e-3) * 1e9  # FLOP/s
    n = int((rate * seconds / 2) ** (1 / 3)) // 256 * 256
    return max(512, min(largest, n))


def gemm_peak(dtype: torch.dtype = torch.float32, sizes: tuple[int, ...] = (2048, 3072, 4096), repeats: int = 5,
              device: torch.device | str = "cpu", quiet: float | None = None,
              deadline: float = float("inf")) -> dict[str, float]:
    """Median and best GFLOP/s over ``repeats`` products of each size (at the current ``torch.get_num_threads()``);
    sizes after ``deadline`` (``time.monotonic``) are skipped once one has been measured."""
    samples = []
    for n in sizes:
        if samples and time.monotonic() >= deadline:
            break
        probe = GemmProbe(n, dtype, device)
        samples += [quiet_sample(probe.sample, quiet, deadline) for _ in range(repeats)]
    return _stats(samples)


def copy_bandwidth(mbytes: int = 1024, repeats: int = 5, device: torch.device | str = "cpu",
                   quiet: float | None = None, deadline: float = float("inf")) -> dict[str, float]:
    """GB/s of ``dst.copy_(src)`` on a ``mbytes`` MB tensor, counting the bytes read plus the bytes written."""
    n = mbytes * 2 ** 20 // 4
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch every page once

    def rate() -> float:
        synchronize(device)
        start = time.perf_counter()
        dst.copy_(src)
        synchronize(device)
        return 2 * src.numel() * 4 / (time.perf_counter() - start) / 1e9
    return _stats([quiet_sample(rate, quiet, deadline) for _ in range(repeats)])


def machine_limits(threads: tuple[int, ...] = (1, 2), device: torch.device | str = "cpu", repeats: int = 5,
                   quiet: float | None = None, max_wait: float = 600.0, seconds: float = 30.0,
                   progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """fp32 and bf16 GEMM GFLOP/s and copy bandwidth at each thread count (the thread setting is restored).

    The whole measurement takes about ``seconds``: each GEMM measurement gets an equal share, its matrix size chosen
    so that ``repeats`` products fit in it (``gemm_size``). ``progress`` receives one line per finished measurement.
    With ``quiet`` (cores), every sample waits for other processes to use at most that much CPU and is repeated
    if they disturbed it, for up to ``max_wait`` seconds in total.
    """
    before = torch.get_num_threads()
    deadline = time.monotonic() + max_wait
    share = seconds / (2 * len(threads) + 1)  # two GEMM measurements per thread count, copies in the rest
    out: dict[str, Any] = {"device": str(device), "torch": torch.__version__,
                           "cpu_capability": torch.backends.cpu.get_cpu_capability(), "by_threads": {},
                           "seconds_allowed": seconds}
    start = time.monotonic()
    say = progress or (lambda message: None)
    try:
        for t in threads:
            torch.set_num_threads(t)
            row: dict[str, Any] = {}
            for key, dtype in (("gemm_fp32_gflops", torch.float32), ("gemm_bf16_gflops", torch.bfloat16)):
                n = gemm_size(dtype, device, share / (repeats + 1))
                row[key] = {**gemm_peak(dtype, (n,), repeats, device, quiet, deadline), "size": n}
                say(f"threads={t}: {key.split('_')[1]} GEMM {row[key]['median']:.1f} GFLOP/s ({repeats} products "
                    f"of {n}x{n}; {time.monotonic() - start:.0f} s)")
            row["copy_gbps"] = copy_bandwidth(256, repeats, device, quiet, deadline)
            say(f"threads={t}: copy {row['copy_gbps']['median']:.1f} GB/s ({time.monotonic() - start:.0f} s)")
            out["by_threads"][t] = row
    finally:
        torch.set_num_threads(before)
    out["seconds"] = time.monotonic() - start
    return out
