"""One writer per output file: a second extract into the same place stops with a clear message."""
from __future__ import annotations

from pathlib import Path

from medembed.common.errors import MedembedError
from medembed.common.locks import TargetBusy, exclusive


class CacheBusy(MedembedError, RuntimeError):
    pass


class WriterLock:
    """The extraction's hold on one cache file (`common.locks.exclusive`, with extract's wording)."""

    def __init__(self, target: str | Path):
        self.target = Path(target)
        self._held = None

    def __enter__(self) -> WriterLock:
        held = exclusive(self.target, "extract", "wait for it to finish or choose another --out")
        try:
            held.__enter__()
        except TargetBusy:
            raise CacheBusy(f"{self.target}: another extract is already writing this cache; wait for it to finish "
                            "or choose another --out") from None
        self._held = held
        return self

    def __exit__(self, *exc) -> None:
        if self._held is not None:
            self._held.__exit__(None, None, None)
            self._held = None
