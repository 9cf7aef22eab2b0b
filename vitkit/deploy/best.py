"""``--runtime best`` and ``vitkit export --fastest``: the fastest way to run a model on this CPU among those that keep
its answers, measured here rather than assumed.

What is built (``PATHS``): eager PyTorch in fp32, eager PyTorch under bf16 autocast, ONNX Runtime fp32, ONNX Runtime
int8 (the scheme ``vitkit.deploy.quantize`` chooses for this CPU kind; static QDQ when calibration images are given),
OpenVINO asked for f32, OpenVINO int8 (NNCF's static quantisation with accuracy control: only when calibration
images are given), OpenVINO asked for bf16, and ``torch.export``'s module. Calibration images
(``calibration_images``): ``--calibrate``, else the first 300 held-out validation images of a run trained on
CIFAR-10 (never the test images agreement is measured on). bf16 paths are built only where the hardware probe
(``vitkit.hardware``) says bf16 is native: emulated bf16 is several times slower than fp32, so it can never win. A path
that cannot be built here (a package missing, the CPU lacking the feature, an exporter failing on the model, OpenVINO
computing a bf16 request in f32) is a row "not available: <reason>", not an error. Every exported path passes the
export's own parity check first (``vitkit.deploy.export``).

What is measured, for each path:
- speed: images/s of one forward pass at the request's batch size on a fixed random batch, every path timed in the
  same interleaved rounds (order alternating, median step; ``vitkit.bench.runner.interleave``) so that a change of
  load on a shared machine hits all of them alike, each timed step right after an untimed one of the same path
  (``SETTLE``: ONNX Runtime's threads keep spinning after its step and halved the speed of eager PyTorch timed
  right after it); a short timing (1 untimed and 5 timed rounds; ``vitkit bench``
  uses its ``--warmup``/``--iters``). The timer is an argument (``Timer``), so tests inject one.
- agreement: how many real images get the same top-1 class as eager fp32, run in batches of the request's size (int8
  activation scales are per batch, so the batch is part of what is measured). The images (``agreement_images``): the
  29 shipped photos (``shipped_photos``), plus the first 2,000 CIFAR-10 test images when the model is a run folder
  trained on CIFAR-10, plus any folder named with ``--agreement-images``; each preprocessed as the model expects.

The rule: a path qualifies when its top-1 agreement is >= ``MIN_AGREEMENT`` (99%) of the images; eager fp32 is the
reference and always qualifies. The fastest qualifying path is chosen; a tie goes to the path listed first, so fp32
wins ties. On 29 photos 99% means all 29: the int8 scheme of ``vitkit.deploy.quantize`` keeps 28 of 29 for the real
DeiT-Tiny in one batch of 29 and is refused there, although ``vitkit export --int8`` accepts it by its own "all but
one" rule; in batches of 8 it keeps all 29 and qualifies. For an export, only paths with an export format can be
written; eager rows are shown as the reference. A model whose eager logits are the same for every image (an
all-zero head) is refused before anything is built: agreement would prove nothing.

Why fp32 stays the default and ``best`` is opt-in: fp32 gives the same numbers on every CPU and equal to timm's and
transformers'. ``best`` gives up bit-equality for speed, and which path wins depends on the CPU, the batch size, the
load of the machine while timing, and the images the agreement was measured on: 99% on these images is evidence,
not a guarantee for every input.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import statistics
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vitkit.deploy.export import INT8_NEEDS_CALIBRATION

__all__ = ["CALIBRATION_IMAGES", "CIFAR10_IMAGES", "MIN_AGREEMENT", "PATHS", "AgreementImages", "Autocast",
           "BuiltPath", "Choice", "InterleavedTimer", "NoExportQualifies", "PathSpec", "Row", "agreement_images",
           "build_paths", "calibration_images", "check_reference", "choose", "default_timer", "folder_images",
           "read_run_data", "select_fastest", "shipped_photos", "write_fastest_export"]

MIN_AGREEMENT = 0.99  # a path must give eager fp32's top-1 class on at least this fraction of the real images
CIFAR10_IMAGES = 2000  # CIFAR-10 test images added for a run folder trained on CIFAR-10 (the first ones, in order)
CALIBRATION_IMAGES = 300  # CIFAR-10 held-out images static int8 calibrates on, for a run trained on CIFAR-10
FOLDER_IMAGES = 2000  # at most this many images of an --agreement-images folder (sorted by path)
SETTLE = 1  # untimed runs of a path right before each timed one: other runtimes' threads spin after their step
TIMING_WARMUP, TIMING_ROUNDS = 1, 5  # the default timer: untimed steps per path, then interleaved timed rounds
REFERENCE = "eager-fp32"

log = logging.getLogger(__name__)

Step = Callable[[], None]
Timer = Callable[[Mapping[str, Step]], Mapping[str, float]]  # steps by path → median seconds per batch


@dataclass(frozen=True)
class PathSpec:
    """One way to run a model: a runtime of ``vitkit.deploy.names.RUNTIMES`` (``eager`` = the PyTorch model)."""

    name: str
    runtime: str
    fmt: str | None  # the export format it runs (None: eager PyTorch, nothing to export)
    int8: bool = False
    bf16: bool = False  # computes in bf16: built only where the probe says bf16 is native


PATHS = (
    PathSpec("eager-fp32", "eager", None),
    PathSpec("eager-bf16", "eager", None, bf16=True),
    PathSpec("onnxruntime-fp32", "onnxruntime", "onnx"),
    PathSpec("onnxruntime-int8", "onnxruntime", "onnx", int8=True),
    PathSpec("openvino-fp32", "openvino", "openvino"),
    PathSpec("openvino-int8", "openvino", "openvino", int8=True),  # static (NNCF): built only with calibration images
    PathSpec("openvino-bf16", "openvino-bf16", "openvino", bf16=True),
    PathSpec("torch-export-fp32", "torch-export", "torch-export"),
)


class NoExportQualifies(RuntimeError):
    """``--fastest``: every path with an export format failed to build or was refused; ``choice`` holds the table
    (its ``chosen`` is "none")."""

    def __init__(self, message: str, choice: Choice):
        super().__init__(message)
        self.choice = choice


class Autocast(nn.Module):
    """The eager model under ``torch.autocast(cpu, bf16)``, float32 logits out; reads like the model it wraps
    (``vitkit.families.contract.Classifier``)."""

    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.model, self.dtype = model, dtype
        for name in ("data_cfg", "class_names", "num_classes", "variant_name", "accepts_any_size"):
            setattr(self, name, getattr(model, name, None))

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(device_type="cpu", dtype=self.dtype):
            return self.model(x).float()


@dataclass
class BuiltPath:
    """A path ready to run (``module``), or why it is not (``reason``); ``folder``: its export, while kept."""

    name: str
    module: nn.Module | None = None
    reason: str | None = None
    refused: bool = False  # built, but its export failed the parity check: refused rather than not available
    spec: PathSpec | None = None  # None for a path given by hand (e.g. a test's deliberately bad quantisation)
    folder: str | None = None

    @property
    def exportable(self) -> bool:
        return self.folder is not None


# -------------------------------------------------------------------------------------------------- building
def _bf16_missing() -> str | None:
    from vitkit.hardware import bf16_native
    if bf16_native("cpu"):
        return None
    return "bf16 is not native on this CPU (no AVX-512-bf16/AMX): emulated, it is slower than fp32"


def _build_export(spec: PathSpec, model: nn.Module, workspace: str, calibration: Tensor | None,
                  check_images: Tensor | None) -> BuiltPath:
    """Export ``model`` for ``spec`` into ``workspace/<name>`` (parity-checked) and open it in its runtime."""
    from vitkit.deploy.export import ExportError, export_model
    from vitkit.deploy.runtime import open_runtime
    folder = os.path.join(workspace, spec.name)
    try:
        export_model(model, folder, spec.fmt, int8=spec.int8, images=check_images, runtime=spec.runtime,
                     calibration=calibration if spec.int8 else None)
        opened = open_runtime(folder, runtime=spec.runtime)
    except ExportError as e:
        failed_check = e.parity is not None
        return BuiltPath(spec.name, reason=("export parity check failed: " if failed_check else "")
                         + str(e).splitlines()[0], refused=failed_check, spec=spec)
    except ImportError as e:
        return BuiltPath(spec.name, reason=f"needs {e.name or e}: pip install 'vitkit[export]'", spec=spec)
    except Exception as e:  # noqa: BLE001 -- a runtime that cannot open the file here: a row, not a crash
        return BuiltPath(spec.name, reason=f"{type(e).__name__}: {_first_line(e)}", spec=spec)
    if spec.bf16 and opened.precision != "bf16":
        return BuiltPath(spec.name, reason=opened.note or f"computes in {opened.precision} here", spec=spec)
    opened.__dict__["source"] = model  # FLOPs are counted on the eager model (vitkit.bench.runner.step_flops)
    return BuiltPath(spec.name, opened, spec=spec, folder=folder)


def _build(spec: PathSpec, model: nn.Module, workspace: str, calibration: Tensor | None,
           check_images: Tensor | None) -> BuiltPath:
    missing = _bf16_missing() if spec.bf16 else None
    if spec.int8 and INT8_NEEDS_CALIBRATION[spec.fmt] and calibration is None:
        missing = "static int8 needs calibration images: --calibrate DIR, or a run trained on CIFAR-10"
    if missing:
        return BuiltPath(spec.name, reason=missing, spec=spec)
    if spec.fmt is None:
        return BuiltPath(spec.name, Autocast(model) if spec.bf16 else model, spec=spec)
    return _build_export(spec, model, workspace, calibration, check_images)


def build_paths(model: nn.Module, workspace: str | os.PathLike, calibration: Tensor | None = None,
                names: Sequence[str] | None = None, check_images: Tensor | None = None) -> list[BuiltPath]:
    """Every path of ``PATHS`` (or those ``names``) for ``model`` on this CPU; exports are written under
    ``workspace`` (the caller deletes it). ``calibration``: images for static int8; ``check_images``: real images
    for the exports' own parity check."""
    model = model.cpu().eval()
    out = []
    for spec in (s for s in PATHS if names is None or s.name in names):
        out.append(_build(spec, model, os.fspath(workspace), calibration, check_images))
        log.info("best: %s %s", spec.name, "built" if out[-1].module is not None else out[-1].reason)
    return out


