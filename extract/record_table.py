"""The records of a dataset as Arrow columns, spilled to a memory-mapped file once they are many.

A `Record` as a Python object costs about 500 bytes (the dataclass, its strings and tuples), so a
list of ten million is 5 GB before extraction starts. Here the same records are five Arrow columns
(id, image location, captions, concepts, split) built a batch at a time: a collection past
`spill_rows` is written batch by batch to an Arrow IPC file and read back memory-mapped, so what
the process holds is the page cache of that file, which the kernel can drop, and never the whole
collection as objects. The file is unlinked as soon as it is mapped, or when a reader stops with an
error; it lives in the temporary folder (`TMPDIR`), which should be on disk, not tmpfs.

`RecordTable` is a read-only sequence of `Record`: `len`, an index, a slice, iteration and `==` with
a list behave as they do for a list, so every reader and the extraction loop use it unchanged. A
split, or any selection, is a view holding 8 bytes a row (its row numbers), not a copy.
"""
from __future__ import annotations

import os
import tempfile
import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

import numpy as np

if TYPE_CHECKING:
    import pyarrow as pa

BATCH_ROWS = 16_384  # records per Arrow batch: the unit of building, spilling and reading back (a few MB)
SPILL_ROWS = 262_144  # a collection of more records than this is kept in a memory-mapped file
COLUMNS = ("image_id", "image", "captions", "concepts", "split")


@dataclass(frozen=True)
class Record:
    """One image with its captions and concepts (re-exported by `medembed.extract.records`)."""

    image_id: str
    image: str  # a file path, or "CONTAINER::member" / "FILE::frame=N" (see imaging.locations)
    captions: tuple[str, ...]
    concepts: tuple[str, ...]
    split: str


def _schema() -> pa.Schema:
    import pyarrow as pa

    return pa.schema([("image_id", pa.string()), ("image", pa.string()), ("captions", pa.list_(pa.string())),
                      ("concepts", pa.list_(pa.string())), ("split", pa.string())])


class RecordTableBuilder:
    """Appends records one at a time and turns every `batch_rows` of them into an Arrow batch; past
    `spill_rows` the batches go to a temporary IPC file instead of memory."""

    def __init__(self, spill_rows: int | None = None, batch_rows: int = BATCH_ROWS, spill_dir: str | None = None):
        self.spill_rows = SPILL_ROWS if spill_rows is None else spill_rows
        self.batch_rows, self.spill_dir = batch_rows, spill_dir
        self._pending: dict[str, list] = {c: [] for c in COLUMNS}
        self._batches: list[pa.RecordBatch] = []
        self._writer: Any = None
        self._path: str | None = None
        self.rows = 0

    def append(self, record: Record) -> None:
        p = self._pending
        p["image_id"].append(record.image_id)
        p["image"].append(record.image)
        p["captions"].append(list(record.captions))
        p["concepts"].append(list(record.concepts))
        p["split"].append(record.split)
        self.rows += 1
        if len(p["split"]) >= self.batch_rows:
            self._flush()

    def extend(self, records: Iterable[Record]) -> RecordTableBuilder:
        for r in records:
            self.append(r)
        return self

    def _flush(self) -> None:
        import pyarrow as pa

        if not self._pending["split"]:
            return
        batch = pa.record_batch([pa.array(self._pending[c], type=_schema().field(c).type) for c in COLUMNS],
                                schema=_schema())
        self._pending = {c: [] for c in COLUMNS}
        self._add_batch(batch)

    def _add_batch(self, batch: pa.RecordBatch) -> None:
        import pyarrow as pa

        if self._writer is None and self.rows > self.spill_rows:
            fd, self._path = tempfile.mkstemp(prefix="medembed-records-", suffix=".arrow", dir=self.spill_dir)
            os.close(fd)
            # a reader that stops with an error drops its builder: the file goes with it
            self._cleanup = weakref.finalize(self, Path(self._path).unlink, missing_ok=True)
            self._writer = pa.ipc.new_file(self._path, _schema())
            for b in self._batches:
                self._writer.write_batch(b)
            self._batches = []
        if self._writer is not None:
            self._writer.write_batch(batch)
        else:
            self._batches.append(batch)

    def add_batches(self, batches: Iterable[pa.RecordBatch]) -> RecordTableBuilder:
        """Whole Arrow batches of this schema (a column rewritten by `RecordTable.with_splits`)."""
        self._flush()
        for b in batches:
            self.rows += b.num_rows
            self._add_batch(b)
        return self

    def finish(self) -> RecordTable:
        import pyarrow as pa

        self._flush()
        if self._writer is None:
            return RecordTable(pa.Table.from_batches(self._batches, schema=_schema()))
        self._writer.close()
        try:
            table = pa.ipc.open_file(pa.memory_map(self._path, "r")).read_all()  # zero-copy over the mapping
        finally:
            self._cleanup()  # unlinked: the mapping stays valid, nothing is left on disk
        return RecordTable(table, spilled=True)


