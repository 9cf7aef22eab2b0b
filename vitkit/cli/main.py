"""`vitkit <command>`: thin front-ends over the library. Each command lives in its own module under vitkit/cli/
exposing ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``. Command modules import torch only
inside ``run``, so ``vitkit --help`` and ``vitkit COMMAND --help`` answer without loading it.

User mistakes (``ValueError`` and its subclasses ``ConfigError``/``CheckpointError``, missing or existing files)
are one line on stderr, ``vitkit COMMAND: error: ...``, and exit status 2; ``-v`` shows the traceback instead.
A SIGINT/SIGTERM is one line too, ``vitkit COMMAND: <what was saved>``, and exit status 130/143, at any moment."""
from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys

from vitkit import interrupts

COMMANDS = {
    "models": "vitkit.cli.models",
    "train": "vitkit.cli.train",
    "eval": "vitkit.cli.eval",
    "predict": "vitkit.cli.predict",
    "explain": "vitkit.cli.explain",
    "bench": "vitkit.cli.bench",
    "export": "vitkit.cli.export",
    "convert": "vitkit.cli.convert",
    "shards": "vitkit.cli.shards",
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
        p.set_defaults(_run=module.run, _torch_free=getattr(module, "TORCH_FREE", False))
    return parser


def _one_line(e: BaseException) -> str:
    text = str(e) if not isinstance(e, OSError) or not e.filename or str(e.filename) in str(e) else \
        f"{e.strerror or e}: {e.filename}"
    return " ".join(text.split("\n"))


def main(argv: list[str] | None = None) -> int:
    """Run ``vitkit COMMAND``. A SIGINT/SIGTERM at any moment ends it with one line and 128 + N (``vitkit.interrupts``);
    as the process's entry (``argv`` None), signals are ignored once the command has ended."""
    entry, argv = argv is None, sys.argv[1:] if argv is None else list(argv)
    prog = " ".join(["vitkit", *[a for a in argv if a in COMMANDS][:1]])
    interrupts.reset()
    started = []  # not yet: nothing has been written

    def describe(name: str) -> str:
        return f"stopped by {name}" + ("" if started else " before it started; nothing was written")
    try:
        with interrupts.abort_on_signal(describe, signal.SIG_IGN if entry else None):
            return _main(argv, started)
    except BaseException as e:
        stop = _interruption(e)
        if stop is None or (stop is not e and ("-v" in argv or "--verbose" in argv)):
            raise
        print(f"{prog}: {stop}", file=sys.stderr)
        return 128 + stop.signum  # 130 for SIGINT, 143 for SIGTERM


def _interruption(e: BaseException) -> interrupts.Aborted | None:
    """What to report for ``e``: the first signal this command received, whatever failed while unwinding from it (a
    cleanup touching a half-imported module), or ``e`` when it is a bare KeyboardInterrupt; None otherwise."""
    if interrupts.first() is None and isinstance(e, KeyboardInterrupt):
        interrupts.note(e if isinstance(e, interrupts.Aborted) else interrupts.Aborted(str(e) or "interrupted"))
    return interrupts.first()


def _configure_logging(verbose: bool) -> None:
    """Messages on stderr, plain: vitkit's from INFO, other libraries' from WARNING (torch logs INFO lines at exit,
    e.g. after a signal interrupted its import); everything from DEBUG with ``-v``. Logging configured already (an
    embedding program, pytest) is left alone."""
    root = logging.getLogger()
    if root.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    if not verbose:
        handler.addFilter(lambda r: r.levelno >= logging.WARNING or r.name.split(".")[0] == "vitkit")
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)


def _main(argv: list[str], started: list) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    if not args._torch_free:
        with interrupts.deferred():  # torch's initialisers call C++ that calls back into Python (interrupts.deferred)
            import torch  # noqa: F401
    try:
        started.append(True)
        return int(args._run(args) or 0)
    except USER_ERRORS as e:  # user errors: one clear line, no traceback
        if args.verbose or interrupts.first() is not None:
            raise
        print(f"vitkit {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
