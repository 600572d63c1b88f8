"""Run `cli.py ARGS` in a fresh Python process and read back its peak resident memory (VmHWM), for
tests that hold a command to its --max-memory-gb."""
from __future__ import annotations

import subprocess
import sys

RUNNER = """
import sys
from medembed.common.memory import peak_rss_bytes
try:
    from medembed.cli import main
    main(sys.argv[1:], standalone_mode=False)
finally:
    print("PEAK", peak_rss_bytes(), flush=True)
"""


def run_cli(args: list[str], timeout: float) -> tuple[subprocess.CompletedProcess, int]:
    """(the finished process, its peak bytes; 0 when it printed none)."""
    done = subprocess.run([sys.executable, "-c", RUNNER, *args], capture_output=True, text=True, timeout=timeout)
    peak = int(done.stdout.rsplit("PEAK", 1)[1].split()[0]) if "PEAK" in done.stdout else 0
    return done, peak
