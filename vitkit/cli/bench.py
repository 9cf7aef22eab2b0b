"""`vitkit bench MODEL`: images/s, latency (median, p90, p99), peak memory and fraction of the GEMM peak of one step.

Examples:
    vitkit bench vit_base_patch16_224 --batch-size 8 --compare transformers
    vitkit bench vit_base_patch16_224 --batch-size 8 --runtime best --compare transformers
    vitkit bench vit_base_patch16_224 --img-size 32 --set patch_size=4 --set embed_dim=256 --set depth=7 \\
        --set num_heads=4 --set mlp_ratio=2 --set num_classes=10 --mode train --compare transformers
    vitkit bench --machine --json machine.json
    vitkit bench vit_large_patch16_224 --memory ddp,fsdp,fsdp_ac --batch-size 4 --nproc 2
    vitkit bench mobilevit_s --mode train --channels-last
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time
from typing import Any

HELP = "benchmark a model (throughput, latency, memory, % of GEMM peak), optionally against transformers"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", help="a registered variant name (see `vitkit models`), or a folder "
                                                 "written by `vitkit export` (timed in its own runtime)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--img-size", type=int, help="input resolution (default: the variant's)")
    parser.add_argument("--set", "--override", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="architecture override passed to create_model, e.g. --set depth=7 (repeatable)")
    parser.add_argument("--pretrained", metavar="PATH|true",
                        help="checkpoint to load, or true: the variant's named weights (default: random weights)")
    parser.add_argument("--dtype", choices=("fp32", "auto", "bf16"), default="fp32",
                        help="fp32 (default: the same numbers on every CPU); bf16 = autocast, fp32 weights; auto: bf16 "
                             "where the device runs it natively, else fp32 (the opt-in fast path)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (compile time excluded)")
    parser.add_argument("--channels-last", action="store_true",
                        help="the model's 4-d weights and the batch in NHWC memory order (torch.channels_last, as "
                             "train.channels_last): for families with overlapping convolutions; run once with and "
                             "once without to compare")
    parser.add_argument("--mode", choices=("infer", "train"), default="infer",
                        help="infer: forward under inference_mode; train: forward + backward + AdamW step")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per model")
    parser.add_argument("--iters", type=int, default=10, help="timed steps per model")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--probes", type=int, default=10, help="GEMM-peak samples taken between rounds (0 = none)")
    parser.add_argument("--probe-size", type=int, default=2048, help="n of the n×n GEMM probe")
    parser.add_argument("--quiet", type=float, metavar="CORES",
                        help="shared machine: before each round wait until other processes use at most CORES "
                             "cores, and repeat rounds (and GEMM probes) they disturbed")
    parser.add_argument("--max-wait", type=float, default=600.0,
                        help="seconds after which --quiet accepts every round (default 600)")
    parser.add_argument("--compare", choices=("transformers",), help="also run the same model in this library")
    parser.add_argument("--runtime", default="eager", metavar="NAME[,NAME...]",
                        help="eager (default), onnxruntime, openvino, torch-export, or several comma-separated: each "
                             "is exported (parity-checked) and timed in the same interleaved rounds; 'onnxruntime-int8' "
                             "adds the int8 ONNX Runtime model; 'openvino' computes in fp32 on every CPU, "
                             "'openvino-bf16' asks OpenVINO for bf16 (checked like int8: agreement with fp32); "
                             "'best' alone: the fastest path on this CPU that keeps >= 99%% top-1 agreement with "
                             "eager fp32 on real images (chosen in a short timing of --warmup/--iters rounds, the "
                             "table printed), then benchmarked")
    parser.add_argument("--agreement-images", metavar="DIR",
                        help="with --runtime best: also measure agreement on the images in DIR (up to 2,000), besides "
                             "the shipped photos and, for --pretrained RUN trained on CIFAR-10, 2,000 test images")
    from vitkit.cli.eval import add_calibrate_argument
    add_calibrate_argument(parser)
    parser.add_argument("--machine", action="store_true", help="measure the machine's GEMM peak and copy bandwidth")
    parser.add_argument("--seconds", type=float, default=30.0,
                        help="time allowed for --machine (default 30; progress is printed as it goes)")
    parser.add_argument("--json", metavar="OUT", help="write every number (and the settings) to this JSON file")
    parser.add_argument("--memory", metavar="STRATEGY[,STRATEGY...]",
                        help="per-process peak memory of a training step (forward, backward, AdamW) under single, "
                             "ddp, fsdp and/or fsdp_ac (FSDP + activation checkpointing), measured in --nproc gloo "
                             "processes on this CPU (--batch-size images each, --dtype fp32 or bf16) and modelled "
                             "(vitkit.bench.memory)")
    parser.add_argument("--nproc", type=int, default=2, help="processes for --memory (default 2)")
    parser.add_argument("--memory-limit", type=float, default=20.0, metavar="GIB",
                        help="--memory refuses to start above this many GiB for all processes (default 20)")


def environment() -> dict[str, Any]:
    import torch

    from vitkit.hardware import machine_line
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "cpu": machine_line(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "machine": platform.machine(),
            "python": platform.python_version(), "loadavg_start": list(os.getloadavg())}


def build_model(args: argparse.Namespace, overrides: dict[str, Any]):
    import vitkit
    from vitkit.bench.compare import randomize_heads_
    from vitkit.deploy.runtime import is_export_folder, open_export_folder
    if is_export_folder(args.model):  # a folder from `vitkit export`: timed as it is, in its own runtime
        given = [flag for flag, on in (("--pretrained", args.pretrained), ("--set", overrides),
                                       ("--img-size", args.img_size), ("--compile", args.compile),
                                       ("--mode train", args.mode == "train"), ("--compare", args.compare),
                                       ("--runtime", args.runtime != "eager"), ("--dtype bf16", args.dtype == "bf16"),
                                       ("--device", args.device != "cpu"), ("--channels-last", args.channels_last))
                 if on]
        if given:
            raise ValueError(f"{args.model} is an exported model: it runs as exported, on the CPU; drop "
                             f"{', '.join(given)}")
        model = open_export_folder(args.model)
        print(f"{args.model}: {model.runtime}, {model.precision}" + (f" ({model.note})" if model.note else ""))
        return model
    from vitkit.weights.hub import requests_named_weights
    from vitkit.runs import is_run_folder, run_checkpoint
    pretrained = True if requests_named_weights(args.pretrained) else args.pretrained
    if isinstance(pretrained, str) and is_run_folder(pretrained):  # a training run: its best checkpoint, else last
        pretrained = run_checkpoint(pretrained)
    model = vitkit.create_model(args.model, pretrained=pretrained, img_size=args.img_size, **overrides)
    if not args.pretrained:
        randomize_heads_(model)  # a fresh head is zero: logits would all be 0 and comparisons vacuous
    return model


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def result_lines(results: list) -> list[str]:
    header = ("", "images/s", "median ms", "p90 ms", "p99 ms", "min ms", "peak MiB", "GFLOP/s", "% GEMM peak",
              "page faults", "other load")
    rows = [(r.label, f"{r.images_per_s:.2f}", f"{r.latency_ms_median:.1f}", f"{r.latency_ms_p90:.1f}",
             _fmt(r.latency_ms_p99, ".1f"),
             f"{r.latency_ms_min:.1f}", _fmt(r.peak_mem_mb, ".0f"), _fmt(r.achieved_gflops, ".1f"),
             _fmt(r.peak_fraction and 100 * r.peak_fraction, ".1f"), _fmt(r.minor_faults, ".0f"),
             _fmt(r.foreign_cores, ".2f"))
            for r in results]
    widths = [max(len(x) for x in col) for col in zip(header, *rows)]
    return ["  ".join(f"{v:>{w}}" if i else f"{v:<{w}}" for i, (v, w) in enumerate(zip(line, widths)))
            for line in [header, *rows]]


def _run_machine(args: argparse.Namespace, report: dict[str, Any]) -> None:
    import torch
    from vitkit.bench.machine import machine_limits
    threads = (args.threads,) if args.threads else tuple(sorted({1, torch.get_num_threads()}))
    limits = machine_limits(threads, device=args.device, quiet=args.quiet, max_wait=args.max_wait,
                            seconds=args.seconds, progress=_progress_line)
    report["machine"] = limits
    for t, v in limits["by_threads"].items():
        print(f"threads={t}: fp32 GEMM {v['gemm_fp32_gflops']['median']:.1f} GFLOP/s "
              f"(best {v['gemm_fp32_gflops']['best']:.1f}), bf16 GEMM {v['gemm_bf16_gflops']['median']:.1f} "
              f"(best {v['gemm_bf16_gflops']['best']:.1f}), copy {v['copy_gbps']['median']:.1f} GB/s "
              f"(best {v['copy_gbps']['best']:.1f})")


def _progress_line(message: str) -> None:
    import sys
    print(f"  {message}", file=sys.stderr, flush=True)


def _dtype(args: argparse.Namespace) -> str:
    """``--dtype auto`` resolved by the hardware probe (bf16 only where it is native)."""
    from vitkit.deploy.runtime import is_export_folder
    from vitkit.hardware import resolve_amp
    if args.dtype != "auto":
        return args.dtype
    if is_export_folder(args.model):
        return "fp32"  # no autocast around an exported model: it computes as exported (printed by build_model)
    return "bf16" if resolve_amp("auto", args.device) == "bf16" else "fp32"


def _runtimes(args: argparse.Namespace, model) -> dict:
    """The vitkit runtimes of ``--runtime`` besides eager, exported from ``model`` (each parity-checked)."""
    from vitkit.deploy.names import RUNTIMES
    from vitkit.deploy.runtime import to_runtime
    names = [n.strip() for n in args.runtime.split(",") if n.strip()]
    known = set(RUNTIMES) | {"onnxruntime-int8"}
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise ValueError(f"--runtime {args.runtime!r}: choose from {', '.join(sorted(known))} (comma-separated)")
    if names != ["eager"] and (args.device != "cpu" or args.mode != "infer" or args.compile or args.channels_last):
        raise ValueError("exported runtimes are benchmarked for CPU inference: --device cpu --mode infer, no --compile "
                         "or --channels-last")
    from vitkit.deploy.export import ExportError
    out = {}
    for name in names:
        if name == "eager":
            continue
        base, int8 = (name[:-len("-int8")], True) if name.endswith("-int8") else (name, False)
        try:
            out[name] = to_runtime(model, base, int8=int8)
        except ExportError as e:  # one line (exit status 2), not a traceback: the export's numbers are in its message
            raise ValueError(f"--runtime {name}: {str(e).splitlines()[0]}") from None
        print(f"{name}: exported; {out[name].parity.summary().splitlines()[0]}")
        if out[name].note:
            print(f"  {out[name].note}")
    return out


def _best(args: argparse.Namespace, model, report: dict[str, Any]) -> dict:
    """``--runtime best``: choose the path (``vitkit.deploy.best``), print the table; the chosen path as the one
    runtime besides eager fp32 (none when eager fp32 is chosen)."""
    from vitkit.cli.eval import calibration_of
    from vitkit.deploy import best
    from vitkit.runs import is_run_folder
    if args.dtype != "fp32" or args.device != "cpu" or args.mode != "infer" or args.compile or args.channels_last:
        raise ValueError("--runtime best chooses among CPU inference paths: --device cpu --mode infer --dtype fp32, "
                         "no --compile or --channels-last")
    run = args.pretrained if args.pretrained and is_run_folder(args.pretrained) else None
    run_data = best.read_run_data(run)
    images = best.agreement_images(model, run_data, args.agreement_images)
    timer = best.default_timer(args.warmup, args.iters, args.quiet, args.max_wait)  # bench's own rounds and --quiet
    choice = best.select_fastest(model, images, args.batch_size, timer,
                                 calibration=calibration_of(args, model, run_data))
    print("\n".join(choice.table_lines()), flush=True)
    report["best"] = choice.as_dict()
    return {} if choice.module is model else {choice.chosen: choice.module}


def _run_model(args: argparse.Namespace, report: dict[str, Any]) -> None:
    from vitkit.bench.compare import compare_to_transformers
    from vitkit.bench.runner import BenchSettings, benchmark, step_flops
    from vitkit.cli.eval import check_best_folders
    check_best_folders(args)
    dtype = _dtype(args)
    settings = BenchSettings(batch_size=args.batch_size, dtype=dtype, compile=args.compile, mode=args.mode,
                             channels_last=args.channels_last, warmup=args.warmup, iters=args.iters,
                             device=args.device, probes=args.probes, probe_size=args.probe_size, quiet=args.quiet,
                             max_wait=args.max_wait)
    from vitkit.config import parse_overrides
    overrides = parse_overrides(args.overrides)
    model = build_model(args, overrides)
    input_size = tuple(model.data_cfg.input_size)
    report.update(model=args.model, overrides=overrides, input_size=list(input_size),
                  settings=dataclasses.asdict(settings))
    print(f"{args.model} {'x'.join(map(str, input_size))}, batch {args.batch_size}, {dtype}"
          f"{' (auto)' if args.dtype == 'auto' else ''}, "
          f"{'compiled' if args.compile else 'eager'}, {args.mode}{', channels_last' if args.channels_last else ''}, "
          f"{report['env']['threads']} threads")
    if args.channels_last and not model.convolutional:
        print(f"warning: --channels-last: {args.model} has no convolution beyond a patchify stem "
              f"(FamilyModel.convolutional), so the NHWC memory order gains it little")
    others = _best(args, model, report) if args.runtime == "best" else _runtimes(args, model)
    if others and not args.compare and args.runtime != "best":
        raise ValueError("--runtime with exported runtimes is a comparison: add --compare transformers")
    if args.compare:
        cmp = compare_to_transformers(model, settings, input_size, others=others)
        report["comparison"] = cmp.as_dict()
        results = [cmp.ours, *cmp.others.values(), cmp.theirs]
        peak = cmp.peak_gflops_median
    elif others:  # best, not eager fp32: the chosen path alone
        (label, chosen), = others.items()
        res = benchmark(chosen, settings, input_size, label=label, flops_per_image=step_flops(model, input_size,
                                                                                               args.mode))
        report["result"] = res.as_dict()
        results, peak = [res], res.peak_gflops
    else:
        res = benchmark(model, settings, input_size)
        report["result"] = res.as_dict()
        results, peak = [res], res.peak_gflops
    print("\n".join(result_lines(results)))
    if results[0].discarded_rounds:
        print(f"{results[0].discarded_rounds} rounds were repeated because other processes used > {args.quiet} cores")
    if args.quiet is not None and any((r.foreign_cores or 0) > args.quiet for r in results):
        print(f"warning: the machine did not become quiet within --max-wait {args.max_wait:.0f} s; "
              f"these numbers include steps disturbed by other processes (see 'other load')")
    if peak:
        print(f"GEMM peak ({dtype}, {args.device}, same run): {peak:.1f} GFLOP/s median")
    if args.compare:
        print(f"vitkit / transformers images/s: {cmp.speed_ratio:.3f}   max |logits diff|: {cmp.max_abs_diff:.2e}   "
              f"(transformers attention: {cmp.attn_implementation})")
        for name, ratio in cmp.ratios().items():
            if name != "vitkit":
                print(f"{name} / transformers images/s: {ratio:.3f}   max |logits diff|: {cmp.other_diffs[name]:.2e}")


def _run_memory(args: argparse.Namespace, report: dict[str, Any]) -> None:
    from vitkit.bench.memory import measure, measurement_lines
    from vitkit.config import parse_overrides
    given = [flag for flag, on in (("--dtype auto", args.dtype == "auto"), ("--compile", args.compile),
                                   ("--compare", args.compare), ("--runtime", args.runtime != "eager"),
                                   ("--pretrained", args.pretrained), ("--device", args.device != "cpu"),
                                   ("--channels-last", args.channels_last)) if on]
    if given:
        raise ValueError(f"--memory measures an eager fp32 or bf16 training step on the CPU: drop {', '.join(given)}")
    if args.img_size:
        args.overrides = [*args.overrides, f"img_size={args.img_size}"]
    rows = measure(args.model, [s.strip() for s in args.memory.split(",") if s.strip()], args.batch_size,
                   args.nproc, args.dtype, parse_overrides(args.overrides), threads=args.threads or 1,
                   limit_gib=args.memory_limit)
    print(f"{args.model}: training step, batch {args.batch_size} per process, {args.dtype}, {args.nproc} "
          f"process(es), gloo; MiB per process (largest over the processes)")
    print("\n".join(measurement_lines(rows)))
    report["memory"] = [{**dataclasses.asdict(r), "error": r.error} for r in rows]


def run(args: argparse.Namespace) -> int:
    import torch

    from vitkit.hardware import parse_device
    if not args.model and not args.machine:
        raise ValueError("give a MODEL to benchmark, or --machine")
    if args.json and os.path.isdir(args.json):  # found now, not after the measurement
        raise IsADirectoryError(f"--json {args.json} is a folder; give a file name")
    if args.json and not os.path.isdir(os.path.dirname(args.json) or "."):
        raise FileNotFoundError(f"--json {args.json}: no folder {os.path.dirname(args.json)}")
    args.device = str(parse_device(args.device))
    if args.threads:
        torch.set_num_threads(args.threads)
    report: dict[str, Any] = {"args": {k: v for k, v in vars(args).items() if not k.startswith("_")},
                              "env": environment(),
                              "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    print(f"machine: {report['env']['cpu']}; torch {torch.__version__}, {report['env']['threads']} threads")
    if args.machine:
        _run_machine(args, report)
    if args.memory:
        _run_memory(args, report)
    elif args.model:
        _run_model(args, report)
    report["env"]["loadavg_end"] = list(os.getloadavg())
    print(f"load average: start {report['env']['loadavg_start']}, end {report['env']['loadavg_end']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
    return 0
