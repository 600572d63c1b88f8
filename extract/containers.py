"""Reading one image out of a container file without unpacking it: a zip, an uncompressed tar
(WebDataset shards) or a parquet file (Hugging Face datasets).

A location "CONTAINER::MEMBER" names the image: MEMBER is the path inside a zip or tar, and for a
parquet file the row index as a decimal string ("17"). Unpacking hundreds of thousands of images to
disk doubles the storage and takes longer than extracting the features, so members are read in place.

Opening a container is the expensive part (a zip's central directory, every header of a tar, a parquet
footer), far more than reading one image, so open handles are kept per process: keyed by (pid, path),
because a DataLoader worker forked from a parent that already opened the file must not share the
parent's file offset; checked against the file's mtime and size on every lookup, so a rewritten
container is reopened instead of read through a stale index; and bounded by a small LRU, because only
a few containers are in use at once and each holds a file descriptor.
"""
from __future__ import annotations

import bisect
import itertools
import lzma
import os
import tarfile
import threading
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

from medembed.extract.limits import OUT_CHUNK, CorruptStream, DecompressionBomb, inflate_limit

CONTAINER_SUFFIXES = (".zip", ".tar", ".parquet")

__all__ = ["CONTAINER_SUFFIXES", "is_container", "member_size", "parquet_image_column", "read_member"]


def is_container(path: str) -> bool:
    """Whether a path names a container this module reads (by suffix, case-insensitive)."""
    return path.lower().endswith(CONTAINER_SUFFIXES)


def read_member(container: str, member: str, max_bytes: int = inflate_limit()) -> bytes | bytearray:
    """The bytes of one member; FileNotFoundError naming both when the member is not there,
    DecompressionBomb when a compressed member would inflate to more than `max_bytes`, and
    CorruptStream when the container or the member is damaged."""
    try:
        return _handle(container).read(member, max_bytes)
    except KeyError:
        raise FileNotFoundError(f"{container}: no member {member!r}") from None


def member_size(container: str, member: str) -> int:
    """Byte size of one member; -1 when the container or the member is missing or unreadable.

    For zip and tar this comes from the index alone; a parquet row's size needs its row group's image
    column, read once per process (see `_Parquet`), so sizing every row of a parquet file reads it once.
    """
    try:
        return _handle(container).size(member)
    except (KeyError, OSError, ValueError, zipfile.BadZipFile, tarfile.TarError):
        return -1  # pyarrow's errors derive from OSError / ValueError


class _Container(Protocol):
    def read(self, member: str, max_bytes: int) -> bytes | bytearray: ...

    def size(self, member: str) -> int: ...

    def close(self) -> None: ...


H = TypeVar("H", bound=_Container)


class _Handles(Generic[H]):
    """Open containers of one kind, per process, reopened when the file changed, LRU-bounded."""

    def __init__(self, opener: Callable[[str], H], capacity: int) -> None:
        self._opener = opener
        self._capacity = capacity
        self._open: OrderedDict[tuple[int, str], tuple[tuple[int, int], H]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, path: str) -> H:
        st = os.stat(path)
        signature = (st.st_mtime_ns, st.st_size)
        key = (os.getpid(), os.path.abspath(path))
        with self._lock:
            cached = self._open.get(key)
            if cached is not None and cached[0] == signature:
                self._open.move_to_end(key)
                return cached[1]
            if cached is not None:
                del self._open[key]
                cached[1].close()
            handle = self._opener(path)
            self._open[key] = (signature, handle)
            while len(self._open) > self._capacity:
                (pid, _), (_, old) = self._open.popitem(last=False)
                if pid == os.getpid():  # a handle inherited from the parent is the parent's to close
                    old.close()
            return handle


class _Zip:
    def __init__(self, path: str) -> None:
        self._zip = zipfile.ZipFile(path)  # ZipFile serialises reads of its shared file itself

    def read(self, member: str, max_bytes: int) -> bytes | bytearray:
        """A stored member as it is; a compressed one refused when the index declares more than
        `max_bytes`, else inflated a small step at a time into the buffer returned (not copied once
        more into bytes: that would hold the image twice). zipfile stops at the declared size (a lying
        index ends in a CRC error), but inflates each read whole: one read of the rest of a member
        could hold a gigabyte before that cut. A bzip2 member is refused whatever its size, since a
        read of even 4 KiB of bzip2 may inflate to gigabytes. What zipfile and its decompressors raise
        for a damaged member (a bad CRC, a cut stream, a method it does not know) is CorruptStream."""
        info = self._zip.getinfo(member)
        try:
            return self._read(info, max_bytes)
        except (zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError, NotImplementedError) as e:
            raise CorruptStream(f"the zip member is damaged ({_reason(e)})") from None

    def _read(self, info: zipfile.ZipInfo, max_bytes: int) -> bytes | bytearray:
        if info.compress_type == zipfile.ZIP_STORED:
            return self._zip.read(info)
        if info.compress_type == zipfile.ZIP_BZIP2:
            raise DecompressionBomb("a zip member compressed with bzip2, whose inflation cannot be bounded")
        if info.file_size > max_bytes:
            raise DecompressionBomb(f"the zip member inflates to {info.file_size} bytes, more than the decoder's "
                                    f"limit of {max_bytes}")
        # deflate takes the step as its output limit; LZMA reads at least 4 KiB of input and inflates it
        # whole (at most ~30 MB)
        step = OUT_CHUNK if info.compress_type == zipfile.ZIP_DEFLATED else 4096
        out = bytearray()
        with self._zip.open(info) as f:
            while chunk := f.read(step):
                out += chunk
        return out

    def size(self, member: str) -> int:
        return self._zip.getinfo(member).file_size

    def close(self) -> None:
        self._zip.close()


