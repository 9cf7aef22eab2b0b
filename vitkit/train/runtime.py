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

from vitkit.train.config import TrainSection

__all__ = ["runtime", "default_threads", "autocast", "StopFlag", "Aborted", "process_age", "ignore_signals_in_worker"]

log = logging.getLogger(__name__)


def default_threads(local_processes: int = 1) -> int:
    """The CPU cores this process may use (its affinity mask, not the host's count), shared among local processes."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, local_processes))


@contextlib.contextmanager
def runtime(cfg: TrainSection, device: torch.device, local_processes: int = 1) -> Iterator[int]:
    """Set threads and (optionally) deterministic algorithms for the run; yields the thread count; restores both."""
    threads = cfg.threads or default_threads(local_processes)
    saved = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
             torch.backends.cudnn.benchmark)
    torch.set_num_threads(threads)
    if cfg.deterministic:
        if device.type == "cuda":  # cuBLAS reads this when it creates its workspace (PyTorch reproducibility notes)
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    try:
        yield threads
    finally:
        torch.set_num_threads(saved[0])
        torch.use_deterministic_algorithms(saved[1])
        torch.backends.cudnn.benchmark = saved[2]


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


class Aborted(KeyboardInterrupt):
    """A second Ctrl-C (or a signal before training started): the run stops at once; the message says what was
    saved and what was not. ``signum`` gives the exit status 128 + signum."""

    def __init__(self, message: str, signum: int = signal.SIGINT):
        super().__init__(message)
        self.signum = int(signum)


class StopFlag:
    """SIGINT / SIGTERM set a flag that the loop reads at the next step boundary (and evaluation loops between
    batches); a second SIGINT interrupts at once with ``Aborted``, whose message comes from ``describe`` (the
    previous checkpoint stays intact: checkpoints are written atomically)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, describe: Callable[[], str] | None = None):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}
        self._describe = describe

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            saved = self._describe() if self._describe else "the last checkpoint written is intact"
            raise Aborted(f"aborted by a second Ctrl-C: {saved}")
        self.signum = signum
        log.warning("received %s: stopping at the next step or evaluation batch and saving a checkpoint "
                    "(Ctrl-C again to abort)", signal.Signals(signum).name)

    def __enter__(self) -> "StopFlag":
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
