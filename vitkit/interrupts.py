"""SIGINT and SIGTERM at any moment: one line and exit status 128 + N (130, 143), never a traceback.

Until a command installs finer handling (the trainer's ``StopFlag`` stops at a step boundary), ``abort_on_signal``
makes a signal raise ``Aborted`` at once, wherever the interpreter is: in an import (torch imports sympy lazily), in
a data loader, in a ``finally``. The first ``Aborted`` is remembered (``first``): code that fails while unwinding from
it (a cleanup touching a half-imported module raises ``AttributeError``) must not replace the one line, so the CLI
reports the signal, not that failure. Signals that arrive while unwinding are ignored. Torch-free: the CLI installs
this before it imports anything heavy.
"""
from __future__ import annotations

import contextlib
import signal
import sys
from typing import Callable, Iterator

__all__ = ["Aborted", "SIGNALS", "abort_on_signal", "deferred", "first", "note", "pending", "reset"]

SIGNALS = (signal.SIGINT, signal.SIGTERM)

_first: "Aborted | None" = None  # the first Aborted raised in this process since ``reset``
_raised: "Aborted | None" = None  # the Aborted an ``abort_on_signal`` handler raised, while its block is open


class Aborted(KeyboardInterrupt):
    """A signal that stops a command at once (a second Ctrl-C, or a signal before training started); the message
    says what was saved and what was not. ``signum`` gives the exit status 128 + signum."""

    def __init__(self, message: str, signum: int = signal.SIGINT):
        super().__init__(message)
        self.signum = int(signum)


def reset() -> None:
    """Forget an earlier interruption (a new command in the same process)."""
    global _first
    _first = None


def note(e: Aborted) -> Aborted:
    """Remember ``e`` if it is the first interruption; returns it, to be raised."""
    global _first
    if _first is None:
        _first = e
    return e


def first() -> Aborted | None:
    """The interruption this process is unwinding from, if any."""
    return _first


def pending() -> None:
    """Raise the noted interruption again if the code it was raised in swallowed it: a signal handled inside a weakref
    or garbage-collection callback (importlib's module-lock callbacks during an import, for one) raises there, and
    Python prints "Exception ignored in ..." and carries on. The command must stop all the same."""
    if _raised is not None:
        raise _raised


@contextlib.contextmanager
def abort_on_signal(describe: Callable[[str], str], after=None) -> Iterator[None]:
    """Inside the block, SIGINT/SIGTERM raise ``Aborted(describe(signal name))``; once one has, later signals are
    ignored. On exit the previous handlers come back, or ``after`` (``signal.SIG_IGN`` when the process is about to
    end: a signal then would only interrupt the interpreter's exit). Outside the main thread a no-op."""
    def handle(signum: int, frame) -> None:
        global _raised
        if _first is None:
            _raised = note(Aborted(describe(signal.Signals(signum).name), signum))
            raise _raised

    previous = {}
    for s in SIGNALS:
        try:
            previous[s] = signal.signal(s, handle)
        except ValueError:  # not the main thread
            break
    hook = sys.unraisablehook
    sys.unraisablehook = _quiet(hook)
    try:
        yield
        pending()  # a signal whose Aborted was swallowed: the block ran on, but the command stops now
    finally:
        global _raised
        _raised = None
        sys.unraisablehook = hook
        for s, handler in previous.items():
            signal.signal(s, handler if after is None else after)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM back while the block runs (``pthread_sigmask``), then deliver them, so the handler raises
    in plain Python code. For code an exception cannot unwind: importing torch runs C++ initialisers that call back
    into Python (torch/distributed/__init__.py ``torch._C._c10d_init()``), and an ``Aborted`` raised there makes
    pybind11 end the process with std::terminate (SIGABRT, status -6) instead of one line. Outside the main thread,
    or without ``pthread_sigmask``, a no-op."""
    try:
        held = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    except (AttributeError, ValueError):
        yield
        return
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def _quiet(hook):
    """``sys.unraisablehook`` that says nothing of the Aborted a handler raised inside a callback whose exception
    Python swallows ("Exception ignored in ..."): ``pending`` raises it again, and the command reports it in its one
    line. Anything else goes to ``hook``."""
    def quiet(args) -> None:
        if not (isinstance(args.exc_value, Aborted) and args.exc_value is _raised):
            hook(args)
    return quiet