# ---------------------------------------------------------------------------------------------------- timing
@dataclass(frozen=True)
class InterleavedTimer:
    """Median seconds per step of each path, timed in interleaved rounds (``vitkit.bench.runner.interleave``)."""

    warmup: int = TIMING_WARMUP
    rounds: int = TIMING_ROUNDS
    quiet: float | None = None  # wait for / repeat rounds until other processes use at most this many cores
    max_wait: float = 600.0

    @property
    def description(self) -> str:
        quiet = "" if self.quiet is None else f", rounds disturbed by > {self.quiet:g} other cores repeated"
        return (f"median of {self.rounds} interleaved rounds after {self.warmup} untimed, each timed step after "
                f"{SETTLE} untimed{quiet}")

    def __call__(self, steps: Mapping[str, Step]) -> dict[str, float]:
        from vitkit.bench.runner import interleave
        for _ in range(self.warmup):
            for step in steps.values():
                step()
        timed = interleave(dict(steps), max(1, self.rounds), "cpu", quiet=self.quiet, max_wait=self.max_wait,
                           settle=SETTLE)
        return {name: statistics.median(times) for name, times in timed.times.items()}


def default_timer(warmup: int = TIMING_WARMUP, rounds: int = TIMING_ROUNDS, quiet: float | None = None,
                  max_wait: float = 600.0) -> Timer:
    """The timer the commands use (tests replace this function to make the choice deterministic)."""
    return InterleavedTimer(warmup, rounds, quiet, max_wait)


