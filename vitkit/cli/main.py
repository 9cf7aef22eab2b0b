"""`vitkit <command>`: thin front-ends over the library. Each command lives in its own module under vitkit/cli/
exposing ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``; modules are imported lazily so
``vitkit --help`` stays fast."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

COMMANDS = {
    "models": "vitkit.cli.models",
    "train": "vitkit.cli.train",
    "eval": "vitkit.cli.eval",
    "predict": "vitkit.cli.predict",
    "explain": "vitkit.cli.explain",
    "bench": "vitkit.cli.bench",
    "export": "vitkit.cli.export",
    "convert": "vitkit.cli.convert",
    "demo": "vitkit.cli.demo",
}


def _available():
    out = {}
    for name, mod in COMMANDS.items():
        try:
            out[name] = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vitkit", description="Vision Transformers on PyTorch.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in _available().items():
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError) as e:  # user errors: one clear line, no traceback
        if args.verbose:
            raise
        print(f"vitkit {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
