"""`vitkit export MODEL_OR_RUN OUT --format onnx|torch-export|openvino`: a model folder that runs outside eager
PyTorch, accepted only after a parity check in its own runtime."""
from __future__ import annotations

import argparse
import os

HELP = "export a model to ONNX, torch.export or OpenVINO, checked against eager PyTorch in the target runtime"

EPILOG = """examples:
  vitkit export deit_tiny_patch16_224 out/deit_onnx --pretrained deit_tiny.safetensors
  vitkit export runs/c10 out/c10_onnx --check-images photos/            a run folder: its best checkpoint
  vitkit export runs/c10 out/c10_int8 --int8                            int8 weights (ONNX Runtime dynamic)
  vitkit export swin_tiny_patch4_window7_224 out/swin_ov --format openvino

OUT is a folder: the model file (model.onnx, model.pt2 or model.xml/.bin) and vitkit.json (preprocessing, class
names, the parity numbers). The batch axis is dynamic. The export is compared with eager PyTorch on random inputs
(batch 1 and 3) and on --check-images: fp32 must agree to 1e-4, int8 must keep a logit cosine similarity >= 0.99
(its top-1 agreement is printed). A failed check writes nothing and exits with status 1."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from vitkit.deploy.names import FORMATS
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("source", metavar="MODEL_OR_RUN",
                        help="a registered variant name, or a vitkit model / run folder")
    parser.add_argument("out", metavar="OUT", help="output folder (must not exist or be empty, unless --force)")
    parser.add_argument("--format", choices=FORMATS, default="onnx", help="export format (default onnx)")
    parser.add_argument("--pretrained", metavar="PATH", help="weights for a variant name, in any format vitkit reads")
    parser.add_argument("--int8", action="store_true", help="int8 weights by ONNX Runtime's dynamic quantisation")
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    parser.add_argument("--check-images", metavar="DIR_OR_FILES", nargs="+",
                        help="real images for the parity check, preprocessed as the model's data config says")
    parser.add_argument("--force", action="store_true", help="replace a non-empty OUT")


def _target(args: argparse.Namespace):
    from vitkit.evaluate.targets import load_target
    if os.path.exists(args.source):
        if args.pretrained:
            raise ValueError("--pretrained goes with a variant name, not with a model or run folder")
        return load_target(args.source, None)
    return load_target(args.pretrained, args.source)


def _images(args: argparse.Namespace, model):
    if not args.check_images:
        return None
    import torch

    from vitkit.data.images import load_image
    from vitkit.evaluate.predict import expand_inputs
    from vitkit.evaluate.preprocess import eval_transform
    files = expand_inputs(args.check_images)
    if not files:
        raise FileNotFoundError(f"no image files found in {' '.join(args.check_images)}")
    transform = eval_transform(model.data_cfg)
    return torch.stack([transform(load_image(f)) for f in files[:16]])


def run(args: argparse.Namespace) -> int:
    from vitkit.deploy import ExportError, export_model
    target = _target(args)
    model = target.model.cpu().eval()
    try:
        result = export_model(model, args.out, args.format, int8=args.int8, opset=args.opset,
                              images=_images(args, model), force=args.force)
    except ExportError as e:  # the numbers of a failed parity check, or why the exporter failed
        import sys
        print(f"vitkit export: error: {e}", file=sys.stderr)
        return 1
    print(result.parity.summary())
    print(f"wrote {result.folder} ({args.format}{', int8' if args.int8 else ''}) from {target.description}")
    return 0