def _step(module: nn.Module, x: Tensor) -> Step:
    def run() -> None:
        with torch.inference_mode():
            module(x)
    return run


# ------------------------------------------------------------------------------------------------- agreement
@dataclass
class AgreementImages:
    """Preprocessed real images (N, C, H, W) and where they came from, in order: (description, count) per set."""

    images: Tensor
    sets: list[tuple[str, int]]

    def describe(self) -> str:
        return " + ".join(f"{n} {name}" for name, n in self.sets)


def shipped_photos() -> Path | None:
    """The 29 shipped photos: ``$VITKIT_SHARED/data/images``, else ``shared/data/images`` beside the repository."""
    root = os.environ.get("VITKIT_SHARED")
    shared = Path(root) if root else Path(__file__).resolve().parents[3] / "shared"
    photos = shared / "data" / "images"
    return photos if photos.is_dir() else None


def folder_images(paths: str | os.PathLike | Sequence[str | os.PathLike], model: nn.Module, limit: int) -> Tensor:
    """The first ``limit`` images of ``paths`` (folders, image files; sorted by path), preprocessed as ``model``
    expects."""
    from vitkit.data import load_image
    from vitkit.evaluate.predict import expand_inputs
    from vitkit.evaluate.preprocess import eval_transform
    paths = [os.fspath(p) for p in ([paths] if isinstance(paths, (str, os.PathLike)) else paths)]
    files = expand_inputs(paths)[:limit]
    if not files:
        raise FileNotFoundError(f"no image files found in {' '.join(paths)}")
    transform = eval_transform(model.data_cfg)
    return torch.stack([transform(load_image(f)) for f in files])


