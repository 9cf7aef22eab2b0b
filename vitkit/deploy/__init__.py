"""Running vitkit models outside eager PyTorch: export (ONNX, torch.export, OpenVINO) with a parity check in the
exported model's own runtime, int8 quantisation with a scheme chosen per CPU kind (``vitkit.deploy.quantize``), and the
runtimes behind ``--runtime`` and behind an export folder given as the model.

Names are imported on first use (PEP 562), so ``vitkit.deploy.names`` can be read without importing torch."""
from __future__ import annotations

import importlib
from typing import Any

_LAZY = {"FORMATS": "vitkit.deploy.names", "RUNTIMES": "vitkit.deploy.names",
         "ExportError": "vitkit.deploy.export", "ExportResult": "vitkit.deploy.export", "Parity": "vitkit.deploy.export",
         "check_parity": "vitkit.deploy.export", "export_model": "vitkit.deploy.export",
         "RuntimeModel": "vitkit.deploy.runtime", "open_runtime": "vitkit.deploy.runtime",
         "to_runtime": "vitkit.deploy.runtime", "is_export_folder": "vitkit.deploy.runtime",
         "open_export_folder": "vitkit.deploy.runtime", "choose_scheme": "vitkit.deploy.quantize"}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'vitkit.deploy' has no attribute {name!r}")
