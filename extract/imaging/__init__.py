"""Every image the toolkit reads, whatever its format and wherever it lives, as an RGB picture.

One entry point, `open_image(location, options)`: the location says where the bytes are (a file, a
member of a zip/tar/parquet container, optionally one frame of a multi-frame file or one slice of a
volume: see `locations`), the content says how to decode them (DICOM, NIfTI, or any format Pillow
reads), and `DecodeOptions` say how a wide intensity range becomes 8 bits (see `windows`).
Extraction, the search page, explanations and fine-tuning all open images here, so a DICOM file is
shown to the backbone and to the user the same way.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from PIL import Image

from medembed.common.errors import BadInput
from medembed.extract.access import DataAccess
from medembed.extract.imaging.dicom import NotAnImage, TooLarge, decode_dicom, is_dicom
from medembed.extract.imaging.locations import (
    frame_of,
    image_size,
    read_at,
    read_image_bytes,
    split_location,
    with_frame,
)
from medembed.extract.imaging.nifti import decode_nifti, is_nifti
from medembed.extract.imaging.raster import PixelLimit, decode_raster
from medembed.extract.imaging.windows import WINDOW_CHOICES, Window, parse_window
from medembed.extract.limits import MAX_PIXELS, CorruptStream, DecompressionBomb, inflate_limit

__all__ = ["DEFAULT_DECODE", "MAX_PIXELS", "WINDOW_CHOICES", "CorruptStream", "DecodeOptions", "DecompressionBomb",
           "NotAnImage", "UndecodableImage", "decode_image", "frame_of", "image_size", "open_image", "parse_window",
           "read_image_bytes", "split_location", "with_frame"]


class UndecodableImage(BadInput):
    """A decoder's own failure that is not a ValueError or OSError: pydicom, nibabel and Pillow raise
    what they like for a damaged file (RuntimeError, struct.error, NotImplementedError, IndexError...).
    Raised from it (`__cause__`) with its message, so that every guard that skips an unreadable image
    -- extraction, example grids, the page, fine-tuning -- catches one family of errors."""


@dataclass(frozen=True)
class DecodeOptions:
    """How images are rendered to 8 bits. The default is recorded as nothing, so caches made before
    these options existed keep their provenance; any other choice is part of the cache's provenance."""

    window: Window = field(default_factory=Window)

    @classmethod
    def from_text(cls, window: str = "auto") -> DecodeOptions:
        return cls(parse_window(window))

    def describe(self) -> str:
        return "" if self.window.is_auto else f"window={self.window.describe()}"

    @classmethod
    def from_provenance(cls, decoding: str | None) -> DecodeOptions:
        """The options a cache's `image_decoding` attribute records (see `describe`), so the search
        page shows pool images, and decodes query images, the way the features were made."""
        for part in (decoding or "").split(";"):
            key, _, value = part.strip().partition("=")
            if key == "window" and value:
                preset, _, numbers = value.partition(":")
                return cls(parse_window(preset if numbers else value))
        return cls()


DEFAULT_DECODE = DecodeOptions()


def open_image(location: str, options: DecodeOptions = DEFAULT_DECODE, max_pixels: int = MAX_PIXELS,
               access: DataAccess | None = None) -> Image.Image:
    """Decode fully (not lazily) so truncated files fail here, inside the caller's skip-and-report guard:
    whatever cannot be read is an OSError (missing, refused: `OutsideDataFolder`) or a ValueError
    (damaged data: `CorruptStream`, `DecompressionBomb`, `UndecodableImage`...). `access`: the data
    folder's rule the location must keep to (an image of a dataset or cache; a query file the user
    names needs none)."""
    container, member, frame = split_location(location, access)  # parsed (and a private path found) once
    with _as_undecodable():  # pyarrow, for one, raises errors of its own for a damaged parquet file
        data = read_at(container, member, inflate_limit(max_pixels))
    return decode_image(data, member or container, options, frame, max_pixels)


def decode_image(data: bytes | bytearray, name: str = "", options: DecodeOptions = DEFAULT_DECODE, frame: int | None = None,
                 max_pixels: int = MAX_PIXELS) -> Image.Image:
    """An image file's bytes as an RGB image. `name` (the file or member name) tells NIfTI and
    pre-Part-10 DICOM apart, which have no reliable signature; the pixel count is checked from the
    header before decoding, so a small file claiming a huge canvas is refused without allocating it.
    A decoder failure is a ValueError (an `UndecodableImage` where the decoder raised something else)
    or an OSError (Pillow's for a damaged raster)."""
    if not data:
        raise ValueError("zero-byte file")
    try:
        with _as_undecodable():
            if is_nifti(name):
                return decode_nifti(data, options.window, frame, max_pixels)
            if is_dicom(data, name):
                return decode_dicom(data, options.window, frame, max_pixels)
            if frame is not None:
                raise ValueError(f"frame {frame} asked of a single-image file")
            return decode_raster(data, options.window, max_pixels)
    except (TooLarge, PixelLimit, Image.DecompressionBombError) as e:
        raise DecompressionBomb(str(e)) from None


@contextmanager
def _as_undecodable() -> Iterator[None]:
    """Errors other than ValueError and OSError (and Pillow's bomb error, a DecompressionBomb to the
    caller) raised as UndecodableImage, from the original."""
    try:
        yield
    except (ValueError, OSError, Image.DecompressionBombError):
        raise
    except Exception as e:  # noqa: BLE001 - a reader's own error type, kept as the cause
        raise UndecodableImage(str(e).strip() or type(e).__name__) from e
