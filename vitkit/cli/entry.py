"""The ``vitkit`` console script and ``python -m vitkit``: signal handlers first, then the CLI. Importing the CLI
takes ~0.1 s before ``vitkit.cli.main.main`` installs its own handlers (``vitkit.interrupts``); a SIGINT/SIGTERM
meanwhile exits at once with one line and status 128 + N, since nothing has been written yet."""
import os
import signal
import sys


def _before_main(signum: int, frame) -> None:
    command = next((a for a in sys.argv[1:] if not a.startswith("-")), "")
    prog = f"vitkit {command}" if command.isidentifier() else "vitkit"
    os.write(2, f"{prog}: stopped by {signal.Signals(signum).name} before it started; nothing was written\n".encode())
    os._exit(128 + signum)


def main() -> int:
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, _before_main)
    from vitkit.cli.main import main as cli_main
    return cli_main()
