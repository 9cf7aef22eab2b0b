"""Export formats and runtimes by name (no torch import: the command-line front-end reads them for ``--help``)."""
FORMATS = ("onnx", "torch-export", "openvino")
#: runtime name → the export format it runs (None: the eager PyTorch model itself)
RUNTIMES = {"eager": None, "onnxruntime": "onnx", "openvino": "openvino", "torch-export": "torch-export"}