@dataclass(frozen=True)
class _Window:
    """One decoded stretch of rows (the last read), so reading records in order costs one Arrow
    conversion per batch rather than one per record."""

    start: int
    records: list


class RecordTable(Sequence):
    """A read-only sequence of `Record` over Arrow columns; `rows` selects (and orders) a view."""

    def __init__(self, table: pa.Table, rows: np.ndarray | None = None, spilled: bool = False):
        self.table, self.rows, self.spilled = table, rows, spilled
        self._window: _Window | None = None
        self._splits: dict[str, RecordTable] = {}
        self._batches: list | None = None  # the table's batches and where each starts (for `_gather`)
        self._offsets: np.ndarray | None = None

    # ----------------------------------------------------------------------------------- construction

    @classmethod
    def of(cls, records: Iterable[Record], spill_rows: int | None = None) -> RecordTable:
        if isinstance(records, RecordTable):
            return records
        return RecordTableBuilder(spill_rows).extend(records).finish()

    def __reduce__(self):
        """Pickled as an in-memory table of the rows it selects (a mapping is not portable)."""
        return RecordTable.of, (list(self),)

    # ----------------------------------------------------------------------------------- sequence

    def __len__(self) -> int:
        return self.table.num_rows if self.rows is None else len(self.rows)

    @overload
    def __getitem__(self, i: int) -> Record: ...
    @overload
    def __getitem__(self, i: slice) -> RecordTable: ...

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.select(np.arange(len(self), dtype=np.int64)[i])
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"record {i} of {n}")
        w = self._window
        if w is None or not w.start <= i < w.start + len(w.records):
            start = i - i % 4096
            w = self._window = _Window(start, self._decode(start, min(n, start + 4096)))
        return w.records[i - w.start]

    def __iter__(self) -> Iterator[Record]:
        for start in range(0, len(self), BATCH_ROWS):
            yield from self._decode(start, min(len(self), start + BATCH_ROWS))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, (RecordTable, list, tuple)):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        where = "memory-mapped" if self.spilled else "in memory"
        return f"RecordTable({len(self)} records, {where})"

    def _decode(self, lo: int, hi: int) -> list[Record]:
        part = self._take(lo, hi)
        cols = [part.column(c).to_pylist() for c in COLUMNS]
        return [Record(i, im, tuple(c), tuple(k), s) for i, im, c, k, s in zip(*cols)]

    def _take(self, lo: int, hi: int) -> pa.Table:
        if self.rows is None:
            return self.table.slice(lo, hi - lo)
        return self._gather(self.rows[lo:hi])

    def _gather(self, rows: np.ndarray) -> pa.Table:
        """These rows of the table, in this order. Arrow's `take` on a table of many batches costs the
        whole table (at 10M records, 0.2 s for any 16k rows), so a run of consecutive rows is a slice,
        and other rows are taken batch by batch from the batches they lie in."""
        import pyarrow as pa

        if len(rows) == 0:
            return self.table.slice(0, 0)
        if rows[-1] - rows[0] == len(rows) - 1 and np.all(np.diff(rows) == 1):
            return self.table.slice(int(rows[0]), len(rows))
        if self._batches is None:
            self._batches = self.table.to_batches()
            self._offsets = np.cumsum([0, *(b.num_rows for b in self._batches)])
        order = np.argsort(rows, kind="stable")
        ordered = rows[order]
        owner = np.searchsorted(self._offsets, ordered, "right") - 1
        cuts = np.flatnonzero(np.r_[True, owner[1:] != owner[:-1], True])
        pieces = [self._batches[owner[a]].take(pa.array(ordered[a:b] - self._offsets[owner[a]]))
                  for a, b in zip(cuts[:-1], cuts[1:])]
        back = np.empty_like(order)
        back[order] = np.arange(len(order))
        return pa.Table.from_batches(pieces, schema=self.table.schema).combine_chunks().take(pa.array(back))

    # ----------------------------------------------------------------------------------- columns

    def column_batches(self, name: str) -> Iterator[pa.Array]:
        """One column of the selected rows, a batch at a time, in order."""
        for start in range(0, len(self), BATCH_ROWS):
            yield self._take(start, min(len(self), start + BATCH_ROWS)).column(name).combine_chunks()

    def values(self, name: str) -> list:
        """One column of the selected rows as Python values (for a batch-sized view)."""
        return self._take(0, len(self)).column(name).to_pylist()

    def select(self, rows: np.ndarray) -> RecordTable:
        """A view of these rows of this sequence (positions in it), in the order given."""
        rows = np.asarray(rows, np.int64)
        return RecordTable(self.table, rows if self.rows is None else self.rows[rows], self.spilled)

    def split(self, name: str) -> RecordTable:
        """The records of one split, in order: a view, remembered (extraction asks for it often)."""
        if name not in self._splits:
            import pyarrow.compute as pc

            picked, start = [], 0
            for col in self.column_batches("split"):
                picked.append(np.flatnonzero(pc.equal(col, name).to_numpy(zero_copy_only=False)) + start)
                start += len(col)
            self._splits[name] = self.select(np.concatenate(picked) if picked else np.zeros(0, np.int64))
        return self._splits[name]

    def split_names(self) -> set[str]:
        import pyarrow.compute as pc

        out: set[str] = set()
        for col in self.column_batches("split"):
            out.update(pc.unique(col).to_pylist())
        return out

    def concepts(self) -> set[str]:
        import pyarrow.compute as pc

        out: set[str] = set()
        for col in self.column_batches("concepts"):
            out.update(pc.unique(pc.list_flatten(col)).to_pylist())
        return out

    def n_captions(self) -> int:
        import pyarrow.compute as pc

        return sum(int(pc.sum(pc.list_value_length(col)).as_py() or 0) for col in self.column_batches("captions"))

    def sorted_by_split_and_id(self) -> RecordTable:
        """The rows ordered by (split, image id), as Python's `sorted` orders them: UTF-8 byte order is
        code point order, and Arrow's sort is stable, so ties keep their order."""
        import pyarrow as pa
        import pyarrow.compute as pc

        keys = pa.table({"split": self._column("split"), "image_id": self._column("image_id")})
        order = pc.sort_indices(keys, sort_keys=[("split", "ascending"), ("image_id", "ascending")])
        return self.select(order.to_numpy())

    def _column(self, name: str) -> pa.ChunkedArray:
        col = self.table.column(name)
        return col if self.rows is None else col.take(self.rows)

    def with_splits(self, fill) -> RecordTable:
        """A new table whose empty splits are `fill(image_id)`."""
        return self.replace_column("split", lambda split, image_id: split or fill(image_id), using="image_id")

    def replace_column(self, name: str, fn, using: str | None = None) -> RecordTable:
        """A new table whose string column `name` is `fn(value)` (or `fn(value, row's using)`), rewritten
        a batch at a time; a spilled table stays spilled."""
        import pyarrow as pa

        builder = RecordTableBuilder(spill_rows=0 if self.spilled else len(self))

        def batches():
            for start in range(0, len(self), BATCH_ROWS):
                part = self._take(start, min(len(self), start + BATCH_ROWS))
                values = part.column(name).to_pylist()
                new = [fn(v) for v in values] if using is None else \
                    [fn(v, u) for v, u in zip(values, part.column(using).to_pylist())]
                part = part.set_column(COLUMNS.index(name), name, pa.array(new, pa.string()))
                yield from part.to_batches()

        return builder.add_batches(batches()).finish()
