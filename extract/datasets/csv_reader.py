"""A csv.reader that reads fields of any length a file can hold.

The csv module refuses a field longer than `csv.field_size_limit()` (131,072 characters unless
raised) with "field larger than field limit", so one long caption would turn a valid annotations
file into a "malformed CSV". The limit is process-wide state, though, and raising it for good would
change every other reader in the process. So it is raised only while this reader parses one row, to
the length of the text being read (no field can be longer), and put back before the row is handed on;
a lock keeps two such readers in different threads from putting back each other's value.
"""
from __future__ import annotations

import csv
import threading
from collections.abc import Iterable, Iterator
from typing import Any

_FIELD_LIMIT = threading.Lock()  # guards the csv module's process-wide field limit


class LongFieldReader:
    """`csv.reader(lines, **fmt)` whose rows may hold fields of up to `longest` characters (the length
    of the text read); `line_num` as csv.reader has it."""

    def __init__(self, lines: Iterable[str], longest: int, **fmt: Any) -> None:
        self._reader = csv.reader(lines, **fmt)
        self._longest = longest

    @property
    def line_num(self) -> int:
        return self._reader.line_num

    def __iter__(self) -> Iterator[list[str]]:
        return self

    def __next__(self) -> list[str]:
        with _FIELD_LIMIT:
            before = csv.field_size_limit()
            csv.field_size_limit(max(before, self._longest + 1))
            try:
                return next(self._reader)
            finally:
                csv.field_size_limit(before)
