"""Honest waits: long operations show a bar on a terminal and periodic plain lines elsewhere (no
carriage returns in logs), and `vitkit bench --machine` is bounded and reports as it goes."""
from __future__ import annotations

import logging
import time

import pytest

from vitkit import progress as progress_mod
from vitkit.progress import PlainProgress, progress


def test_plain_lines_off_a_terminal(caplog, monkeypatch):
    clock = iter(range(0, 1000, 4))  # every update is 4 "seconds" after the previous one
    monkeypatch.setattr(progress_mod.time, "monotonic", lambda: float(next(clock)))
    with caplog.at_level(logging.INFO, logger="vitkit"):
        items = list(progress(range(7), total=7, desc="eval", unit="batch", interval=10.0))
    assert items == list(range(7))
    lines = [r.getMessage() for r in caplog.records]
    assert lines and all(line.startswith("eval: ") and "\r" not in line for line in lines)
    assert lines[-1].startswith("eval: 7/7 batch (100%)")
    assert 2 <= len(lines) <= 4  # periodic, not one per item


def test_short_operations_print_nothing(caplog):
    with caplog.at_level(logging.INFO, logger="vitkit"):
        with progress(total=3, desc="x", unit="B", unit_scale=True) as bar:
            bar.update(3)
    assert caplog.records == []


def test_a_terminal_gets_a_tqdm_bar(monkeypatch):
    tqdm = pytest.importorskip("tqdm.auto")
    monkeypatch.setattr(progress_mod.sys.stderr, "isatty", lambda: True)
    bar = progress(total=2, desc="x")
    assert isinstance(bar, tqdm.tqdm)
    bar.close()
    assert isinstance(progress(total=2, enabled=False), PlainProgress)


def test_units_scale():
    p = PlainProgress(total=3_500_000, unit="B", unit_scale=True, interval=1e9)
    p.update(1_250_000)
    assert "1.2M/3.5M B (36%)" in p._line()


@pytest.mark.serial
def test_machine_limits_are_bounded_and_report_progress():
    from vitkit.bench.machine import machine_limits
    said = []
    start = time.monotonic()
    out = machine_limits((1,), repeats=2, seconds=4.0, progress=said.append)
    seconds = time.monotonic() - start
    assert seconds < 4.0 * 2 + 2, f"{seconds:.1f} s for a 4 s allowance"
    assert [m.split(":")[0] for m in said] == ["threads=1"] * 3
    assert "fp32 GEMM" in said[0] and "bf16 GEMM" in said[1] and "copy" in said[2]
    row = out["by_threads"][1]
    assert row["gemm_fp32_gflops"]["median"] > 0 and row["gemm_fp32_gflops"]["size"] % 256 == 0
