"""A pool image as a thumbnail, for the grids that show what a query found.

Cached image locations are relative to the data root the extractor recorded, so drawing needs the
original images, read under the data folder's rule as the extractor read them. An image that can
no longer be read (moved, damaged, outside the folder) is None, drawn as a placeholder, so one
missing file never fails an evaluation or a search.
"""
from __future__ import annotations

from PIL import Image

from medembed.extract.access import DataAccess
from medembed.extract.imaging import DecodeOptions, open_image

THUMBNAIL = 384


def load_image_thumbnail(path: str, options: DecodeOptions, access: DataAccess | None = None) -> Image.Image | None:
    """A pool image (at its recorded location, rendered as at extraction, read under its data folder's
    rule `access`) as a thumbnail; None when it is unknown, can no longer be read or may not be."""
    if not path:
        return None
    try:
        img = open_image(path, options, access=access)
    except (OSError, ValueError, KeyError):
        return None
    img.thumbnail((THUMBNAIL, THUMBNAIL))
    return img
