"""Ordinary image files (JPEG, PNG, TIFF, WebP, BMP) through Pillow.

16-bit and floating-point grayscale (a radiograph exported as 16-bit PNG or TIFF) is windowed
like DICOM instead of being converted by Pillow, whose conversion to RGB clips every value above
255 to white.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from medembed.common.errors import BadInput
from medembed.extract.imaging.windows import Window, linear, percentile_window, to_uint8
from medembed.extract.limits import BufferStream

WIDE_MODES = ("I", "F", "I;16", "I;16L", "I;16B", "I;16N")
RASTER_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp", ".bmp")


class PixelLimit(BadInput):
    """The header claims more pixels than the decoder allows: refused before allocating them."""


def decode_raster(data: bytes | bytearray, window: Window, max_pixels: int) -> Image.Image:
    img = Image.open(BufferStream(data))  # a zip member comes as a bytearray, which io.BytesIO would copy
    if img.width * img.height > max_pixels:
        raise PixelLimit(f"{img.width} x {img.height} pixels exceeds the limit of {max_pixels}")
    img.load()
    if img.mode not in WIDE_MODES:
        return img.convert("RGB")
    values = np.asarray(img).astype(np.float64)
    if window.is_auto or window.preset != "custom":  # presets are Hounsfield windows; a PNG holds no HU
        unit = linear(values, *percentile_window(values))
    else:
        unit = linear(values, window.center, window.width)
    return Image.fromarray(np.repeat(to_uint8(unit)[..., None], 3, axis=2))
