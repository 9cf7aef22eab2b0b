"""The import layering the family-contract issue asked for: the weight loaders do not import the registry (plain data
specs live in the leaf module vitkit.specs), evaluation does not import training (the run-folder layout lives in
vitkit.runs), and the model layers import no model family."""
from __future__ import annotations

import subprocess
import sys

import pytest

CASES = [
    ("vitkit.weights", ("vitkit.registry", "vitkit.models")),
    ("vitkit.specs", ("vitkit.registry", "vitkit.weights", "vitkit.models", "torch")),
    ("vitkit.evaluate", ("vitkit.train",)),
    ("vitkit.runs", ("vitkit.train", "vitkit.evaluate", "torch")),
    ("vitkit.layers", ("vitkit.models", "vitkit.registry")),
]


@pytest.mark.parametrize("module,forbidden", CASES, ids=[c[0] for c in CASES])
def test_module_does_not_import(module, forbidden):
    code = (f"import sys, importlib; importlib.import_module({module!r}); "
            f"print(' '.join(m for m in {list(forbidden)!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "", f"importing {module} imported {out.stdout.strip()}"
