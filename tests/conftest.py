"""Shared fixtures and helpers for vitkit's tests.

Golden cases (``../shared/golden`` next to the repository, or ``$VITKIT_GOLDEN``): the ``golden_root`` fixture skips
with a message when the folder is absent, except under ``CI=true`` where absence is a failure. A test module that
takes a ``golden_case`` argument is parametrised with every case folder under the root, by case id; set
``GOLDEN_FAMILIES = {...}`` in the module to keep only those ``case.json`` families.
"""
from __future__ import annotations

import importlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]

# Tests run tiny tensors: one intra-op thread is faster than two, and on a shared or loaded machine OpenMP threads
# waiting for a busy core made this suite 5x slower (58 s vs 11 s measured). VITKIT_TEST_THREADS overrides.
torch.set_num_threads(int(os.environ.get("VITKIT_TEST_THREADS", "1")))


def _pin_xdist_worker() -> None:
    """Under ``pytest -n N`` (``make test``), worker k keeps to core k (mod the cores it may use), and so do the
    processes its tests start (``vitkit train`` subprocesses, torchrun): ``default_threads`` reads the affinity mask,
    so none of them runs more threads than its core, and no OpenMP thread spins on a core another worker is using."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if worker.startswith("gw") and hasattr(os, "sched_setaffinity"):
        cores = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cores[int(worker[2:]) % len(cores)]})


_pin_xdist_worker()


# --------------------------------------------------------------------------------------------------- golden cases
def golden_root_path() -> Path:
    env = os.environ.get("VITKIT_GOLDEN")
    return Path(env) if env else REPO.parent / "shared" / "golden"


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() == "true"


def skip_or_fail(message: str) -> None:
    """Skip locally; under CI=true a missing prerequisite is a failure, not a silent skip."""
    if _in_ci():
        pytest.fail(f"{message} (CI=true: required)", pytrace=False)
    pytest.skip(message)


def require(module: str) -> Any:
    """Import a test dependency (the ``test`` extra of pyproject.toml) or skip-or-fail naming it; use this instead of
    ``pytest.importorskip``, which would skip under CI=true too."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        skip_or_fail(f"{module} is not importable ({e}); install the test extra: pip install -e '.[test]'")


@dataclass(frozen=True)
class GoldenCase:
    folder: Path
    meta: dict[str, Any]

    @property
    def case_id(self) -> str:
        return self.meta.get("case_id", self.folder.name)

    @property
    def checkpoint(self) -> Path:
        return self.folder / self.meta["checkpoint"]


def find_golden_cases(root: Path, families: set[str] | None = None) -> list[GoldenCase]:
    """Every folder holding a case.json (a case folder is a leaf, as in check.py), sorted; filtered by family."""
    cases = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        if "case.json" in filenames:
            dirnames[:] = []
            meta = json.loads((Path(dirpath) / "case.json").read_text())
            if families is None or meta.get("family") in families:
                cases.append(GoldenCase(Path(dirpath), meta))
    return cases


@pytest.fixture(scope="session")
def golden_root() -> Path:
    root = golden_root_path()
    if not root.is_dir():
        skip_or_fail(f"golden cases not found at {root} (set VITKIT_GOLDEN to the folder holding them)")
    return root


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "golden_case" not in metafunc.fixturenames:
        return
    families = getattr(metafunc.module, "GOLDEN_FAMILIES", None)
    root = golden_root_path()
    cases = find_golden_cases(root, families) if root.is_dir() else []
    if cases:
        metafunc.parametrize("golden_case", cases, ids=[c.case_id for c in cases])
    else:  # the test body reports why (no root, or no case of these families)
        metafunc.parametrize("golden_case", [None], ids=["no-golden-cases"])


# ------------------------------------------------------------------------------------------------------- helpers
@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def tiny_overrides(name: str, **extra: Any) -> dict[str, Any]:
    """The tiny configuration the variant's family registers (fast forward and backward), plus ``extra``."""
    import vitkit
    return {**vitkit.get_spec(name).tiny, **extra}


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Overwrite every parameter with seeded values that keep activations O(1), as the golden cases do:
    dense/conv kernels N(0, 1/fan_in), norm weights 1 + 0.1 N, biases 0.02 N, tokens and position embeddings
    N(0, 0.02) (here 0.5 for tokens so they matter). Zero-initialised heads would make parity tests vacuous."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("bias"):
                p.copy_(0.02 * noise)
            elif p.ndim == 1:  # LayerNorm weight, LayerScale gamma
                p.copy_(1 + 0.1 * noise)
            elif name.endswith(("cls_token", "dist_token", "pos_embed", "distillation_token", "position_embeddings")):
                p.copy_(0.5 * noise)
            else:
                fan_in = math.prod(p.shape[1:])
                p.copy_(noise / math.sqrt(fan_in))
    return model


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().float() - b.detach().float()).abs().max().item()


@pytest.fixture
def eager_compile(monkeypatch):
    """``torch.compile`` with dynamo's "eager" backend: graph capture without inductor's C++ code generation, which
    takes minutes on a loaded 2-core CPU. Yields the list of modules handed to ``torch.compile``; dynamo's counters
    (``torch._dynamo.utils.counters``) start from zero."""
    from torch._dynamo.utils import counters
    real, compiled = torch.compile, []

    def compile_recorded(model, **kw):
        compiled.append(model)
        return real(model, backend="eager")

    monkeypatch.setattr(torch, "compile", compile_recorded)
    torch._dynamo.reset()
    counters.clear()
    yield compiled
    torch._dynamo.reset()


def eval_forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``model(x)`` in eval mode without autograd."""
    model.eval()
    with torch.no_grad():
        return model(x)


def golden_close(out: torch.Tensor, ref: torch.Tensor, tol: float = 1e-4) -> bool:
    """The golden cases' criterion: |out - ref| <= tol + tol·|ref| everywhere."""
    return bool(((out - ref).abs() <= tol + tol * ref.abs()).all())

