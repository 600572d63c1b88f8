"""One writer per output: a second command writing the same file or folder stops with one line.

Every command that writes a folder (extract's cache files, adapt's run, eval, export, index, sweep)
holds an exclusive `flock` on a hidden sibling file `.NAME.lock` for as long as it works, so two
commands started together never both think the target is theirs: the second is refused at once
instead of one silently replacing the other's output at the end. The lock is the kernel's, so a
killed process releases it; the file itself is removed on release.
"""
from __future__ import annotations

import fcntl
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from medembed.common.errors import MedembedError


class TargetBusy(MedembedError, FileExistsError):
    """Another process is writing the same output."""


def lock_path(target: str | Path) -> Path:
    """The lock file of `target`: a hidden sibling, so the target folder itself can be swapped."""
    target = Path(target)
    return target.with_name(f".{target.name}.lock")


def _acquire(path: Path) -> int | None:
    """An fd holding an exclusive lock on `path`, or None when another process holds it.

    A holder unlinks the file on release, so after locking we check that the name still points at
    the inode we locked (otherwise we locked a file nobody else will ever see) and try again."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


@contextmanager
def exclusive(target: str | Path, what: str, hint: str = "wait for it to finish or choose another --out",
              busy: Callable[[str], Exception] = TargetBusy) -> Iterator[Path]:
    """Hold the only write access to `target` (a file or folder, existing or not) for the block.

    `what` names the writer in the refusal, `busy(message)` is raised with it (a caller's own error
    class): "{target}: another {what} is already writing it; {hint}"."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    path = lock_path(target)
    fd = _acquire(path)
    if fd is None:
        raise busy(f"{target}: another {what} is already writing it; {hint}")
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield path
    finally:
        path.unlink(missing_ok=True)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
