"""Running vitkit models outside eager PyTorch: export (ONNX, torch.export, OpenVINO) with a parity check in the
exported model's own runtime, int8 dynamic quantisation, and the runtimes behind ``--runtime``."""
from vitkit.deploy.export import FORMATS, ExportError, ExportResult, Parity, check_parity, export_model
from vitkit.deploy.runtime import RUNTIMES, RuntimeModel, open_runtime, to_runtime

__all__ = ["FORMATS", "RUNTIMES", "ExportError", "ExportResult", "Parity", "RuntimeModel", "check_parity",
           "export_model", "open_runtime", "to_runtime"]
