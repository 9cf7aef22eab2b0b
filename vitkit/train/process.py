"""Process-level settings a run needs, set explicitly from the recipe and restored afterwards: intra-op threads,
deterministic algorithms, mixed precision, and the SIGINT/SIGTERM handlers that make a stop land on a step boundary.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
from typing import Callable, Iterator

import torch

from vitkit.interrupts import SIGNALS, Aborted, first, note, pending
from vitkit.train.config import TrainSection

__all__ = ["runtime", "default_threads", "autocast", "StopFlag", "Aborted", "process_age", "ignore_signals_in_worker",
           "load_average", "oversubscription"]

log = logging.getLogger(__name__)


def default_threads(local_processes: int = 1) -> int:
    """The CPU cores this process may use (its affinity mask, not the host's count), shared among local processes."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, local_processes))


def load_average() -> float:
    """The 1-minute load average (runnable threads of every process), 0 where the system does not say."""
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return 0.0


def oversubscription(threads: int, load: float, cores: int | None = None, wait_policy: str | None = None
                     ) -> str | None:
    """A warning when other processes compete for the cores this process's ``threads`` intra-op threads use (a load
    average above the cores by more than one thread), else None.

    Measured with ``(randn(128, 256) @ randn(256, 256)).relu_()`` × 20,000 per process, two 2-core AMD EPYC VMs
    (AVX2): one process of 2 threads alone 2.4-2.6 s. Two processes of 2 threads each: 18-26 s each on one VM, 9.6 s
    on the other (Zen 3): 3.7-10x the time alone, where sharing fairly would cost 2x: OpenMP threads spin-wait for a
    busy core. With ``OMP_WAIT_POLICY=PASSIVE`` the two took 4.8-5.4 s (about 2x; but one alone then took 5.3-5.8 s);
    with 1 thread each, 4.1-7.8 s. Nothing to say with one thread, or with the passive policy set already."""
    cores = cores or default_threads()
    if threads <= 1 or load <= cores + 1 or (wait_policy or "").strip().upper() == "PASSIVE":
        return None
    return (f"oversubscribed CPU: load average {load:.1f} on {cores} cores while this run uses {threads} threads: "
            f"waiting OpenMP threads spin on busy cores, so steps get 4-10x slower, not 2x. When runs share cores, "
            f"start each with OMP_WAIT_POLICY=PASSIVE (~2x; but ~2x slower on an idle machine) or set "
            f"train.threads: 1 (~2-3x)")


@contextlib.contextmanager
def runtime(cfg: TrainSection, device: torch.device, local_processes: int = 1) -> Iterator[int]:
    """Set threads and (optionally) deterministic algorithms for the run; yields the thread count; restores both.

    Only what was changed is restored: ``torch.use_deterministic_algorithms`` imports torch._inductor (and sympy), and
    a cleanup that imports must not run while a signal unwinds a half-finished import."""
    threads = cfg.threads or default_threads(local_processes)
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with _deterministic(cfg.deterministic, device):
            yield threads
    finally:
        torch.set_num_threads(saved_threads)


@contextlib.contextmanager
def _deterministic(on: bool, device: torch.device) -> Iterator[None]:
    """Deterministic algorithms (and no cuDNN benchmarking) inside the block when ``on``; a no-op otherwise."""
    if not on:
        yield
        return
    saved = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark)
    if device.type == "cuda":  # cuBLAS reads this when it creates its workspace (PyTorch reproducibility notes)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0])
        torch.backends.cudnn.benchmark = saved[1]


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def process_age() -> float:
    """Seconds since this process started (Linux ``/proc``; 0 elsewhere): the interpreter and torch imports that a
    command's wall clock includes before any vitkit code runs."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = float(f.read().rsplit(")", 1)[1].split()[19])  # field 22: starttime
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


class StopFlag:
    """SIGINT / SIGTERM set a flag that the loop reads at the next step boundary (and evaluation loops between
    batches); a second SIGINT interrupts at once with ``Aborted``, whose message comes from ``describe`` (the
    previous checkpoint stays intact: checkpoints are written atomically)."""

    SIGNALS = SIGNALS

    def __init__(self, describe: Callable[[], str] | None = None):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}
        self._describe = describe

    def _handle(self, signum, frame) -> None:
        if first() is not None:  # already aborting: the unwinding is not interrupted again
            return
        if self.signum is not None and signum == signal.SIGINT:
            saved = self._describe() if self._describe else "the last checkpoint written is intact"
            raise note(Aborted(f"aborted by a second Ctrl-C: {saved}"))
        self.signum = signum
        log.warning("received %s: stopping at the next step or evaluation batch and saving a checkpoint "
                    "(Ctrl-C again to abort)", signal.Signals(signum).name)

    def __enter__(self) -> "StopFlag":
        pending()  # a signal before training whose Aborted an import swallowed: stop before the first step
        for s in self.SIGNALS:
            try:
                self._previous[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread: run without handlers
                pass
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""


def ignore_signals_in_worker(worker_id: int) -> None:
    """DataLoader workers leave SIGINT/SIGTERM to the main process, which stops the run cleanly (a Ctrl-C reaches
    the whole process group; a worker dying on it would crash the main process mid-step)."""
    for s in StopFlag.SIGNALS:
        signal.signal(s, signal.SIG_IGN)
