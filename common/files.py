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


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """`write(tmp)` then one rename onto `path`: a kill leaves the old file or the new one, never a mix."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json(path: str | Path, obj) -> Path:
    """Indented, key-sorted JSON, written atomically; NaN is written as null (JSON has no NaN)."""
    text = json.dumps(_nan_to_none(obj), indent=2, sort_keys=True, default=str) + "\n"
    return atomic_write(path, lambda p: p.write_text(text))


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


def replace_folder(work: str | Path, final: str | Path) -> Path:
    """Swap the finished `work` folder in as `final`: a reader sees the previous folder or the new
    one, never a mix of both; the previous one is removed only after the new one is in place."""
    work, final = Path(work), Path(final)
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(work, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


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
