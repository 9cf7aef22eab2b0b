"""`vitkit eval`: accuracy of a model on a labelled dataset, with per-class accuracy and a confusion matrix."""
from __future__ import annotations

import argparse
import logging
import math
import os
from typing import Any

HELP = "evaluate a run, a saved model or any checkpoint on a dataset (top-1/top-5, per-class, confusion matrix)"

EPILOG = """examples:
  vitkit eval runs/c10                          best checkpoint (else last) on the run's own test split
  vitkit eval runs/c10 --split val --out /tmp/ev
  vitkit eval saved_model/ --set data.name=digits data.img_size=32
  vitkit eval --model deit_tiny_patch16_224 --pretrained w.safetensors --data-config recipe.yaml
  vitkit eval --model cct_7_3x1_32 --pretrained true --set data.name=cifar10 data.root=DIR   named weights

writes metrics.json, per_class.csv, confusion_matrix.csv and confusion_matrix.png into --out.
exit status: 0 done, 2 bad arguments or configuration."""

MAX_PRINTED_CLASSES = 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("target", nargs="?", metavar="TARGET",
                        help="a run folder (runs/<name>: checkpoints/best, else last, and its data section) or a "
                             "vitkit model folder; omit it to use --model/--pretrained")
    parser.add_argument("--model", help="registered variant name, to load --pretrained (or TARGET) into; or a folder "
                                        "written by `vitkit export`, run as exported")
    parser.add_argument("--pretrained", metavar="PATH|true", help="checkpoint in any format vitkit reads, or true: "
                                                                 "the --model variant's named weights (downloaded "
                                                                 "once, verified; `vitkit models --pretrained`)")
    data = parser.add_argument_group("data (layered: model → run config.yaml → --data-config → --set)")
    data.add_argument("--data-config", metavar="YAML", help="a recipe with a data: section, or a bare data section")
    data.add_argument("--set", nargs="+", action="extend", default=[], metavar="data.KEY=VALUE",
                      help="override data settings, e.g. --set data.name=cifar10 data.root=../shared/data")
    data.add_argument("--split", choices=("test", "val"), default="test", help="split to score (default test)")
    parser.add_argument("--out", metavar="DIR", help="output folder (default: <run>/eval/<split>, or "
                                                     "./eval/<model>-<split>)")
    parser.add_argument("--batch-size", type=int, help="images per batch (default: a run's own evaluation batch, "
                                                        "else 64)")
    parser.add_argument("--tta", choices=("none", "hflip"), default="none",
                        help="test-time augmentation; hflip: the mean logits of each image and its mirror image "
                             "(twice the cost; default none)")
    parser.add_argument("--device", help="e.g. cpu, cuda, mps (default: an accelerator if present)")
    add_amp_argument(parser)
    add_runtime_arguments(parser)
    add_probe_arguments(parser)


def add_amp_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--amp", choices=("none", "auto", "bf16", "fp16"), default=None,
                        help="autocast dtype. Default: fp32 (none), the same numbers on every CPU and equal to timm's "
                             "and transformers' (a run folder: the precision of the run's own test pass, so its "
                             "number is reproduced); auto: bf16 where the device runs it natively, the opt-in fast "
                             "path (probabilities move in about the third digit); bf16, fp16: always")


def add_runtime_arguments(parser: argparse.ArgumentParser) -> None:
    from vitkit.deploy.names import RUNTIMES
    parser.add_argument("--runtime", choices=(*RUNTIMES, "best"), default="eager",
                        help="run the model in eager PyTorch (default) or exported (parity-checked) to ONNX Runtime, "
                             "OpenVINO or torch.export; exported runtimes run on the CPU in fp32 (--amp is ignored), "
                             "openvino-bf16 in bf16 where the CPU has it; an export folder runs in its own runtime. "
                             "best (opt-in): the fastest path on this CPU (eager fp32/bf16, ONNX Runtime fp32/int8, "
                             "OpenVINO, torch.export) that keeps >= 99%% top-1 agreement with eager fp32 on real "
                             "images, measured now; the table it chose from is printed")
    parser.add_argument("--int8", action="store_true",
                        help="with --runtime onnxruntime: int8 weights (the scheme chosen per CPU; see vitkit export)")
    add_agreement_argument(parser)
    add_calibrate_argument(parser)


