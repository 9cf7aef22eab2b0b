"""`vitkit shards SOURCE OUT`: a dataset → WebDataset tar shards, ``OUT/<split>/shard-NNNNNN.tar`` + ``index.json``
(``vitkit.data.shards``), which a recipe streams with ``data.name: shards``; `vitkit shards --verify OUT` reads every
shard back and checks it against its index."""
from __future__ import annotations

import argparse
from pathlib import Path

HELP = "write a dataset as WebDataset tar shards for streaming training, or verify written shards"

EPILOG = """examples:
  vitkit shards cifar10 shards/cifar10 --root ../shared/data --shard-size 5000
  vitkit shards my_images/ shards/mine          my_images/train/<class>/<images> (and optionally val/, test/)
  vitkit shards --verify shards/cifar10
  vitkit train RECIPE.yaml --set data.name=shards data.root=shards/cifar10

CIFAR images are stored as PNG, a folder's images as their own files; each split is written into a temporary
folder and renamed when complete, and the same input gives byte-identical shards."""

_CIFAR = ("cifar10", "cifar100")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("source", nargs="?", help="cifar10, cifar100, or an image folder holding "
                                                  "train/<class>/<images> (and optionally val/ and test/)")
    parser.add_argument("out", nargs="?", help="output folder: one sub-folder of shards per split (none of which may "
                                               "exist yet)")
    parser.add_argument("--shard-size", type=_positive, default=1000, metavar="N",
                        help="samples per shard (default: %(default)s)")
    parser.add_argument("--root", metavar="DIR", help="cifar: the folder holding cifar-10-batches-py (or "
                                                      "cifar-100-python)")
    parser.add_argument("--limit", type=_positive, metavar="N", help="write only the first N samples of each split")
    parser.add_argument("--verify", metavar="OUT", help="check every shard under OUT (or one split folder) against "
                                                        "its index.json: size, sha256, samples")


def _splits(source: str, root: str | None):
    """The source's splits as ``build_splits`` reads them for training (no validation carve-out)."""
    from vitkit.data import DataConfig, build_splits
    if source in _CIFAR:
        if root is None:
            raise ValueError(f"--root DIR: required for {source} (the folder holding its python-pickle batches)")
        return build_splits(DataConfig(name=source, root=root, val_fraction=0.0))
    if not (Path(source) / "train").is_dir():
        raise FileNotFoundError(f"{source}: neither {' nor '.join(_CIFAR)} nor a folder holding "
                                f"train/<class>/<images>")
    return build_splits(DataConfig(name="folder", root=source, val_fraction=0.0))


def _verify(out: Path) -> int:
    from vitkit.data.shards import INDEX, verify_split
    folders = [out] if (out / INDEX).is_file() else sorted(p.parent for p in out.glob(f"*/{INDEX}"))
    if not folders:
        raise FileNotFoundError(f"{out}: no {INDEX} in it nor in its sub-folders")
    for folder in folders:
        index = verify_split(folder)
        print(f"{folder}: {len(index.shards)} shards, {index.samples} samples: sizes, sha256 and sample counts "
              f"match {INDEX}")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.verify is not None:
        if args.source or args.out:
            raise ValueError("--verify OUT takes no SOURCE or OUT argument")
        return _verify(Path(args.verify))
    if not (args.source and args.out):
        raise ValueError("give SOURCE and OUT (or --verify OUT); see `vitkit shards --help`")
    if args.root is not None and args.source not in _CIFAR:
        raise ValueError(f"--root: only for {' and '.join(_CIFAR)}; a folder source is its own root")
    from vitkit.data.shards import write_shards
    for index in write_shards(_splits(args.source, args.root), args.out, args.shard_size, args.limit):
        size = sum(s.bytes for s in index.shards) / 1e6
        print(f"{index.folder}: {index.samples} samples, {len(index.shards)} shards, {size:.1f} MB, "
              f"{len(index.classes)} classes")
    print(f"train on them with: --set data.name=shards data.root={args.out}")
    return 0
