"""Intensity windows: how a medical image's wide value range becomes the 8 bits a backbone sees.

A CT slice spans about -1000 (air) to +3000 (dense bone) Hounsfield units; squeezed linearly into
0..255 every soft tissue lands within a few grey levels. Viewers therefore show a *window* (a centre
and a width) and so do we. Presets are the usual CT windows in Hounsfield units; `auto` takes the
file's own window (or VOI LUT) and falls back to a percentile window when the file has none.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medembed.common.errors import BadOption

# Common CT display windows (centre, width) in Hounsfield units.
PRESETS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "soft-tissue": (50.0, 400.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
}
# Without a window in the file: the 0.5th..99.5th percentile of the image's values, so one hot pixel
# or a padding border of -2000 does not decide the contrast of the whole image.
PERCENTILES = (0.5, 99.5)
WINDOW_CHOICES = ("auto", *PRESETS)


@dataclass(frozen=True)
class Window:
    """A linear window (None centre/width means `auto`). `preset` names it for provenance."""

    center: float | None = None
    width: float | None = None
    preset: str = "auto"

    @property
    def is_auto(self) -> bool:
        return self.center is None

    def describe(self) -> str:
        if self.is_auto:
            return "auto"
        return f"{self.preset}:{self.center:g}/{self.width:g}" if self.preset != "custom" else f"{self.center:g}/{self.width:g}"


def parse_window(text: str) -> Window:
    """`auto`, a preset name, or `CENTRE,WIDTH` (e.g. `-600,1500`); BadOption naming the choices."""
    value = text.strip().lower()
    if value in ("", "auto"):
        return Window()
    if value in PRESETS:
        c, w = PRESETS[value]
        return Window(c, w, value)
    parts = value.replace("/", ",").split(",")
    try:
        c, w = (float(p) for p in parts)
    except ValueError:
        raise BadOption(f"{text!r}: expected one of {', '.join(WINDOW_CHOICES)} or CENTRE,WIDTH (e.g. -600,1500)") from None
    if not np.isfinite(c) or not np.isfinite(w) or w <= 0:
        raise BadOption(f"{text!r}: the width must be a positive number and both must be finite")
    return Window(c, w, "custom")


def linear(values: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 windowing of values into [0, 1] (LINEAR, LINEAR_EXACT or SIGMOID)."""
    x = values.astype(np.float64, copy=False)
    function = (function or "LINEAR").upper()
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    if function == "LINEAR_EXACT":
        return np.clip((x - center) / width + 0.5, 0.0, 1.0)
    if width <= 1:  # the standard's LINEAR requires width >= 1; width 1 is a threshold
        return (x > center - 0.5).astype(np.float64)
    return np.clip((x - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


def percentile_window(values: np.ndarray) -> tuple[float, float]:
    """(centre, width) spanning the PERCENTILES of the finite values; width >= 1."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(finite, PERCENTILES)
    if hi <= lo:  # a flat image: show it mid-grey rather than dividing by zero
        lo, hi = float(finite.min()) - 0.5, float(finite.max()) + 0.5
    return (lo + hi) / 2.0, max(hi - lo, 1.0)


def min_max(values: np.ndarray) -> np.ndarray:
    """Values scaled linearly from their own minimum and maximum into [0, 1]."""
    v = values.astype(np.float64, copy=False)
    lo, hi = float(np.nanmin(v)), float(np.nanmax(v))
    return np.zeros_like(v) if hi <= lo else (v - lo) / (hi - lo)


def to_uint8(unit: np.ndarray) -> np.ndarray:
    """[0, 1] floats as 0..255 bytes, rounded (not truncated)."""
    return np.clip(np.rint(unit * 255.0), 0, 255).astype(np.uint8)