def _cifar10_images(model: nn.Module, run_data: Mapping[str, Any], splits: Sequence[str], limit: int) -> Tensor:
    """The first ``limit`` images of the first of the run's CIFAR-10 ``splits`` ("val", "train", "test") that it
    has, through the run's own eval transform."""
    from vitkit.data import build_splits
    from vitkit.evaluate.eval_data import dataset_transform, resolve_data_config
    cfg = resolve_data_config(model, dict(run_data))
    built = build_splits(cfg)
    images = next(d for d in (getattr(built, name) for name in splits) if d is not None and len(d))
    transform = dataset_transform(cfg, model)
    return torch.stack([transform(images[i][0]) for i in range(min(limit, len(images)))])


def calibration_images(model: nn.Module, run_data: Mapping[str, Any] | None = None,
                       given: Tensor | None = None) -> Tensor | None:
    """Images to calibrate static int8 on: ``given`` (``--calibrate``), else, for a run trained on CIFAR-10, the first
    ``CALIBRATION_IMAGES`` of its held-out validation split (images it never trained on, as the test images are not:
    the training images' answers are surer, and would hide the layers whose int8 costs agreement), or of its
    training split when it held none out; else None."""
    if given is not None or not run_data or run_data.get("name") != "cifar10":
        return given
    return _cifar10_images(model, run_data, ("val", "train"), CALIBRATION_IMAGES)


def read_run_data(run_dir: str | os.PathLike | None) -> dict[str, Any] | None:
    """The data section of a run folder's ``config.yaml`` (None without a run or without one)."""
    import yaml
    path = os.path.join(os.fspath(run_dir), "config.yaml") if run_dir else None
    if path is None or not os.path.isfile(path):
        return None
    with open(path) as f:
        doc = yaml.safe_load(f) or {}
    return doc.get("data") if isinstance(doc, dict) else None


def agreement_images(model: nn.Module, run_data: Mapping[str, Any] | None = None,
                     folder: str | os.PathLike | None = None, photos: str | os.PathLike | None = None
                     ) -> AgreementImages:
    """The real images agreement is measured on (see the module docstring). ``run_data``: the data section of the
    run the model comes from; ``folder``: ``--agreement-images``; ``photos``: where the shipped photos are."""
    photos = photos or shipped_photos()
    if photos is None and folder is None:
        raise FileNotFoundError("--runtime best measures top-1 agreement on real images, and the shipped photos were "
                                "not found (set VITKIT_SHARED to the shared folder): give --agreement-images DIR")
    parts: list[tuple[str, Tensor]] = []
    if photos is not None:
        parts.append((f"photos ({photos})", folder_images(photos, model, FOLDER_IMAGES)))
    if run_data and run_data.get("name") == "cifar10":
        parts.append(("CIFAR-10 test images", _cifar10_images(model, run_data, ("test",), CIFAR10_IMAGES)))
    if folder is not None:
        parts.append((f"images ({folder})", folder_images(folder, model, FOLDER_IMAGES)))
    return AgreementImages(torch.cat([t for _, t in parts]), [(name, len(t)) for name, t in parts])


def top1(module: nn.Module, images: Tensor, batch_size: int) -> Tensor:
    """The top-1 class of every image, run in batches of ``batch_size``."""
    with torch.inference_mode():
        return torch.cat([module(b).float().argmax(-1) for b in images.split(batch_size)])


def _reference_top1(model: nn.Module, images: Tensor, batch_size: int) -> Tensor:
    """Eager fp32's top-1 classes; refused when every image gets the same logits (agreement would be vacuous)."""
    with torch.inference_mode():
        logits = torch.cat([model(b).float() for b in images.split(batch_size)])
    if len(logits) > 1 and torch.equal(logits, logits[:1].expand_as(logits)):
        raise ValueError("eager fp32 gives every agreement image the same logits (an all-zero head, e.g. random "
                         "weights), so agreement would prove nothing: give trained weights")
    return logits.argmax(-1)


def check_reference(model: nn.Module, images: AgreementImages, count: int = 4) -> None:
    """The vacuous-agreement check of ``_reference_top1`` on the first ``count`` images: before anything is built."""
    _reference_top1(model.cpu().eval(), images.images[:count], count)


