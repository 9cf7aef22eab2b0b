"""`vitkit export MODEL_OR_RUN OUT --format onnx|torch-export|openvino`: a model folder that runs outside eager
PyTorch, accepted only after a parity check in its own runtime."""
from __future__ import annotations

import argparse
import os

MAX_IMAGES = 256  # --check-images and --calibrate: enough for a check, and a bound on memory and time

HELP = "export a model to ONNX, torch.export or OpenVINO, checked against eager PyTorch in the target runtime"

EPILOG = """examples:
  vitkit export deit_tiny_patch16_224 out/deit_onnx --pretrained deit_tiny.safetensors
  vitkit export runs/c10 out/c10_onnx --check-images photos/            a run folder: its best checkpoint
  vitkit export runs/c10 out/c10_int8 --int8                            int8 (ONNX Runtime; scheme per CPU kind)
  vitkit export runs/c10 out/c10_int8 --int8 --calibrate train_imgs/    int8 with activation ranges calibrated
  vitkit export swin_tiny_patch4_window7_224 out/swin_ov --format openvino
  vitkit predict photo.jpg --model out/deit_onnx                        an export folder is a model

OUT is a folder: the model file (model.onnx, model.pt2 or model.xml/.bin) and vitkit.json (preprocessing, class
names, the int8 scheme and why, the parity numbers). The batch axis is dynamic. The export is compared with eager
PyTorch on random inputs (batch 1 and 3) and on --check-images (all of them, up to 256, in batches of 32): fp32 must
agree to 1e-4; int8 must keep a logit cosine similarity >= 0.99 on every input and the top-1 class of >= 99% of the
images (or of all but one). A model with an all-zero head (random init) is compared on its pre-logit features. A
failed check writes nothing and exits with status 1."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from vitkit.deploy.names import FORMATS
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("source", metavar="MODEL_OR_RUN",
                        help="a registered variant name, or a vitkit model / run folder")
    parser.add_argument("out", metavar="OUT", help="output folder (must not exist or be empty, unless --force)")
    parser.add_argument("--format", choices=FORMATS, default="onnx", help="export format (default onnx)")
    parser.add_argument("--pretrained", metavar="PATH|true",
                        help="weights for a variant name, in any format vitkit reads, or true: the variant's named "
                             "weights")
    parser.add_argument("--int8", action="store_true",
                        help="int8 through ONNX Runtime, the scheme chosen for this CPU kind (see vitkit.json)")
    parser.add_argument("--calibrate", metavar="DIR_OR_FILES", nargs="+",
                        help="with --int8: calibrate the activation ranges on these images (static quantisation; "
                             f"up to {MAX_IMAGES} are used)")
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    parser.add_argument("--check-images", metavar="DIR_OR_FILES", nargs="+",
                        help="real images for the parity check, preprocessed as the model's data config says "
                             f"(up to {MAX_IMAGES})")
    parser.add_argument("--force", action="store_true", help="replace a non-empty OUT")


def _target(args: argparse.Namespace):
    from vitkit.evaluate.targets import load_target
    if os.path.exists(args.source):
        if args.pretrained:
            raise ValueError("--pretrained goes with a variant name, not with a model or run folder")
        return load_target(args.source, None)
    if os.sep in args.source or "/" in args.source:  # a path, not a variant name
        raise FileNotFoundError(f"{args.source}: no such model or run folder")
    return load_target(args.pretrained, args.source)


def _images(paths: list[str] | None, model):
    """Up to ``MAX_IMAGES`` images, in sorted order, preprocessed as the model's data config says."""
    if not paths:
        return None
    import torch

    from vitkit.data.images import load_image
    from vitkit.evaluate.predict import expand_inputs
    from vitkit.evaluate.preprocess import eval_transform
    files = expand_inputs(paths)
    if not files:
        raise FileNotFoundError(f"no image files found in {' '.join(paths)}")
    transform = eval_transform(model.data_cfg)
    return torch.stack([transform(load_image(f)) for f in files[:MAX_IMAGES]])


def run(args: argparse.Namespace) -> int:
    from vitkit.deploy import ExportError, export_model
    target = _target(args)
    model = target.model.cpu().eval()
    try:
        result = export_model(model, args.out, args.format, int8=args.int8, opset=args.opset,
                              images=_images(args.check_images, model), force=args.force,
                              calibration=_images(args.calibrate, model))
    except ExportError as e:  # why the exporter or the parity check failed: one line; the check's numbers on stdout
        import sys
        if e.parity is not None:
            print(e.parity.summary())
        print(f"vitkit export: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 1
    print(result.parity.summary())
    if result.quantization:
        print(f"int8 scheme: {result.quantization['scheme']} ({result.quantization['chosen_for']})")
    print(f"wrote {result.folder} ({args.format}{', int8' if args.int8 else ''}) from {target.description}")
    return 0
