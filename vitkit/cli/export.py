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
  vitkit export runs/c10 out/c10_ov8 --format openvino --int8 --calibrate train_imgs/   OpenVINO int8 (NNCF, static)
  vitkit export swin_tiny_patch4_window7_224 out/swin_ov --format openvino
  vitkit predict photo.jpg --model out/deit_onnx                        an export folder is a model
  vitkit export runs/c10 out/c10_fast --fastest --batch-size 16          the fastest path keeping >= 99% agreement

OUT is a folder: the model file (model.onnx, model.pt2 or model.xml/.bin) and vitkit.json (preprocessing, class
names, the int8 scheme and why, the parity numbers). The batch axis is dynamic. The export is compared with eager
PyTorch on random inputs (batch 1 and 3) and on --check-images (all of them, up to 256, in batches of 32): fp32 must
agree to 1e-4; int8 must keep a logit cosine similarity >= 0.99 on every input and the top-1 class of >= 99% of the
images (or of all but one). A model with an all-zero head (random init) is compared on its pre-logit features. A
failed check writes nothing and exits with status 1.

--fastest builds every export this CPU can run (ONNX Runtime fp32 and int8, OpenVINO f32, int8 when calibration images
are given (--calibrate, or a CIFAR-10 run's held-out validation images) and, where bf16 is native, bf16, torch.export),
times them against eager fp32 at --batch-size, measures their top-1 agreement with eager fp32 on
real images (the shipped photos, a CIFAR-10 run's first 2,000 test images, --agreement-images) and writes the fastest
that agrees on >= 99%; vitkit.json records the choice, the table and the agreement ("fastest"), and the runtime the
folder then runs in."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from vitkit.deploy.names import FORMATS
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("source", metavar="MODEL_OR_RUN",
                        help="a registered variant name, or a vitkit model / run folder")
    parser.add_argument("out", metavar="OUT", help="output folder (must not exist or be empty, unless --force)")
    parser.add_argument("--format", choices=FORMATS, help="export format (default onnx)")
    parser.add_argument("--pretrained", metavar="PATH|true",
                        help="weights for a variant name, in any format vitkit reads, or true: the variant's named "
                             "weights")
    parser.add_argument("--int8", action="store_true",
                        help="int8: ONNX Runtime's (dynamic, or static with --calibrate; the scheme chosen for this "
                             "CPU kind), or with --format openvino NNCF's static int8 (needs --calibrate); see "
                             "vitkit.json")
    parser.add_argument("--calibrate", metavar="DIR_OR_FILES", nargs="+",
                        help="with --int8 (or --fastest, for its int8 path): calibrate the activation ranges on "
                             f"these images (static quantisation; up to {MAX_IMAGES} are used)")
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    parser.add_argument("--check-images", metavar="DIR_OR_FILES", nargs="+",
                        help="real images for the parity check, preprocessed as the model's data config says "
                             f"(up to {MAX_IMAGES})")
    parser.add_argument("--force", action="store_true", help="replace a non-empty OUT")
    fastest = parser.add_argument_group("--fastest (opt-in; the default export is what --format names, in fp32)")
    fastest.add_argument("--fastest", action="store_true",
                         help="write the fastest export on this CPU whose top-1 agreement with eager fp32 on real "
                              "images is >= 99%% (the table it chose from is printed and kept in vitkit.json)")
    fastest.add_argument("--batch-size", type=int, default=8, help="the batch --fastest times and checks (default 8)")
    from vitkit.cli.eval import add_agreement_argument
    add_agreement_argument(fastest, "--fastest")


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
    from vitkit.deploy.best import folder_images
    return folder_images(paths, model, MAX_IMAGES) if paths else None


def _check_fastest_request(args: argparse.Namespace) -> None:
    """One-line errors for options that do not go with ``--fastest`` (or need it), before anything is built."""
    if not args.fastest:
        if args.agreement_images:
            raise ValueError("--agreement-images goes with --fastest")
        return
    given = [flag for flag, on in (("--format", args.format), ("--int8", args.int8)) if on]
    if given:
        raise ValueError(f"--fastest chooses the format and the precision; drop {', '.join(given)}")
    if args.batch_size < 1:
        raise ValueError("--batch-size must be >= 1")
    if args.agreement_images and not os.path.isdir(args.agreement_images):
        raise FileNotFoundError(f"--agreement-images {args.agreement_images}: no such folder")
    if os.path.exists(args.out) and (not os.path.isdir(args.out) or os.listdir(args.out)) and not args.force:
        raise ValueError(f"{args.out} exists and is not empty; choose another folder or pass --force to replace it")


def _run_fastest(args: argparse.Namespace, target) -> int:
    """``--fastest``: build every path in a workspace beside OUT, choose (``vitkit.deploy.best``), move the chosen
    export to OUT with the choice recorded in its vitkit.json."""
    import shutil
    import sys
    import tempfile

    from vitkit.deploy import best
    from vitkit.deploy.export import Parity
    model = target.model.cpu().eval()
    images = best.agreement_images(model, (target.run_config or {}).get("data"), args.agreement_images)
    best.check_reference(model, images)
    parent = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(parent, exist_ok=True)
    workspace = tempfile.mkdtemp(prefix=".fastest-", dir=parent)
    try:
        calibration = best.calibration_images(model, (target.run_config or {}).get("data"),
                                              _images(args.calibrate, model))
        built = best.build_paths(model, workspace, calibration,
                                 check_images=_images(args.check_images, model))
        try:
            choice = best.choose(built, images, args.batch_size, best.default_timer(), exportable_only=True)
        except best.NoExportQualifies as e:
            print("\n".join(e.choice.table_lines()))
            print(f"vitkit export: error: {e}; nothing was written", file=sys.stderr)
            return 1
        print("\n".join(choice.table_lines()))
        if os.path.isdir(args.out):
            shutil.rmtree(args.out)  # empty, or --force
        meta = best.write_fastest_export(choice, args.out)
    finally:
        shutil.rmtree(workspace, ignore_errors=True)
    print(Parity(**meta["parity"]).summary())
    print(f"wrote {args.out} ({choice.chosen}: {meta['format']}, runs in {choice.runtime}) from {target.description};"
          f" vitkit.json records the choice, the table and the agreement")
    return 0


def run(args: argparse.Namespace) -> int:
    from vitkit.deploy import ExportError, export_model
    _check_fastest_request(args)
    target = _target(args)
    if args.fastest:
        return _run_fastest(args, target)
    args.format = args.format or "onnx"
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