def add_calibrate_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--calibrate", metavar="DIR",
                        help="with --runtime best: calibrate its static int8 paths (OpenVINO int8, ONNX Runtime static "
                             "int8) on the images in DIR (up to 300; default: a CIFAR-10 run's held-out images)")


def calibration_of(args: argparse.Namespace, model, run_data: dict[str, Any] | None):
    """``--runtime best``'s calibration images: ``--calibrate DIR``, else a CIFAR-10 run's (``vitkit.deploy.best``)."""
    from vitkit.deploy import best
    given = best.folder_images(args.calibrate, model, best.CALIBRATION_IMAGES) if args.calibrate else None
    return best.calibration_images(model, run_data, given)


def add_agreement_argument(parser, flag: str = "--runtime best") -> None:
    parser.add_argument("--agreement-images", metavar="DIR",
                        help=f"with {flag}: also measure agreement on the images in DIR (up to 2,000), besides the "
                             f"shipped photos and, for a run trained on CIFAR-10, 2,000 of its test images")


def check_best_arguments(args: argparse.Namespace) -> None:
    """``--runtime best`` chooses the precision and the runtime itself; its image folders only go with it."""
    if args.runtime == "best":
        given = [flag for flag, on in (("--int8", args.int8), ("--amp", getattr(args, "amp", None))) if on]
        if given:
            raise ValueError(f"--runtime best chooses the precision itself (int8, bf16 or fp32); drop "
                             f"{', '.join(given)}")
    check_best_folders(args)


def check_best_folders(args: argparse.Namespace) -> None:
    """``--agreement-images`` and ``--calibrate`` go with ``--runtime best`` and name existing folders."""
    for flag, folder in (("--agreement-images", args.agreement_images), ("--calibrate", args.calibrate)):
        if folder and args.runtime != "best":
            raise ValueError(f"{flag} goes with --runtime best")
        if folder and not os.path.isdir(folder):
            raise FileNotFoundError(f"{flag} {folder}: no such folder")


def run_best(args: argparse.Namespace, model, run_data: dict[str, Any] | None, batch_size: int, out=None):
    """``--runtime best``: the fastest path that keeps the model's answers (``vitkit.deploy.best``); prints the table
    it chose from to ``out`` (default stdout) and keeps the choice in ``args.best``."""
    from vitkit.deploy import best
    images = best.agreement_images(model, run_data, args.agreement_images)
    choice = best.select_fastest(model.cpu().eval(), images, batch_size, best.default_timer(),
                                 calibration=calibration_of(args, model, run_data))
    print("\n".join(choice.table_lines()), file=out, flush=True)
    args.best = choice
    return choice.module


def apply_runtime(args: argparse.Namespace, model, device, run_data: dict[str, Any] | None = None,
                  batch_size: int = 16, out=None):
    """``model`` itself for ``--runtime eager``; else the model exported to that runtime (a ``RuntimeModel``), after
    checking the request fits (CPU only; int8 only through ONNX Runtime); for ``best`` the path ``run_best`` chose
    (``run_data``: the data section of the run the model comes from; ``batch_size``: the batch it will run in)."""
    check_best_arguments(args)
    if args.runtime == "best":
        if str(device) != "cpu":
            raise ValueError(f"--runtime best measures CPU paths; drop --device {device}")
        return run_best(args, model, run_data, batch_size, out)
    if args.runtime == "eager":
        if args.int8:
            raise ValueError("--int8 needs --runtime onnxruntime")
        return model
    if str(device) != "cpu":
        raise ValueError(f"--runtime {args.runtime} runs on the CPU; drop --device {device}")
    if args.int8 and args.runtime != "onnxruntime":
        raise ValueError(f"--int8 is ONNX Runtime's dynamic quantisation: use --runtime onnxruntime, not {args.runtime}")
    from vitkit.deploy.runtime import to_runtime
    return to_runtime(model.cpu().eval(), args.runtime, int8=args.int8)