class _Tar:
    """Member name -> (data offset, size), from one pass over the headers; a read is one seek+read.

    Only uncompressed tars: a compressed stream cannot be entered at an offset. When a name occurs
    twice the last one wins, as `tarfile` and `tar -x` have it.
    """

    def __init__(self, path: str) -> None:
        self._file = open(path, "rb")  # kept open for the handle's lifetime
        self._lock = threading.Lock()
        self._members: dict[str, tuple[int, int]] = {}
        try:
            with tarfile.open(fileobj=self._file, mode="r:") as tf:
                for info in tf:
                    if info.isfile():
                        self._members[info.name] = (info.offset_data, info.size)
        except BaseException:
            self._file.close()
            raise

    def read(self, member: str, max_bytes: int) -> bytes:  # stored bytes: nothing is inflated
        offset, size = self._members[member]
        with self._lock:
            self._file.seek(offset)
            data = self._file.read(size)
        if len(data) != size:
            raise OSError(f"{self._file.name}: member {member!r} is truncated ({len(data)} of {size} bytes)")
        return data

    def size(self, member: str) -> int:
        return self._members[member][1]

    def close(self) -> None:
        self._file.close()


def parquet_image_column(schema: Any) -> tuple[str, bool] | None:
    """(name, is_struct) of the column holding image bytes in a pyarrow schema, or None.

    Hugging Face `datasets` stores its Image feature as a struct {bytes: binary, path: string}; a
    plain binary column named image is accepted too. A column called "image" wins over other structs.
    """
    import pyarrow as pa

    def binary(t: Any) -> bool:
        return pa.types.is_binary(t) or pa.types.is_large_binary(t)

    def image_struct(t: Any) -> bool:
        return pa.types.is_struct(t) and t.get_field_index("bytes") >= 0 and binary(t.field("bytes").type)

    fields = sorted(schema, key=lambda f: f.name != "image")
    for f in fields:
        if image_struct(f.type):
            return f.name, True
        if f.name == "image" and binary(f.type):
            return f.name, False
    return None


class _Parquet:
    """Rows of a parquet file by index: row -> (row group, offset) from the footer. A row group's
    image column is read whole and the last few read are kept, since a batch reads consecutive rows
    and one row group (100 images in files `datasets` writes) serves many of them; groups are dropped
    oldest first past `budget` bytes, though the newest is always kept. The byte size of every row
    read is remembered for good (a few bytes a row), so sizing all rows reads each group once."""

    def __init__(self, path: str, groups: int = 4, budget: int = 256 << 20) -> None:
        import pyarrow.parquet as pq

        self._path = path
        self._file = pq.ParquetFile(path)
        meta = self._file.metadata
        self._ends = list(itertools.accumulate(meta.row_group(i).num_rows for i in range(meta.num_row_groups)))
        self._column = parquet_image_column(self._file.schema_arrow)
        self._groups: OrderedDict[int, Any] = OrderedDict()
        self._sizes: dict[int, list[int]] = {}  # group -> byte size of each row, -1 where there are no bytes
        self._max_groups, self._budget = groups, budget
        self._lock = threading.Lock()

    def _locate(self, member: str) -> tuple[int, int]:
        """(row group, offset in it); KeyError when there is no such row."""
        if not member.isdigit() or int(member) >= (self._ends[-1] if self._ends else 0):
            raise KeyError(member)
        if self._column is None:
            raise ValueError(f"{self._path}: no image column (a struct with bytes, or binary 'image')")
        row = int(member)
        group = bisect.bisect_right(self._ends, row)
        return group, row - (self._ends[group - 1] if group else 0)

    def _group(self, group: int) -> Any:
        """The row group's image bytes as a pyarrow binary array, read once and kept a while."""
        import pyarrow.compute as pc

        with self._lock:
            values = self._groups.get(group)
            if values is None:
                name, is_struct = self._column
                values = self._file.read_row_group(group, columns=[name]).column(0).combine_chunks()
                if is_struct:
                    values = values.field("bytes")
                self._sizes[group] = [-1 if n is None else n for n in pc.binary_length(values).to_pylist()]
                self._groups[group] = values
                while len(self._groups) > 1 and (len(self._groups) > self._max_groups
                                                 or sum(v.nbytes for v in self._groups.values()) > self._budget):
                    self._groups.popitem(last=False)
            self._groups.move_to_end(group)
            return values

    def read(self, member: str, max_bytes: int) -> bytes:  # the row group is read (and inflated) by pyarrow
        group, offset = self._locate(member)
        value = self._group(group)[offset]
        if not value.is_valid:
            raise KeyError(member)  # an Image feature that holds only a path: the bytes are elsewhere
        return value.as_py()

    def size(self, member: str) -> int:
        group, offset = self._locate(member)
        if group not in self._sizes:
            self._group(group)
        return self._sizes[group][offset]

    def close(self) -> None:
        self._groups.clear()
        self._file.close()


_HANDLES: dict[str, _Handles[Any]] = {
    ".zip": _Handles(_Zip, 8),
    ".tar": _Handles(_Tar, 8),
    ".parquet": _Handles(_Parquet, 4),
}


def _handle(container: str) -> _Container:
    """The open container; CorruptStream when its index cannot be read (zipfile and tarfile raise
    errors of their own there, which no decoder's guard expects)."""
    suffix = os.path.splitext(container)[1].lower()
    handles = _HANDLES.get(suffix)
    if handles is None:
        raise ValueError(f"{container}: not a container (expected one of {', '.join(CONTAINER_SUFFIXES)})")
    try:
        return handles.get(container)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError) as e:
        raise CorruptStream(f"{container}: not a readable {suffix[1:]} archive ({_reason(e)})") from None


def _reason(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
