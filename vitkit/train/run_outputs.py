"""What a run writes besides checkpoints: ``metrics.csv`` (one row per validation), TensorBoard events, PNG plots
and the environment recorded in ``summary.json``. Rank 0 only."""
from __future__ import annotations

import csv
import json
import logging
import os
import platform
import subprocess
from pathlib import Path
from typing import Any, Callable

import torch

__all__ = ["MetricsLog", "TensorBoard", "write_plots", "environment", "COLUMNS"]

log = logging.getLogger(__name__)

COLUMNS = ["epoch", "step", "elapsed_s", "train_loss", "train_acc", "val_loss", "val_top1", "val_top5",
           "test_loss", "test_top1", "test_top5", "lr", "images_per_s", "val_mim_top1", "test_mim_top1"]


class MetricsLog:
    """``metrics.csv``: appended row by row and flushed; on resume, rows after the checkpoint's step are dropped
    (they were logged by the interrupted process after its last checkpoint and will be logged again)."""

    def __init__(self, path: str | os.PathLike, resume_step: int | None = None):
        self.path = Path(path)
        if resume_step is not None and self.path.is_file():
            rows = self.read(self.path)
            kept = [r for r in rows if int(r["step"]) <= resume_step]
            if len(kept) < len(rows):
                log.info("metrics.csv: %d row(s) after step %d were written after the checkpoint; they are replaced "
                         "by the resumed run's", len(rows) - len(kept), resume_step)
            self._write_all(kept)
        else:
            self._write_all([])

    @staticmethod
    def read(path: str | os.PathLike) -> list[dict[str, str]]:
        with open(path, newline="") as f:
            return list(csv.DictReader(f))

    def _write_all(self, rows: list[dict[str, Any]]) -> None:
        tmp = self.path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, COLUMNS)
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, self.path)

    def append(self, row: dict[str, Any]) -> None:
        unknown = set(row) - set(COLUMNS)
        if unknown:
            raise ValueError(f"metrics.csv has no columns {sorted(unknown)}")
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, COLUMNS).writerow({k: _fmt(v) for k, v in row.items()})


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return f"{v:.6g}"
    return "" if v is None else v


class TensorBoard:
    """Event files under ``RUN_DIR/tensorboard`` when enabled and ``tensorboard`` is importable; a no-op otherwise.
    On resume, events after the checkpoint's step are purged (``SummaryWriter(purge_step=...)``)."""

    def __init__(self, log_dir: str | os.PathLike, enabled: bool, purge_step: int | None = None):
        self.writer = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.info("tensorboard is not installed: no event files (pip install 'vitkit[tensorboard]')")
            return
        self.writer = SummaryWriter(os.fspath(log_dir), purge_step=purge_step)

    def scalars(self, values: dict[str, float | None], step: int) -> None:
        if self.writer is None:
            return
        for tag, v in values.items():
            if v is not None:
                self.writer.add_scalar(tag, v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _column(rows: list[dict[str, str]], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in rows:
        if r.get(key):
            xs.append(float(r["step"]))
            ys.append(float(r[key]))
    return xs, ys


def _figure():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(6.4, 4.0), dpi=100)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _plot_lines(rows, keys: list[str], ylabel: str, path: Path, x: str = "step") -> bool:
    fig, ax = _figure()
    drawn = False
    for key in keys:
        if x == "step":
            xs, ys = _column(rows, key)
        else:
            pts = [(float(r[x]) / 60.0, float(r[key])) for r in rows if r.get(key)]
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        if xs:
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=key)
            drawn = True
    if not drawn:
        return False
    ax.set_xlabel("optimiser step" if x == "step" else "wall-clock minutes")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return True


def _plot_lr(schedule: Callable[[int], float], total: int, path: Path) -> None:
    fig, ax = _figure()
    steps = list(range(0, total, max(1, total // 500)))
    ax.plot(steps, [schedule(s) for s in steps])
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("learning rate (before layer-wise scaling)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


def write_plots(metrics_csv: str | os.PathLike, out_dir: str | os.PathLike, schedule: Callable[[int], float],
                total_steps: int) -> list[str]:
    """``loss.png``, ``accuracy.png``, ``lr.png`` and, with a test curve, ``accuracy_vs_time.png``."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        log.warning("matplotlib is not installed: no plots (pip install 'vitkit[train]')")
        return []
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = MetricsLog.read(metrics_csv) if Path(metrics_csv).is_file() else []
    written = []
    for name, keys, label in (("loss", ["train_loss", "val_loss", "test_loss"], "cross-entropy"),
                              ("accuracy", ["train_acc", "val_top1", "test_top1"], "top-1 accuracy")):
        if _plot_lines(rows, keys, label, out / f"{name}.png"):
            written.append(str(out / f"{name}.png"))
    if _plot_lines(rows, ["val_top1", "test_top1"], "top-1 accuracy", out / "accuracy_vs_time.png", x="elapsed_s"):
        written.append(str(out / "accuracy_vs_time.png"))
    _plot_lr(schedule, total_steps, out / "lr.png")
    written.append(str(out / "lr.png"))
    return written


def _git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5)
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def environment(device: torch.device, threads: int, world_size: int) -> dict[str, Any]:
    import vitkit
    from vitkit.hardware import machine_line
    return {"vitkit": vitkit.__version__, "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "cpu": machine_line(), "device": str(device), "threads": threads,
            "world_size": world_size, "cpu_count": os.cpu_count(), "git_commit": _git_commit()}


def plot_accuracy_vs_minutes(runs: dict[str, str | os.PathLike], path: str | os.PathLike,
                             key: str = "test_top1", points: dict[str, tuple[float, float]] | None = None) -> None:
    """One curve per run: ``key`` from each run's metrics.csv against wall-clock minutes (e.g. pre-trained vs scratch),
    ending at the final test of its summary.json when it has one; ``points``: runs known only by their end, as
    label → (minutes, accuracy %), drawn as single markers.

    The default ``key`` needs runs that recorded the test split at each validation (``log.test_curve: true``);
    ``val_top1`` is in every run that validated."""
    fig, ax = _figure()
    for label, run_dir in runs.items():
        with open(Path(run_dir) / "metrics.csv") as f:
            pts = [(float(r["elapsed_s"]) / 60.0, 100.0 * float(r[key])) for r in csv.DictReader(f) if r.get(key)]
        if not pts:
            raise ValueError(f"{run_dir}/metrics.csv has no {key} values (was log.test_curve on?)")
        summary = Path(run_dir) / "summary.json"
        if summary.is_file():  # the final test, after the last validation
            end = json.loads(summary.read_text())
            if (end.get("test") or {}).get("top1") is not None and end.get("wall_time_s"):
                pts.append((end["wall_time_s"] / 60.0, 100.0 * end["test"]["top1"]))
        ax.plot([0.0] + [p[0] for p in pts], [10.0] + [p[1] for p in pts], marker="o", markersize=3,
                label=f"{label} ({pts[-1][1]:.2f}%)")  # 10% = chance at minute 0
    for label, (minutes, acc) in (points or {}).items():
        ax.plot([minutes], [acc], marker="s", linestyle="none", label=f"{label} ({acc:.2f}%, end only)")
    ax.set_xlabel("wall-clock minutes (2-core CPU)")
    ax.set_ylabel("test top-1 accuracy (%)" if key == "test_top1" else
                  f"{key.replace('_top1', '')} top-1 accuracy (%), then the final test")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