def qualifies(agree: int, total: int) -> bool:
    return total > 0 and agree >= MIN_AGREEMENT * total - 1e-9


# ---------------------------------------------------------------------------------------------------- choice
@dataclass
class Row:
    """One path of the table: its speed, its agreement with eager fp32, and the decision."""

    path: str
    status: str  # "chosen", "refused" or "not available"
    reason: str = ""
    images_per_s: float | None = None
    speedup: float | None = None  # × eager fp32, same rounds
    agree: int | None = None
    total: int | None = None
    by_set: dict[str, list[int]] = field(default_factory=dict)  # set → [agree, total]

    def decision(self) -> str:
        return self.status + (f": {self.reason}" if self.reason else "")


@dataclass
class Choice:
    """The path chosen, the table it was chosen from, and how it was measured."""

    chosen: str  # a path name ("none" only inside NoExportQualifies)
    module: nn.Module | None = field(repr=False)
    rows: list[Row]
    batch_size: int
    images: str  # what the agreement was measured on
    timing: str
    min_agreement: float = MIN_AGREEMENT
    folder: str | None = None  # the chosen path's export, while the workspace exists
    runtime: str | None = None  # the chosen path's runtime (``vitkit.deploy.names.RUNTIMES``)

    def row(self, name: str) -> Row:
        return next(r for r in self.rows if r.path == name)

    def table_lines(self) -> list[str]:
        header = ("path", "img/s", "× eager fp32", "agreement", "decision")
        body = [(r.path, _fmt(r.images_per_s, ".2f"), "-" if r.speedup is None else f"{r.speedup:.2f}×",
                 "-" if r.total is None else f"{r.agree}/{r.total}", r.decision()) for r in self.rows]
        widths = [max(len(line[i]) for line in [header, *body]) for i in range(4)]
        lines = ["  ".join([f"{line[0]:<{widths[0]}}", *(f"{v:>{w}}" for v, w in zip(line[1:4], widths[1:])),
                            line[4]]) for line in [header, *body]]
        rule = (f"agreement: top-1 class of eager fp32 on {self.images}; a path needs >= {self.min_agreement:.0%} "
                "(eager fp32 is the reference)")
        return [*lines, rule,
                f"speed: batch {self.batch_size}, {self.timing}; chosen: {self.chosen}"]

    def as_dict(self) -> dict[str, Any]:
        from vitkit.hardware import machine_line
        chosen = next((r for r in self.rows if r.path == self.chosen), None)
        agreement = None if chosen is None else {"agree": chosen.agree, "total": chosen.total,
                                                 "by_set": chosen.by_set}
        return {"chosen": self.chosen, "runtime": self.runtime, "agreement": agreement,
                "min_agreement": self.min_agreement, "batch_size": self.batch_size, "images": self.images,
                "timing": self.timing, "cpu": machine_line(), "table": [dataclasses.asdict(r) for r in self.rows]}


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else ""


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _agreement(built: list[BuiltPath], images: AgreementImages, batch_size: int) -> dict[str, Tensor]:
    """Per runnable path: which images keep eager fp32's top-1 class (bool, N). A path that fails to run is marked
    not available."""
    ref = _reference_top1(built[0].module, images.images, batch_size)
    same = {built[0].name: torch.ones_like(ref, dtype=torch.bool)}
    for b in built[1:]:
        if b.module is None:
            continue
        try:
            same[b.name] = top1(b.module, images.images, batch_size) == ref
        except Exception as e:  # noqa: BLE001 -- a runtime failing on real inputs: a row, not a crash
            b.module, b.reason = None, f"failed on the agreement images: {type(e).__name__}: {_first_line(e)}"
    return same


def _speeds(built: list[BuiltPath], x: Tensor, timer: Timer) -> dict[str, float]:
    """Images/s of every runnable path, timed together by ``timer``."""
    seconds = timer({b.name: _step(b.module, x) for b in built if b.module is not None})
    return {name: len(x) / s for name, s in seconds.items()}


def _row(b: BuiltPath, speed: Mapping[str, float], same: Mapping[str, Tensor], images: AgreementImages) -> Row:
    if b.module is None:
        return Row(b.name, "refused" if b.refused else "not available", b.reason or "")
    ok = same[b.name]
    by_set, start = {}, 0
    for name, n in images.sets:
        by_set[name] = [int(ok[start:start + n].sum()), n]
        start += n
    ips = speed[b.name]
    return Row(b.name, "", images_per_s=ips, speedup=ips / speed[REFERENCE], agree=int(ok.sum()), total=len(ok),
               by_set=by_set)


