"""`vitkit train RECIPE.yaml [--set section.key=value ...] [--out RUN_DIR]` and `vitkit train --resume RUN_DIR`:
a thin front-end over ``vitkit.train.train`` / ``resume``. Works the same under ``torchrun --nproc_per_node=N``."""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

from vitkit import interrupts

HELP = "train a model from a YAML recipe, or resume an interrupted run"

EPILOG = """examples:
  vitkit train configs/digits_demo.yaml
  vitkit train configs/cifar10_vit_scratch_30min.yaml --set data.root=../shared/data --out runs/c10
  vitkit train --resume runs/c10
  torchrun --nproc_per_node=2 -m vitkit train configs/cifar10_deit_scratch.yaml --set data.root=DIR

exit status: 0 finished, 2 bad recipe or arguments, 1 the run failed (e.g. non-finite loss),
128+N stopped by signal N (SIGINT 130, SIGTERM 143), at any moment, in one line saying what was saved."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("recipe", nargs="?", help="recipe YAML (sections: model, data, augment, optim, train, log)")
    parser.add_argument("--set", dest="sets", action="extend", nargs="+", default=[], metavar="SECTION.KEY=VALUE",
                        help="override recipe values (several per --set, and repeatable); values are parsed as YAML")
    parser.add_argument("--out", metavar="RUN_DIR", help="run folder (default: runs/<recipe name>)")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")


def _default_out(recipe: str) -> str:
    return os.path.join("runs", Path(recipe).stem)


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def _print_result(result) -> None:
    s = result.summary or {}
    test, val = s.get("test") or {}, s.get("val") or {}
    print(f"\nrun finished: {result.step} steps in {_duration(s.get('wall_time_s', 0))} "
          f"({s.get('images_per_s') or 0:.0f} training images/s)")
    label = "masked-token top-1" if "mim_top1" in (test or val) else "top-1"
    if val:
        print(f"  validation {label} {val.get('top1', val.get('mim_top1', float('nan'))):.4f} (final weights)")
    if test:
        print(f"  test {label} {test.get('top1', test.get('mim_top1', float('nan'))):.4f}" +
              (f", top-5 {test['top5']:.4f}" if test.get("top5") else "") +
              f" on {test['num_samples']} images, {test['weights']} weights")
    d = result.run_dir
    model = d / "checkpoints" / ("best" if (d / "checkpoints" / "best").is_dir() else "last")
    print(f"  run folder      {d}\n  model           {model} (vitkit.load_model)\n"
          f"  metrics         {d / 'metrics.csv'}, {d / 'summary.json'}")
    for label, path in (("plots", d / "plots"), ("TensorBoard", d / "tensorboard"),
                        ("test report", d / "eval" / "test")):
        if path.is_dir():
            print(f"  {label:<15} {path}")


def _not_trained(run_dir: Path):
    """What a signal outside training (building data and model, imports, the end of a run) leaves: for
    ``interrupts.abort_on_signal``. Plain path checks: it runs inside a signal handler."""
    def describe(name: str) -> str:
        last = run_dir / "checkpoints" / "last"
        if not any((d / "model.safetensors").is_file() for d in (last, last.with_name("last.prev"))):
            return f"stopped by {name} before training started; no checkpoint was written"
        return (f"stopped by {name} outside training; {last} is intact (continue with: vitkit train --resume "
                f"{run_dir})")
    return describe


def run(args: argparse.Namespace) -> int:
    stray = [s for s in args.sets if "=" not in s]  # `--set a=1 recipe.yaml`: the recipe was taken as a value
    if stray and not args.recipe and len(stray) == 1:
        args.recipe, args.sets = stray[0], [s for s in args.sets if "=" in s]
    if not args.recipe and not args.resume:
        raise ValueError("give a RECIPE or --resume RUN_DIR")
    if args.recipe and args.resume:
        raise ValueError("give a RECIPE or --resume RUN_DIR, not both")
    run_dir = Path(args.resume or args.out or _default_out(args.recipe))
    with interrupts.abort_on_signal(_not_trained(run_dir)):  # the run installs its own handlers while training
        return _train(args)


def _train(args: argparse.Namespace) -> int:
    from vitkit.train import NonFiniteLossError, resume, train
    from vitkit.train.process import process_age
    clock_start = time.perf_counter() - process_age()  # a time budget is this command's wall clock
    try:
        if args.resume:
            result = resume(args.resume, args.sets, clock_start)
        else:
            result = train(args.recipe, args.out or _default_out(args.recipe), args.sets, clock_start)
    except NonFiniteLossError as e:
        print(f"vitkit train: run failed: {e}", file=sys.stderr)
        return 1
    if result.status == "interrupted":  # one line: what was saved and how to continue
        if result.message:
            print(f"vitkit train: {result.message}", file=sys.stderr)
        return 128 + int(getattr(signal.Signals, result.signal, signal.SIGTERM))
    if result.summary is not None:
        _print_result(result)
    return 0
