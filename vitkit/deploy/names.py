"""Export formats and runtimes by name (no torch import: the command-line front-end reads them for ``--help``)."""
FORMATS = ("onnx", "torch-export", "openvino")
#: runtime name → the export format it runs (None: the eager PyTorch model itself)
RUNTIMES = {"eager": None, "onnxruntime": "onnx", "openvino": "openvino", "openvino-bf16": "openvino",
            "torch-export": "torch-export"}
#: the inference precision each OpenVINO runtime asks for. fp32 is asked for explicitly: on CPUs with AMX or
#: AVX-512-bf16 the CPU plugin computes in bf16 unless told otherwise. bf16 is its own runtime, accepted
#: by an agreement check like int8 rather than by fp32's 1e-4.
OPENVINO_PRECISION = {"openvino": "f32", "openvino-bf16": "bf16"}