def open_export(args: argparse.Namespace, folder: str):
    """A folder written by ``vitkit export``, given as the model: it runs as exported, in its own runtime (or
    ``--runtime`` naming another runtime of its format), on the CPU."""
    if args.device not in (None, "cpu"):
        raise ValueError(f"{folder} is an exported model: it runs on the CPU; drop --device {args.device}")
    if args.runtime == "best":
        raise ValueError(f"{folder} is an exported model: it runs as exported; --runtime best chooses when exporting "
                         f"(vitkit export ... --fastest)")
    if args.pretrained:
        raise ValueError(f"{folder} is an exported model and carries its weights; drop --pretrained")
    from vitkit.deploy.runtime import open_export_folder
    return open_export_folder(folder, args.runtime, args.int8)


def precision(args: argparse.Namespace, device, run_precision: str | None = None):
    """The autocast dtype for ``--amp`` on ``device``: fp32 unless asked (``auto`` resolved by the hardware probe),
    or, when ``--amp`` is not given for a run folder, ``run_precision``: the precision its own test pass used. The line
    that says which is kept in ``args.precision_line`` for the report."""
    from vitkit.hardware import amp_dtype, precision_line, resolve_amp
    requested = args.amp or {"bf16": "bf16", "fp16": "fp16"}.get(run_precision or "", "none")
    resolved = resolve_amp(requested, device)
    args.precision_line = precision_line(requested, resolved, device)
    if args.amp is None and requested != "none":
        args.precision_line += " (the run's own test precision, from its summary.json; --amp none for fp32)"
    elif requested != "none":
        args.precision_line += " (opt-in fast path; the default is fp32)"
    logging.getLogger("vitkit").debug("%s", args.precision_line)
    return amp_dtype(resolved)


def add_probe_arguments(parser: argparse.ArgumentParser) -> None:
    """Feature probes of the frozen backbone: the ViT paper's few-shot linear evaluation (§4.1) and a linear probe."""
    g = parser.add_argument_group("feature probes (frozen pre-logit features; the classifier head is not used)")
    g.add_argument("--few-shot", metavar="K,K,...", type=_shots, default=(),
                   help="k-shot least-squares accuracy on the test split, e.g. 1,5,10,25 (ViT paper §4.1)")
    g.add_argument("--draws", type=int, default=5, help="random draws of the k images per class (default 5)")
    g.add_argument("--l2", type=float, default=2.0 ** 10, help="few-shot L2 strength (default 2^10, big_vision)")
    g.add_argument("--linear-probe", action="store_true",
                   help="logistic regression on the whole training split; L2 chosen on the held-out split")
    g.add_argument("--probe-seed", type=int, default=0, help="seed of the k-shot draws (default 0)")


