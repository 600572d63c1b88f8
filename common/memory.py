"""Process memory: budgets in bytes written for a person, the process's own peak, and settings the
command line applies once, at start-up (never at import).

glibc's malloc raises its mmap threshold every time a large block is freed (up to 32 MiB), after
which the many 1-30 MiB score blocks that evaluation allocates and frees come from the heap and
fragment it: the logistic detection fit on 20,000 images x 2,000 concepts left 340 MiB held
with the default and 160 MiB with the fixed threshold. A fixed threshold keeps
every block of 1 MiB or more in its own mapping, returned to the system when freed. Other C
libraries (musl, macOS) do not have this behaviour or this setting, so there it does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util

GB = 1 << 30  # --max-memory-gb counts GiB
M_MMAP_THRESHOLD = -3  # mallopt parameter numbers from glibc's <malloc.h>
MMAP_THRESHOLD_BYTES = 1 << 20


def release_large_blocks() -> bool:
    """Fix glibc's mmap threshold at 1 MiB; True when the setting was applied."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))


def format_bytes(n: float) -> str:
    """1.5 GiB, 74.0 MiB, 12.0 KiB or 512 B."""
    for unit, size in (("GiB", GB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def peak_rss_bytes() -> int:
    """This process's peak resident memory (Linux VmHWM: unlike ru_maxrss, not inherited across exec);
    0 where /proc does not say."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
