"""Progress of long operations (downloads, evaluation, feature extraction, model statistics): a tqdm bar on a
terminal; elsewhere (a log file, CI, a pipe) a plain line every ``interval`` seconds and one at the end, never a
carriage return."""
from __future__ import annotations

import logging
import sys
import time
from typing import Any, Iterable, Iterator

__all__ = ["progress", "PlainProgress"]

log = logging.getLogger("vitkit")


class PlainProgress:
    """The part of tqdm's interface vitkit uses, as periodic log lines ``desc: n/total (p%), elapsed, rate``."""

    def __init__(self, iterable: Iterable | None = None, total: float | None = None, desc: str = "",
                 unit: str = "it", unit_scale: bool = False, interval: float = 10.0, **_: Any):
        self.iterable, self.total, self.desc, self.unit, self.scale = iterable, total, desc, unit, unit_scale
        self.n, self.interval, self.postfix = 0, interval, ""
        self.start = self._last = time.monotonic()

    def __iter__(self) -> Iterator:
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __enter__(self) -> "PlainProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _amount(self, n: float) -> str:
        if not self.scale:
            return f"{n:.0f}"
        for prefix, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
            if n >= size:
                return f"{n / size:.1f}{prefix}"
        return f"{n:.0f}"

    def _line(self) -> str:
        elapsed = time.monotonic() - self.start
        done = self._amount(self.n) + (f"/{self._amount(self.total)}" if self.total else "")
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        rate = f", {self._amount(self.n / elapsed)} {self.unit}/s" if elapsed > 0 and self.n else ""
        return f"{self.desc}: {done} {self.unit}{pct}, {elapsed:.0f} s{rate}{self.postfix}"

    def update(self, n: float = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            log.info("%s", self._line())

    def set_postfix(self, refresh: bool = False, **values: Any) -> None:
        self.postfix = "".join(f", {k} {v}" for k, v in values.items())

    def write(self, message: str) -> None:
        log.info("%s", message)

    def close(self) -> None:
        if self.n and time.monotonic() - self.start >= self.interval:  # a short operation needs no closing line
            log.info("%s", self._line())
        self.n = 0


def progress(iterable: Iterable | None = None, *, enabled: bool = True, **kwargs: Any):
    """A tqdm bar when stderr is a terminal, else a ``PlainProgress``; ``enabled=False`` shows nothing."""
    if enabled and sys.stderr.isatty():
        from tqdm.auto import tqdm
        return tqdm(iterable, **kwargs)
    if not enabled:
        kwargs["interval"] = float("inf")
    return PlainProgress(iterable, **kwargs)