def _shots(text: str) -> tuple[int, ...]:
    try:
        shots = tuple(int(k) for k in text.split(",") if k.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not shots or min(shots) < 1:
        raise argparse.ArgumentTypeError(f"shots must be positive integers, got {text!r}")
    return shots


def run_probes(model, data_cfg, args: argparse.Namespace, device, amp) -> dict[str, Any]:
    """Run the feature probes requested in ``args``; the result is stored under ``probes`` in metrics.json."""
    if not (args.few_shot or args.linear_probe):
        return {}
    from vitkit.data import build_splits
    from vitkit.evaluate.eval_data import dataset_transform
    from vitkit.evaluate.probe import run_probes as probe
    report = probe(model, build_splits(data_cfg), dataset_transform(data_cfg, model), args.few_shot,
                   args.linear_probe, args.draws, args.l2, args.probe_seed, args.batch_size, data_cfg.num_workers,
                   device, amp_dtype=amp)
    _print_probes(report)
    return report.to_dict()


def _print_probes(report) -> None:
    for r in report.few_shot:
        print(f"{r.shots:>3}-shot linear: {_pct(r.mean)} ± {100 * r.std:.2f}  ({len(r.accuracies)} draws)")
    if report.linear:
        print(f"linear probe: test {_pct(report.linear.test_accuracy)} (val {_pct(report.linear.val_accuracy)}, "
              f"l2 {report.linear.l2:g})")
    rates = ", ".join(f"{k} {v:.0f} img/s" for k, v in report.feature_images_per_second.items())
    print(f"feature extraction: {rates}")


def run(args: argparse.Namespace) -> int:
    from vitkit.evaluate.eval_data import build_eval_loader, resolve_data_config
    from vitkit.evaluate.metrics import evaluate, save_eval_artifacts
    from vitkit.deploy.runtime import is_export_folder
    from vitkit.evaluate.targets import NAMED_WEIGHTS_NEED_A_MODEL, Target, load_target
    from vitkit.evaluate.tta import with_tta
    from vitkit.runs import is_run_folder
    from vitkit.hardware import parse_device
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError("--batch-size must be >= 1")
    if args.target and args.pretrained:
        raise ValueError("give either TARGET or --pretrained, not both")
    from vitkit.weights.hub import requests_named_weights
    device = parse_device(args.device)
    path = args.target or args.pretrained
    named = not args.target and requests_named_weights(args.pretrained)  # --pretrained true: the catalog's weights
    if named and not args.model:
        raise ValueError(NAMED_WEIGHTS_NEED_A_MODEL)
    if path and not named and not os.path.exists(path):  # before asking for data: the first thing to fix is the path
        raise FileNotFoundError(f"{path}: no such {'run or model folder' if args.target else 'checkpoint'}")
    if args.data_config and not os.path.isfile(args.data_config):
        raise FileNotFoundError(f"--data-config {args.data_config}: "
                                f"{'a folder, not a YAML file' if os.path.isdir(args.data_config) else 'no such file'}")
    if not (path and is_run_folder(path)) and not args.data_config and not args.set:  # no data option: no guess
        raise ValueError("which data? give a run folder (its data section is used), --data-config RECIPE.yaml, or "
                         "--set data.name=NAME: cifar10 or cifar100 (with data.root=DIR), folder (data.root=DIR "
                         "holding test/<class>/<images>), digits")
    folder = next((p for p in (args.model, args.target) if is_export_folder(p)), None)
    if folder and (args.few_shot or args.linear_probe):
        raise ValueError(f"{folder} is an exported model: it gives logits, not the features the probes need")
    exported_model = open_export(args, folder) if folder else None
    target = Target(exported_model, f"{folder} ({exported_model.variant_name}, exported: {exported_model.runtime} "
                                    f"{exported_model.precision})", checkpoint=folder) if folder else \
        load_target(path, args.model)
    device = parse_device("cpu") if folder else device
    run_data = (target.run_config or {}).get("data")
    args.batch_size = args.batch_size or _run_batch_size(target.run_config) or 64
    data_cfg = resolve_data_config(target.model, run_data, args.data_config, args.set)
    check_best_arguments(args)
    amp = precision(args, device, _run_precision(target.run_dir))
    model = target.model.to(device)
    probes = run_probes(model, data_cfg, args, device, amp)
    out_dir = args.out or _default_out(target, args.split)
    if probes and not _head_fits(model, data_cfg):  # e.g. an ImageNet head probed on CIFAR-10: probes only
        print(f"the model's {model.num_classes}-class head does not fit data.name={data_cfg.name}; "
              f"skipping the classification report")
        os.makedirs(out_dir, exist_ok=True)
        _write_json(os.path.join(out_dir, "probes.json"), {**probes, **_context(target, data_cfg, args)})
        print(f"wrote {os.path.join(out_dir, 'probes.json')}")
        return 0
    loader, classes = build_eval_loader(data_cfg, model, args.split, args.batch_size)
    runner = model if folder else apply_runtime(args, model, device, run_data, args.batch_size)
    exported = runner is not model  # then: agreement with eager PyTorch
    amp = None if folder or args.runtime == "best" else amp  # an exported or chosen path computes as it is
    result = evaluate(with_tta(runner, args.tta), loader, device, None if exported else amp, class_names=classes,
                      reference=with_tta(model, args.tta) if exported else None)
    result.extra["runtime"] = f"{model.runtime} {model.precision}" if folder else \
        args.runtime + (" int8" if args.int8 else "")
    if args.runtime == "best":
        result.extra["runtime"] = f"best: {args.best.chosen}"
        result.extra["best"] = args.best.as_dict()
        args.precision_line = f"runtime: best -> {args.best.chosen} (the table above)"
    result.extra["tta"] = args.tta
    result.extra.update(_context(target, data_cfg, args))
    if probes:
        result.extra["probes"] = probes
    paths = save_eval_artifacts(result, out_dir)
    _print_report(target, result, paths, args.precision_line)
    return 0


def _run_batch_size(run_config: dict[str, Any] | None) -> int | None:
    """The batch a run's own evaluation used (``vitkit.runs.eval_batch_size`` of its train section), or None."""
    from vitkit.runs import eval_batch_size
    train = (run_config or {}).get("train") or {}
    return eval_batch_size(train["batch_size"], train.get("accum_steps", 1)) if "batch_size" in train else None


def _run_precision(run_dir: str | None) -> str | None:
    """The precision a run's final test pass used (``summary.json``), or None (no run, or not finished)."""
    import json
    try:
        with open(os.path.join(run_dir, "summary.json")) as f:
            return json.load(f)["environment"]["precision"]
    except (TypeError, OSError, ValueError, KeyError):
        return None


def _head_fits(model, data_cfg) -> bool:
    from vitkit.data import build_splits
    return int(model.num_classes) == len(build_splits(data_cfg).classes)


def _write_json(path: str, obj: dict[str, Any]) -> None:
    import json
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, default=str)


