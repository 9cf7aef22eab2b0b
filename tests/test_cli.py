"""The `vitkit` console script (pyproject [project.scripts]) and the help of every command the README lists."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from vitkit.cli.main import main

from conftest import skip_or_fail

README_COMMANDS = ("models", "train", "eval", "predict", "bench", "convert", "demo")  # README: "CLI: vitkit ..."


def test_console_script_lists_every_command():
    script = Path(sys.executable).with_name("vitkit")  # installed next to the interpreter by `pip install -e .`
    if not script.is_file():
        skip_or_fail(f"the vitkit console script is not installed at {script} (pip install -e .)")
    proc = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("usage: vitkit")
    listed = {line.split()[0] for line in proc.stdout.splitlines() if line.startswith("    ") and line.split()}
    assert set(README_COMMANDS) <= listed, proc.stdout
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("command", README_COMMANDS)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: vitkit {command}") and "options:" in out


def test_no_command_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    assert "usage: vitkit" in capsys.readouterr().out
