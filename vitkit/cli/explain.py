"""`vitkit explain IMAGES --model/--pretrained ... --method ...`: where the model looked, as PNG overlays and one
self-contained HTML report."""
from __future__ import annotations

import argparse
import os

HELP = "explain predictions: attention maps, rollout, relevance, Grad-CAM; PNG overlays and an HTML report"

EPILOG = """examples:
  vitkit explain photo.jpg --model deit_tiny_patch16_224 --pretrained deit_tiny.safetensors --out explain/
  vitkit explain photos/ --pretrained runs/c10 --method rollout,gradcam
  vitkit explain photo.jpg --model swin_tiny_patch4_window7_224 --pretrained swin.pth --method attention,gradcam

  vitkit explain photos/ --model deit_tiny_patch16_224 --pretrained deit_tiny.safetensors --figure7 --faithfulness

methods: attention (every layer and head, at the model's read-out), rollout (Abnar & Zuidema 2020) and relevance
(Chefer et al. 2021) for token models, gradcam for every model. Default: every method the model supports.
writes OUT/<image>_<method>.png and OUT/report.html (images embedded; browse attention by layer and head).
--figure7 adds the ViT paper's Figure 7 over the images (OUT/figure7.png, mean attention distance per layer printed);
--faithfulness prints the model-randomisation check (Adebayo et al. 2018) and the deletion test (Petsiuk et al.
2018) of every method over the images (also OUT/faithfulness.json)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("images", nargs="+", metavar="IMAGES_OR_FOLDERS", help="image files and/or folders")
    parser.add_argument("--model", help="registered variant name; optional with a vitkit model or run folder")
    parser.add_argument("--pretrained", metavar="PATH|true",
                        help="checkpoint in any format, a model or a run folder, or true: the --model variant's named "
                             "weights")
    parser.add_argument("--method", default="auto", help="comma-separated: attention, rollout, relevance, gradcam "
                                                         "(default: all the model supports)")
    parser.add_argument("--target", type=int, help="class index to explain (default: the predicted class)")
    parser.add_argument("--out", default="explain", help="output folder (default ./explain)")
    parser.add_argument("--max-images", type=int, default=32, help="at most this many images (default 32)")
    parser.add_argument("--figure7", action="store_true", help="the ViT paper's Figure 7 over the images (token models)")
    parser.add_argument("--faithfulness", action="store_true",
                        help="randomisation check and deletion test of every method over the images")


def _methods(text: str, model) -> list[str]:
    from vitkit.explain import METHODS
    supported = list(METHODS) if model.intermediates == "tokens" else ["attention", "gradcam"]
    if text == "auto":
        return supported
    chosen = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown --method {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    unfit = [m for m in chosen if m not in supported]
    if unfit:
        raise ValueError(f"--method {', '.join(unfit)} needs a token model; {model.variant_name} is hierarchical "
                         f"(use attention or gradcam)")
    return chosen


def run(args: argparse.Namespace) -> int:
    import torch

    from vitkit.evaluate.predict import image_files
    from vitkit.evaluate.targets import load_target
    from vitkit.explain.pipeline import explain_files
    if args.max_images < 1:
        raise ValueError(f"--max-images must be >= 1, got {args.max_images}")
    if args.target is not None and args.target < 0:
        raise ValueError(f"--target {args.target}: a class index is >= 0")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise FileExistsError(f"--out {args.out} is a file; give a folder")
    files = image_files(args.images)[: args.max_images]
    _check_readable(files)
    target = load_target(args.pretrained, args.model)
    model = target.model.cpu().eval()
    methods = _methods(args.method, model)
    if args.target is not None and args.target >= model.num_classes:
        raise ValueError(f"--target {args.target}: {model.variant_name} has {model.num_classes} classes "
                         f"(0 to {model.num_classes - 1})")
    os.makedirs(args.out, exist_ok=True)
    with torch.no_grad():
        report, written, failed = explain_files(model, files, methods, args.out, args.target)
    for path, error in failed:
        print(f"{path}: error: {error}")
    print(f"wrote {len(written)} overlays and {report} ({', '.join(methods)}; {target.description})")
    if written and (args.figure7 or args.faithfulness):
        from vitkit.explain.pipeline import load_images
        images = load_images(model, [f for f in files if f not in dict(failed)])
        if args.figure7:
            _figure7(model, images, args.out)
        if args.faithfulness:
            _faithfulness(model, images, methods, args.out)
    return 0 if written else 1


def _check_readable(files: list[str]) -> None:
    """Nothing to explain (no file decodes as an image) is an error before anything is written; a few unreadable
    files among readable ones are reported in the output instead."""
    from vitkit.data.images import ImageLoadError, load_image
    errors = []
    for path in files:
        try:
            load_image(path)
            return
        except ImageLoadError as e:
            errors.append(e)
    first = errors[0]
    raise ValueError(f"{first.path} is not an image ({first.reason})" if len(errors) == 1 else
                     f"none of the {len(errors)} files is an image ({first.path}: {first.reason}; ...)")


def _figure7(model, images, out: str) -> None:
    from vitkit.explain.figure7 import figure7, plot_figure7
    if model.intermediates != "tokens":
        raise ValueError(f"--figure7 needs a token model; {model.variant_name} is hierarchical")
    fig = figure7(model, images)
    path = plot_figure7(fig, os.path.join(out, "figure7.png"), f"{model.variant_name}, {len(images)} images")
    print(f"wrote {path}; mean attention distance (pixels) per layer, min / mean / max over heads:")
    for i, row in enumerate(fig.distance):
        print(f"  layer {i + 1:2d}  {row.min():6.1f} / {row.mean():6.1f} / {row.max():6.1f}")
    for note in fig.notes:
        print(f"  note: {note}")


def _faithfulness(model, images, methods: list[str], out: str) -> None:
    import json

    from vitkit.explain.faithfulness import deletion_curve, randomisation_check
    rows = {}
    print(f"faithfulness over {len(images)} images (randomisation: Spearman rho of real vs randomised-weights maps, "
          f"near 0 passes; deletion: AUC of the predicted class's probability, lower than random passes)")
    for method in methods:
        rho = randomisation_check(model, images, method)
        d = deletion_curve(model, images, method)
        rows[method] = dict(spearman_mean=sum(rho) / len(rho), spearman=rho, deletion_auc=d.method_auc,
                            random_auc=d.random_auc, fractions=d.fractions, curve=d.method_curve,
                            random_curve=d.random_curve)
        print(f"  {method:10s} rho {rows[method]['spearman_mean']:+.3f}   deletion AUC {d.method_auc:.3f} "
              f"vs random {d.random_auc:.3f}")
    with open(os.path.join(out, "faithfulness.json"), "w") as f:
        json.dump(rows, f, indent=1)