def _context(target, data_cfg, args: argparse.Namespace) -> dict[str, Any]:
    from vitkit.config import to_dict
    return {"model": target.model.variant_name, "checkpoint": target.checkpoint, "run": target.run_dir,
            "split": args.split, "data": to_dict(data_cfg)}


def _default_out(target, split: str) -> str:
    if target.run_dir:
        return os.path.join(target.run_dir, "eval", split)
    return os.path.join("eval", f"{target.model.variant_name}-{split}")


def _pct(x: float | None) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{100 * x:.2f}%"


def _print_report(target, result, paths: dict[str, str], precision: str) -> None:
    print(f"model:   {target.description}")
    print(precision)
    print(f"samples: {result.num_samples}  classes: {result.num_classes}")
    mode = result.extra.get("tta", "none")
    tta = f"   (test-time augmentation: {mode})" if mode != "none" else ""
    print(f"top-1 {_pct(result.top1)}   top-5 {_pct(result.top5)}   loss {result.loss:.4f}{tta}")
    if "top1_agreement" in result.extra:
        print(f"top-1 agreement with eager PyTorch ({result.extra['runtime']}): {_pct(result.extra['top1_agreement'])}")
    names = result.class_names or [f"class_{i}" for i in range(result.num_classes)]
    rows = list(range(result.num_classes))
    if result.num_classes > MAX_PRINTED_CLASSES:  # the 10 worst classes; the CSV has all of them
        rows = sorted(rows, key=lambda i: (-1 if math.isnan(result.per_class_acc[i]) else result.per_class_acc[i]))
        rows = [i for i in rows if not math.isnan(result.per_class_acc[i])][:10]
        print("lowest per-class accuracy (all classes in per_class.csv):")
    else:
        print("per-class accuracy:")
    width = max(len(names[i]) for i in rows) if rows else 0
    for i in rows:
        support, correct = int(result.confusion[i].sum()), int(result.confusion[i, i])
        print(f"  {names[i]:<{width}}  {correct:>6}/{support:<6} {_pct(result.per_class_acc[i])}")
    for kind, path in paths.items():
        print(f"wrote {path}")
