"""`vitkit predict`: top-k classes for image files and folders."""
from __future__ import annotations

import argparse
import csv
import json
import sys
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from vitkit.evaluate.predict import Prediction

HELP = "top-k predicted classes for images or folders of images"

FORMATS = ("table", "json", "csv")

EPILOG = """examples:
  vitkit predict photo.jpg --model deit_tiny_patch16_224 --pretrained deit_tiny.safetensors
  vitkit predict photos/ --pretrained runs/c10 --format json        a run folder: its best checkpoint
  vitkit predict a.png b.jpg --pretrained saved_model/ --format csv --topk 3
  vitkit predict photos/ --pretrained runs/c10 --runtime best         fastest path keeping >= 99% agreement

preprocessing (size, crop, interpolation, mean/std, channel order) and class names come from the checkpoint.
an unreadable file gets an error row; the others are still predicted.
exit status: 0 at least one image predicted, 1 none could be read, 2 bad arguments."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("images", nargs="+", metavar="IMAGES_OR_FOLDERS",
                        help="image files and/or folders (searched recursively)")
    parser.add_argument("--model", help="registered variant name (`vitkit models`; optional when --pretrained is "
                                        "a vitkit model or run folder), or a folder written by `vitkit export`")
    parser.add_argument("--pretrained", metavar="PATH|true",
                        help="checkpoint in any format vitkit reads, a vitkit model folder, a run folder (its "
                             "checkpoints/best, else last), or true: the --model variant's named weights (downloaded "
                             "once, verified; `vitkit models --pretrained` lists them)")
    parser.add_argument("--topk", type=int, default=5, help="classes per image (default 5)")
    parser.add_argument("--format", choices=FORMATS, default="table", help="output format (default table)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per forward pass (default 16)")
    parser.add_argument("--device", help="e.g. cpu, cuda, cuda:1, mps (default: an accelerator if present)")
    from vitkit.cli.eval import add_amp_argument, add_runtime_arguments
    add_amp_argument(parser)
    add_runtime_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from vitkit.evaluate.predict import image_files, predict_files
    from vitkit.cli.eval import apply_runtime, check_best_arguments, open_export, precision
    from vitkit.deploy.runtime import is_export_folder
    from vitkit.evaluate.targets import load_target
    from vitkit.hardware import parse_device
    if args.topk < 1 or args.batch_size < 1:
        raise ValueError("--topk and --batch-size must be >= 1")
    files = image_files(args.images)  # a typo in a path is an error, before the model loads
    device = parse_device(args.device)
    check_best_arguments(args)
    amp = precision(args, device)
    if is_export_folder(args.model):  # a folder from `vitkit export`: it runs as exported
        model, amp = open_export(args, args.model), None
    else:
        target = load_target(args.pretrained, args.model)
        run_data = (target.run_config or {}).get("data")  # --runtime best: a CIFAR-10 run adds its test images
        model = apply_runtime(args, target.model.to(device), device, run_data, min(args.batch_size, len(files)),
                              out=sys.stderr)  # best's table on stderr: stdout is the json/csv output
    if args.runtime != "eager":
        amp = None  # an exported model runs in fp32 (int8 weights with --int8); best's path computes as chosen
    predictions = predict_files(model, files, topk=args.topk, batch_size=args.batch_size, amp_dtype=amp)
    WRITERS[args.format](predictions, sys.stdout)
    return 0 if any(p.ok for p in predictions) else 1


def write_table(predictions: list[Prediction], out: TextIO) -> None:
    """One block per image: the path, then ``rank  probability  class`` lines (or the error)."""
    for i, p in enumerate(predictions):
        if i:
            out.write("\n")
        out.write(f"{p.path}\n")
        if not p.ok:
            out.write(f"  error: {p.error}\n")
            continue
        for rank, (index, name, prob) in enumerate(p.topk, start=1):
            out.write(f"  {rank:>2}  {prob:7.4f}  {name}  [{index}]\n")


def write_json(predictions: list[Prediction], out: TextIO) -> None:
    json.dump([p.to_dict() for p in predictions], out, indent=1)
    out.write("\n")


def write_csv(predictions: list[Prediction], out: TextIO) -> None:
    """One row per (image, rank); an unreadable image gets one row with only ``path`` and ``error`` filled."""
    w = csv.writer(out)
    w.writerow(["path", "rank", "index", "label", "probability", "error"])
    for p in predictions:
        if not p.ok:
            w.writerow([p.path, "", "", "", "", p.error])
        for rank, (index, name, prob) in enumerate(p.topk, start=1):
            w.writerow([p.path, rank, index, name, f"{prob:.6f}", ""])


WRITERS = {"table": write_table, "json": write_json, "csv": write_csv}
