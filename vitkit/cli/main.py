"""`vitkit <command>`: thin front-ends over the library. Each command lives in its own module under vitkit/cli/
exposing ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``. Command modules import torch only
inside ``run``, so ``vitkit --help`` and ``vitkit COMMAND --help`` answer without loading it.

User mistakes (``ValueError`` and its subclasses ``ConfigError``/``CheckpointError``, missing or existing files)
are one line on stderr, ``vitkit COMMAND: error: ...``, and exit status 2; ``-v`` shows the traceback instead."""
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

# Exceptions that mean "the user asked for something that cannot be done", not "vitkit is broken".
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)


def _available():
    out = {}
    for name, mod in COMMANDS.items():
        try:
            out[name] = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise
    return out


def version_line() -> str:
    """``vitkit X (torch Y, Python Z)``, read from the installed metadata without importing torch."""
    import platform
    from importlib import metadata

    import vitkit
    try:
        torch_version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch_version = "not installed"
    return f"vitkit {vitkit.__version__} (torch {torch_version}, Python {platform.python_version()})"


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage mistake reported in one line (argparse prints the usage block, then the error)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vitkit", description="Vision Transformers on PyTorch.",
                                     epilog="`vitkit COMMAND --help` describes a command.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages; show tracebacks")
    parser.add_argument("--version", action="version", version=version_line())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in _available().items():
        p = sub.add_parser(name, help=module.HELP.replace("%", "%%"), description=module.HELP)  # help is %-formatted
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def _one_line(e: BaseException) -> str:
    text = str(e) if not isinstance(e, OSError) or not e.filename or str(e.filename) in str(e) else \
        f"{e.strerror or e}: {e.filename}"
    return " ".join(text.split("\n"))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt as e:  # a command may say what it kept (vitkit.train.runtime.Aborted)
        print(f"vitkit {args.command}: {e or 'interrupted'}", file=sys.stderr)
        return 128 + getattr(e, "signum", 2)  # 130 for SIGINT
    except USER_ERRORS as e:  # user errors: one clear line, no traceback
        if args.verbose:
            raise
        print(f"vitkit {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
