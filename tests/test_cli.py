"""The command line as a new user meets it: every command's --help, the bare command, --version, `python -m vitkit`,
each in a fresh subprocess, and the front-end's speed (torch is imported only when a command runs).
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from importlib import metadata

import pytest

import vitkit
from vitkit.cli.main import COMMANDS, build_parser

VITKIT = [sys.executable, "-m", "vitkit"]
AVAILABLE = sorted(build_parser()._subparsers._group_actions[0].choices)


def run_cli(*args: str, cwd=None, env=None, timeout: float = 120) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run([*VITKIT, *args], capture_output=True, text=True, cwd=cwd, env=full_env, timeout=timeout)


def test_every_registered_command_is_available():
    assert {"models", "train", "eval", "predict", "bench", "convert", "demo"} <= set(AVAILABLE)
    assert set(AVAILABLE) <= set(COMMANDS)


@pytest.mark.parametrize("command", AVAILABLE)
def test_command_help(command):
    r = run_cli(command, "--help")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"usage: vitkit {command}"), r.stdout[:200]
    assert "Traceback" not in r.stderr and r.stderr == ""
    assert "%%" not in r.stdout  # a doubled escape shows literally


def test_top_level_help_lists_every_command():
    r = run_cli("--help")
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    for command in AVAILABLE:
        assert f"\n    {command} " in r.stdout, command
    assert "% of GEMM" in r.stdout and "%%" not in r.stdout  # the text that crashed argparse's %-formatting


def test_bare_command_prints_help_and_exits_2():
    r = run_cli()
    assert r.returncode == 2
    assert r.stdout.startswith("usage: vitkit") and "COMMAND" in r.stdout
    assert "Traceback" not in r.stderr


def test_console_script_and_module_agree():
    exe = os.path.join(os.path.dirname(sys.executable), "vitkit")
    if not os.path.exists(exe):
        pytest.skip("the vitkit console script is not installed next to this interpreter")
    a = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    b = run_cli("--help")
    assert a.returncode == b.returncode == 0
    assert a.stdout == b.stdout


def test_version():
    r = run_cli("--version")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"vitkit {vitkit.__version__} (torch {metadata.version('torch')}")
    assert vitkit.__version__ == metadata.version("vitkit")


@pytest.mark.serial
def test_help_is_fast_and_does_not_import_torch():
    """`vitkit --help` answers in under 1 s: the front-end imports torch only when a command needs it."""
    from timing import overloaded
    code = ("import sys, time; t = time.perf_counter(); from vitkit.cli.main import build_parser; "
            "p = build_parser(); p.format_help(); "
            "[a.choices[c].format_help() for a in p._subparsers._group_actions for c in a.choices]; "
            "print('torch' in sys.modules, time.perf_counter() - t)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    imported, seconds = r.stdout.split()
    assert imported == "False", "building the parser imported torch"
    if overloaded():
        pytest.skip(f"torch is not imported; {overloaded()}")
    assert float(seconds) < 1.0
    best = min(_timed(run_cli, "--help") for _ in range(2))  # whole process, interpreter start included
    assert best < 1.0, f"vitkit --help took {best:.2f} s"


def _timed(fn, *args) -> float:
    start = time.perf_counter()
    assert fn(*args).returncode == 0
    return time.perf_counter() - start


def test_import_vitkit_is_lazy():
    code = "import sys, vitkit; assert 'torch' not in sys.modules; vitkit.create_model; print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "True"  # the first use of a model function loads it
    assert {"create_model", "load_model", "record_attention"} <= set(dir(vitkit))
    with pytest.raises(AttributeError):
        vitkit.no_such_name  # noqa: B018


def test_demo_expectations_agree_between_readme_recipe_and_output():
    from vitkit.cli import demo
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    readme = open(os.path.join(root, "README.md")).read()
    recipe = open(os.path.join(root, "configs", "digits_demo.yaml")).read()
    for text in (readme, recipe):
        assert demo.EXPECTED_TIME in text
        assert demo.EXPECTED_ACCURACY.replace("test top-1 ", "") in text
    assert demo.EXPECTED_TIME in demo.HELP
    assert "vitkit[tensorboard]" in readme  # `make demo` does not install TensorBoard: the README says how


def test_console_script_lists_every_command():
    """The `vitkit` script pyproject's [project.scripts] installs next to the interpreter."""
    from pathlib import Path

    from conftest import skip_or_fail
    script = Path(sys.executable).with_name("vitkit")
    if not script.is_file():
        skip_or_fail(f"the vitkit console script is not installed at {script} (pip install -e .)")
    proc = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("usage: vitkit")
    listed = {line.split()[0] for line in proc.stdout.splitlines() if line.startswith("    ") and line.split()}
    assert set(AVAILABLE) <= listed, proc.stdout
    assert "Traceback" not in proc.stderr


def test_a_signal_during_a_deferred_block_is_raised_when_the_block_ends():
    """``interrupts.deferred`` (around importing torch, whose C++ initialisers call back into Python, where an
    exception raised by the handler ends the process with std::terminate): the block runs to its end, then the
    held signal raises in plain Python."""
    import signal
    import threading
    import time
    from vitkit import interrupts

    def handle(signum, frame):
        raise interrupts.Aborted("stopped", signum)

    ran, old = [], signal.signal(signal.SIGTERM, handle)
    try:
        with pytest.raises(interrupts.Aborted):
            with interrupts.deferred():
                # to this thread: a process-directed signal may go to another thread (the mask is per thread; the
                # CLI holds signals before torch has started any)
                signal.pthread_kill(threading.get_ident(), signal.SIGTERM)
                time.sleep(0.05)
                ran.append("to its end")
    finally:
        signal.signal(signal.SIGTERM, old)
    assert ran == ["to its end"]


def test_the_cli_imports_torch_with_signals_held_except_for_torch_free_commands(monkeypatch, tmp_path):
    import contextlib
    from vitkit import interrupts
    from vitkit.cli.main import main
    calls = []

    @contextlib.contextmanager
    def recording():
        calls.append("held")
        yield
    monkeypatch.setattr(interrupts, "deferred", recording)
    assert main(["models"]) == 0 and calls == []
    assert main(["eval", str(tmp_path / "no_such_run")]) == 2 and calls == ["held"]
