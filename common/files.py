"""Writing files and folders so that a reader never sees half of one."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import unicodedata
from collections.abc import Callable
from pathlib import Path

from medembed.common.errors import AlreadyExists, BadInput, MedembedError


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """`write(tmp)` then one rename onto `path`: a kill leaves the old file or the new one, never a mix."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        # as any new file of this process: some writers (safetensors) create theirs owner-only
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _umask() -> int:
    """The process's file-creation mask (reading it means setting it; restored at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_json(path: str | Path, obj) -> Path:
    """Indented, key-sorted JSON, written atomically; NaN is written as null (JSON has no NaN)."""
    text = json.dumps(_nan_to_none(obj), indent=2, sort_keys=True, default=str) + "\n"
    return atomic_write(path, lambda p: p.write_text(text))


def read_json(path: str | Path):
    """A JSON file medembed wrote (a run's config or summary, an index's record), refused in one line
    naming the file when it is damaged: a half-copied or hand-edited file is the user's to fix."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadInput(f"{path}: damaged JSON ({e}); restore the file or make the run again") from e


def read_jsonl(path: str | Path) -> list:
    """The records of a JSON-lines file medembed appends to (a run's metrics.jsonl); a damaged line
    (a run killed mid-write) is refused in one line naming the file and line."""
    path = Path(path)
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise BadInput(f"{path}: line {number}: damaged JSON ({e}); remove that line or make the run "
                               "again") from e
    return rows


def _nan_to_none(obj):
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nan_to_none(v) for v in obj]
    return obj


def staging_folder(final: str | Path) -> Path:
    """An empty sibling folder to build `final` in (hidden, named after it and this process)."""
    final = Path(final)
    work = final.with_name(f".{final.name}.partial-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    return work


class TargetChanged(MedembedError, FileExistsError):
    """The output changed between a command's check and its swap: nothing was replaced."""


_UNCHECKED = object()


def folder_state(path: str | Path) -> tuple[int, int] | None:
    """What `path` is now (inode and modification time), None when it does not exist: taken when a
    command checks its output folder, compared again right before it swaps its result in."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def replace_folder(work: str | Path, final: str | Path, expected=_UNCHECKED) -> Path:
    """Swap the finished `work` folder in as `final`: a reader sees the previous folder or the new
    one, never a mix of both; the previous one is removed only after the new one is in place.

    With `expected` (a `folder_state` taken when the command checked `final`), the swap happens only
    if `final` is still what was checked; otherwise nothing is replaced and `work` is kept, named
    in the error, so neither result is lost."""
    work, final = Path(work), Path(final)
    if expected is not _UNCHECKED and folder_state(final) != expected:
        raise TargetChanged(f"{final}: changed while this command ran, so it was left as it is; this command's "
                            f"output is kept in {work}")
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(work, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def check_out_folder(out: Path, overwrite: bool, manifest: str, kind: str,
                     elsewhere: str = " or --out to write elsewhere") -> None:
    """An output folder may be new, empty, or an earlier `kind` (it holds `manifest`) when `overwrite`
    is given; anything else a user made is refused in one line, never replaced."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    if not out.is_dir() or not (out / manifest).exists():
        raise AlreadyExists(f"{out}: exists and is not an earlier {kind} (no {manifest}); choose another --out")
    if not overwrite:
        raise AlreadyExists(f"{out}: already holds {'an' if kind[0] in 'aeiou' else 'a'} {kind}; pass --overwrite "
                            f"to replace it{elsewhere}")


def relative_to(target: str | Path, base: str | Path) -> str:
    """`target` as a path relative to the folder `base` (both made absolute first): recorded beside
    an absolute path so that a tree moved as a whole (runs and features together) still resolves."""
    return os.path.relpath(os.path.abspath(target), os.path.abspath(base))


def resolve_recorded(absolute: str | Path, relative: str | None, base: str | Path) -> Path:
    """Where a recorded folder is now: the relative record (against `base`) when that exists, else
    the absolute one when that exists, else the absolute one as recorded (for the error message)."""
    if relative:
        moved = Path(base) / relative
        if moved.exists():
            return Path(os.path.normpath(moved))
    return Path(absolute)


def slug(name: str) -> str:
    """A folder name for a dataset or backbone name that keeps its letters, in any script.

    Characters that are not letters, digits or `._+-` (path separators, spaces, colons) become `_`.
    When anything had to change, 8 hex of the name's sha256 are appended, so two different names
    never share a folder ("Flickr ü" and "Flickr ñ", "a b" and "a/b"); a name that is already a
    plain folder name (roco-rad, effnet-lite0+minilm, 胸部) is kept as it is. Names are compared in
    Unicode NFC, so the same letters typed as composed or decomposed characters are one name."""
    norm = unicodedata.normalize("NFC", name)
    safe = re.sub(r"[^\w.+-]+", "_", norm).strip("_.")
    if safe != norm:
        safe = f"{safe or 'unnamed'}-{hashlib.sha256(norm.encode()).hexdigest()[:8]}"
    return safe
