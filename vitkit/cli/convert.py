"""`vitkit convert SRC DST`: a checkpoint in any supported format → vitkit's own folder (model.safetensors +
config.json), read back and compared tensor by tensor before the command reports success."""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
from typing import Iterator

HELP = "convert a checkpoint (timm, official, transformers, JAX .npz, vitkit) into a vitkit model folder"

EPILOG = """examples:
  vitkit convert hf_vit_folder/ out/                       transformers folder: the model is inferred
  vitkit convert ViT-B_16.npz out/ --num-classes 10         JAX .npz: inferred too; new zero-initialised head
  vitkit convert deit_small_patch16_224-cd65a155.pth out/ --model deit_small_patch16_224 --img-size 384
  vitkit convert model.safetensors out/ --model vit_small_patch16_224 --set depth=6

--model can be omitted for a vitkit folder and for formats that describe their own architecture (a transformers
folder's config.json, a JAX .npz): the family of the format names the variant. A bare state dict (timm or official
release) does not say which preprocessing its weights expect (ViT and DeiT differ) nor how many attention heads it
has, so it needs --model. The load report (what was converted, resized, re-initialised or
ignored) is printed; the written folder loads with vitkit.load_model(DST)."""

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("src", help="checkpoint file or folder, in any format vitkit reads, or a run folder (its "
                                    "checkpoints/best, else last)")
    parser.add_argument("dst", help="output folder (created; must be empty, or a vitkit model folder with --force)")
    parser.add_argument("--force", action="store_true", help="replace the model in a non-empty vitkit model folder")
    parser.add_argument("--model", help="registered variant name (`vitkit models`); inferred when omitted, if possible")
    parser.add_argument("--num-classes", type=int, metavar="N", help="classifier size (a new zero-initialised head)")
    parser.add_argument("--img-size", type=_img_size, metavar="S", help="input size, e.g. 384 or 224x160 "
                                                                        "(position embeddings are resampled)")
    parser.add_argument("--checkpoint-key", metavar="KEY",
                        help="state dict to read from a release file holding several (default: the one the source's "
                             "evaluation uses, e.g. state_dict_ema in T2T-ViT files; --checkpoint-key state_dict "
                             "reads the raw weights)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="architecture override, e.g. depth=6 or act_layer=gelu_tanh (repeatable)")


def _img_size(text: str) -> int | tuple[int, int]:
    parts = text.lower().replace(",", "x").split("x")
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int or HxW, got {text!r}") from None
    if len(sizes) == 1:
        return sizes[0]
    if len(sizes) == 2:
        return sizes[0], sizes[1]
    raise argparse.ArgumentTypeError(f"expected an int or HxW, got {text!r}")


# ------------------------------------------------------------------------------------------------------- running
@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    """create_model logs the load report; this command prints it itself (once, on stdout)."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def _check_destination(src: str, dst: str, force: bool) -> None:
    """Nothing is overwritten unless asked: a non-empty DST needs --force, and even then only a vitkit model folder
    (model.safetensors + config.json) is replaced."""
    if os.path.exists(dst) and not os.path.isdir(dst):
        raise FileExistsError(f"{dst} exists and is a file; DST must be a folder")
    if os.path.isdir(dst) and os.listdir(dst):
        if os.path.realpath(dst) == os.path.realpath(src):
            raise ValueError(f"SRC and DST are the same folder ({dst}); write the conversion elsewhere")
        if not os.path.isfile(os.path.join(dst, "config.json")) or _config_format(dst) != "vitkit":
            raise FileExistsError(f"{dst} is not empty and not a vitkit model folder; refusing to write into it")
        if not force:
            raise FileExistsError(f"{dst} already holds a vitkit model; pass --force to replace it, or choose "
                                  f"another DST")


def _source(src: str) -> str:
    """SRC itself, or for a run folder its best (else last) checkpoint, as `vitkit eval` and `predict` take it."""
    from vitkit.runs import is_run_folder, run_checkpoint
    if os.path.isdir(src) and is_run_folder(src):
        folder = run_checkpoint(src)
        print(f"{src} is a run folder: converting {folder}")
        return folder
    return src


def _config_format(folder: str) -> str | None:
    import json
    try:
        with open(os.path.join(folder, "config.json")) as f:
            return json.load(f).get("format")
    except (OSError, ValueError):
        return None


def _architecture_changes(model) -> list[str]:
    """Config fields that differ from the registered variant's (what the checkpoint or the flags changed)."""
    from vitkit.config import config_diff
    from vitkit.registry import get_spec
    spec = get_spec(model.variant_name)
    return [f"{k}={v!r}" for k, v in config_diff(model.cfg, spec.model_cls.config_cls(**spec.config)).items()]


def run(args: argparse.Namespace) -> int:
    import torch

    import vitkit
    from vitkit.weights import CheckpointError
    src, dst = os.fspath(args.src), os.fspath(args.dst)
    if not os.path.exists(src):
        raise FileNotFoundError(f"checkpoint not found: {src}")
    src = _source(src)
    _check_destination(src, dst, args.force)
    from vitkit.config import parse_overrides
    overrides = parse_overrides(args.overrides)
    name, inferred = (args.model, {}) if args.model else vitkit.registry.infer_variant(src)
    kwargs = {**inferred, **overrides}
    if args.img_size is not None:
        kwargs["img_size"] = args.img_size
    with _quiet("vitkit.registry"):
        model = vitkit.create_model(name, pretrained=src, num_classes=args.num_classes,
                                    checkpoint_key=args.checkpoint_key, **kwargs)
    report = model.load_report
    print(report.summary())
    vitkit.save_pretrained(model, dst)

    with _quiet("vitkit.registry"):
        written = vitkit.load_model(dst).state_dict()
    expected = model.state_dict()
    bad = sorted(k for k in expected if k not in written or not torch.equal(written[k], expected[k]))
    if bad or set(written) != set(expected):
        raise CheckpointError(f"{dst}: the written model does not read back identically ({', '.join(bad[:5])})")
    n_params = sum(p.numel() for p in model.parameters())
    changes = _architecture_changes(model)
    print(f"wrote {dst}: {name}, {n_params / 1e6:.2f} M parameters"
          + (f" ({', '.join(changes)})" if changes else ""))
    print(f"  load it with vitkit.load_model({dst!r})")
    return 0
