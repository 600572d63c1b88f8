"""What reading one image may cost: the decoder's pixel limit, the bytes any decoder may inflate
(derived from it), and inflation that holds that byte limit while it runs.

A few megabytes of gzip or deflate can stand for gigabytes of zeros. Inflating first and measuring
afterwards lets such a file claim all of memory before it is refused (zlib's one-shot decompression
also holds its output twice while joining it), so every decoder that inflates (gzipped NIfTI,
deflated DICOM, gzipped annotations) goes through `inflate_chunks`, which hands out the output a
small chunk at a time and stops at the limit: what a caller holds is what it chose to keep. (Zip
members are inflated by zipfile, in small steps, within the size their index declares: `containers`.)
"""
from __future__ import annotations

import io
import os
import zlib
from collections.abc import Iterator

from medembed.common.errors import BadInput

MAX_PIXELS = 64_000_000  # ~8000 x 8000; far beyond any radiograph, far below what exhausts memory
# bytes a decoder may inflate per pixel of the pixel limit: a volume may hold many slices of that
# size, but a few kilobytes of gzip must not be able to claim all of memory
BYTES_PER_PIXEL_LIMIT = 32

GZIP_WBITS = 16 + zlib.MAX_WBITS  # gzip framing
RAW_DEFLATE_WBITS = -zlib.MAX_WBITS  # bare deflate (zip members, deflated DICOM data sets)
IN_CHUNK = 1 << 16  # compressed bytes handed to zlib at a time
OUT_CHUNK = 1 << 18  # inflated bytes taken from zlib at a time (measured fastest of 64 KiB - 16 MiB)


class DecompressionBomb(BadInput):
    """Content that inflates (or claims to) beyond the decoder's limit, or a canvas beyond its pixel limit."""


class CorruptStream(BadInput):
    """Compressed or archived bytes that are damaged or end early (a cut download, a bad CRC). A
    ValueError, as every other decoder failure is, so that whatever reads an image -- the extractor,
    example grids, the page -- skips it with this line as the reason (zlib's own error and EOFError
    would escape guards written for the decoders' errors)."""


def inflate_limit(max_pixels: int = MAX_PIXELS) -> int:
    """The most bytes a decoder may inflate for one image under the pixel limit `max_pixels`."""
    return max_pixels * BYTES_PER_PIXEL_LIMIT


def inflate_chunks(data: bytes | bytearray | memoryview, wbits: int, limit: int, what: str = "the file",
                   ) -> Iterator[bytes]:
    """The inflated bytes of `data`, at most OUT_CHUNK at a time; DecompressionBomb, naming `what`,
    before the chunk that would take the total past `limit` is handed out. Concatenated gzip members
    are read one after another, as gzip reads them; bytes after the stream (padding) are ignored. A
    damaged stream, or a truncated one once its last bytes are handed out, raises CorruptStream."""
    view = memoryview(data)
    pos, total = 0, 0
    inflate = zlib.decompressobj(wbits)
    while True:
        if inflate.unconsumed_tail:
            feed = inflate.unconsumed_tail
        elif pos < len(view):
            feed, pos = view[pos:pos + IN_CHUNK], pos + IN_CHUNK
        else:
            feed = b""
        try:
            out = inflate.decompress(feed, OUT_CHUNK)
        except zlib.error as e:
            raise CorruptStream(f"{what} is damaged (its compressed stream: {e})") from None
        total += len(out)
        if total > limit:
            raise DecompressionBomb(f"{what} inflates to more than {limit} bytes, the decoder's limit")
        if out:
            yield out
        if inflate.eof:
            pos = min(pos, len(view)) - len(inflate.unused_data)  # where this stream's input ended
            if wbits != GZIP_WBITS or bytes(view[pos:pos + 2]) != b"\x1f\x8b":
                return
            inflate = zlib.decompressobj(wbits)  # another gzip member follows
        elif not out and not inflate.unconsumed_tail and pos >= len(view):
            raise CorruptStream(f"{what} is truncated (its compressed stream ends early)")


def inflate(data: bytes | bytearray | memoryview, wbits: int, limit: int, what: str = "the file") -> bytes:
    """All of `data` inflated, never more than `limit` bytes of it (see `inflate_chunks`)."""
    return b"".join(inflate_chunks(data, wbits, limit, what))


def check_inflated_size(data: bytes | bytearray | memoryview, wbits: int, limit: int, what: str = "the file") -> None:
    """DecompressionBomb when `data` inflates to more than `limit` bytes, found while holding one
    chunk at a time; nothing when it does not, or when it is not a whole stream of this kind (its
    reader then reports that in its own words)."""
    try:
        for _ in inflate_chunks(data, wbits, limit, what):
            pass
    except CorruptStream:
        return


class BufferStream(io.RawIOBase):
    """A read-only, seekable file over bytes or a bytearray that copies nothing: io.BytesIO copies
    any buffer but bytes, so a decoder handed an inflated volume or zip member through it would hold
    the image twice. Reads copy only what they ask for (a header, a slice's voxels)."""

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        super().__init__()
        self._view = memoryview(data).cast("B")
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: len(self._view)}[whence]
        if base + offset < 0:
            raise ValueError(f"negative seek position {base + offset}")
        self._pos = base + offset
        return self._pos

    def read(self, size: int | None = -1) -> bytes:
        end = len(self._view) if size is None or size < 0 else min(len(self._view), self._pos + size)
        out = bytes(self._view[self._pos:end]) if end > self._pos else b""
        self._pos = max(self._pos, end)
        return out

    def readall(self) -> bytes:
        return self.read(-1)

    def readinto(self, buffer) -> int:
        out = memoryview(buffer).cast("B")
        n = max(0, min(len(out), len(self._view) - self._pos))
        out[:n] = self._view[self._pos:self._pos + n]
        self._pos += n
        return n

    def close(self) -> None:
        if not self.closed:
            self._view.release()
        super().close()