def _decide(rows: list[Row], built: Mapping[str, BuiltPath], exportable_only: bool) -> Row | None:
    """Mark every measured row chosen or refused; the fastest qualifying one (ties: the first listed) is chosen."""
    measured = [r for r in rows if r.status == ""]
    for r in measured:
        if r.path != REFERENCE and not qualifies(r.agree, r.total):
            share = f"{r.agree}/{r.total} = {r.agree / r.total:.1%}"
            r.status, r.reason = "refused", f"agreement {share} < {MIN_AGREEMENT:.0%}"
        elif exportable_only and not built[r.path].exportable:
            r.status, r.reason = "refused", "not an export format (eager PyTorch: the reference)"
    candidates = [r for r in measured if r.status == ""]
    if not candidates:  # only with exportable_only: eager fp32 qualifies otherwise
        return None
    best = max(candidates, key=lambda r: (r.images_per_s, -rows.index(r)))
    for r in candidates:
        r.status, r.reason = ("chosen", "") if r is best else \
            ("refused", f"slower than {best.path} ({r.images_per_s / best.images_per_s:.2f}×)")
    return best


def choose(built: list[BuiltPath], images: AgreementImages, batch_size: int, timer: Timer,
           exportable_only: bool = False) -> Choice:
    """Measure every built path (speed at ``batch_size`` with ``timer``, agreement on ``images``) and choose.
    ``built[0]`` must be eager fp32, the reference. ``exportable_only``: only paths written to a folder can win."""
    if not built or built[0].name != REFERENCE or built[0].module is None:
        raise ValueError(f"the first path must be {REFERENCE}, the reference")
    if len(images.images) == 0:
        raise ValueError("no agreement images")
    model = built[0].module
    log.info("best: top-1 agreement with %s on %s, then timing at batch %d", REFERENCE, images.describe(), batch_size)
    same = _agreement(built, images, batch_size)
    C, H, W = model.data_cfg.input_size
    x = torch.randn(batch_size, C, H, W, generator=torch.Generator().manual_seed(0))
    speed = _speeds(built, x, timer)
    rows = [_row(b, speed, same, images) for b in built]
    by_name = {b.name: b for b in built}
    best = _decide(rows, by_name, exportable_only)
    timing = getattr(timer, "description", "injected timer")
    if best is None:
        failed = Choice("none", None, rows, batch_size, images.describe(), timing)
        raise NoExportQualifies("no path with an export format qualifies: " + "; ".join(
            f"{r.path}: {r.decision()}" for r in rows if by_name[r.path].spec and by_name[r.path].spec.fmt), failed)
    chosen = by_name[best.path]
    return Choice(best.path, chosen.module, rows, batch_size, images.describe(), timing, folder=chosen.folder,
                  runtime=chosen.spec.runtime if chosen.spec else None)


def select_fastest(model: nn.Module, images: AgreementImages, batch_size: int, timer: Timer | None = None,
                   calibration: Tensor | None = None, names: Sequence[str] | None = None) -> Choice:
    """Build every path in a temporary folder, measure, choose (``choose``); the chosen module stays usable."""
    check_reference(model, images)
    with tempfile.TemporaryDirectory(prefix="vitkit-best-") as workspace:
        built = build_paths(model, workspace, calibration, names)
        choice = choose(built, images, batch_size, timer or default_timer())
    choice.folder = None
    return choice


# ---------------------------------------------------------------------------------------------------- export
def write_fastest_export(choice: Choice, out: str | os.PathLike) -> dict[str, Any]:
    """Move the chosen export folder to ``out`` (which must not exist) and record in its ``vitkit.json`` the runtime
    it runs in (``open_runtime`` opens it so), the choice, the table and the agreement; returns the metadata."""
    if choice.folder is None:
        raise ValueError("the chosen path has no export folder (its workspace is gone, or it is eager PyTorch)")
    meta_path = os.path.join(choice.folder, "vitkit.json")
    with open(meta_path) as f:
        meta = json.load(f)
    meta["runtime"] = choice.runtime
    meta["fastest"] = choice.as_dict()
    with open(meta_path, "w") as f:
        json.dump(meta, f, indent=1)
    shutil.move(choice.folder, os.fspath(out))
    choice.folder = os.fspath(out)
    return meta

