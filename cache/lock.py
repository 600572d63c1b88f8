"""One writer per output file: a second extract into the same place stops with a clear message."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from medembed.common.errors import MedembedError
from medembed.common.locks import exclusive


class CacheBusy(MedembedError, RuntimeError):
    pass


@contextmanager
def writer_lock(target: str | Path) -> Iterator[Path]:
    """The extraction's hold on one cache file (`common.locks.exclusive`, refused as `CacheBusy`)."""
    refusal = f"{target}: another extract is already writing this cache; wait for it to finish or choose another --out"
    with exclusive(target, "extract", busy=lambda _message: CacheBusy(refusal)) as held:
        yield held
