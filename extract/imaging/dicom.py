"""DICOM files shown the way a radiologist's viewer shows them, as an 8-bit RGB image.

The order is the standard's grayscale pipeline (PS3.4 N.2): stored values -> Modality LUT (rescale
slope/intercept, or the LUT) -> VOI (the chosen window, else the file's VOI LUT or its window
centre/width, else a percentile window) -> MONOCHROME1 inverted so that white is dense. Colour
files (RGB, YBR -- converted by pydicom -- and palette colour) become RGB without windowing.
Decoding of compressed transfer syntaxes is pydicom's, through the plug-ins installed with
medembed (GDCM, pylibjpeg with OpenJPEG, RLE and, for 12-bit JPEG Extended, libjpeg).

Only pixel-module attributes are read here; nothing that identifies a patient leaves this module
(a skipped file's reason names its SOP class, never an attribute value).
"""
from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset as DicomDataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, apply_modality_lut, pixel_array
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from medembed.common.errors import BadInput
from medembed.extract.imaging.windows import Window, linear, percentile_window, to_uint8
from medembed.extract.limits import MAX_PIXELS, RAW_DEFLATE_WBITS, BufferStream, check_inflated_size, inflate_limit

DICOM_SUFFIXES = (".dcm", ".dicom", ".dic")
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"


class NotAnImage(BadInput):
    """A valid DICOM file that holds no picture (a report, a plan, a waveform, a DICOMDIR)."""


class TooLarge(BadInput):
    """Frame size beyond the decoder's pixel limit (checked from the header, before decoding)."""


class DamagedDicom(BadInput):
    """A file that is not a readable DICOM object at all: every object, image or not, names its SOP
    class (type 1 in every IOD, and in a Part 10 file's meta header), so one naming none and holding
    no pixel data is damaged -- random bytes after a DICOM preamble read as one garbage element."""


def is_dicom(data: bytes, name: str = "") -> bool:
    """Part 10 files carry "DICM" after a 128-byte preamble; older files without it are recognised
    by their suffix only (guessing on content would misread arbitrary binary files)."""
    return data[128:132] == b"DICM" or name.lower().endswith(DICOM_SUFFIXES)


class _InflationChecked:
    """A stream for pydicom that checks a deflated data set before pydicom inflates it: pydicom reads
    one (a Deflated Explicit VR Little Endian file) with the only read() of "all the rest" it makes,
    and inflates that in one call without a limit, so such a read is first inflated here a chunk at a
    time, holding nothing, and refused (DecompressionBomb) past `limit`."""

    limit: int

    def read(self, size: int | None = -1) -> bytes:
        data = super().read(size)  # type: ignore[misc]
        if size is None or size < 0:
            check_inflated_size(data, RAW_DEFLATE_WBITS, self.limit, "the deflated data set")
        return data


class _CheckedBytes(_InflationChecked, BufferStream):  # not io.BytesIO: it would copy a bytearray
    def __init__(self, data: bytes | bytearray, limit: int) -> None:
        super().__init__(data)
        self.limit = limit


class _CheckedFile(_InflationChecked, io.BufferedReader):
    def __init__(self, path, limit: int) -> None:
        super().__init__(io.FileIO(path))
        self.limit = limit


def read_header(source, pixels: bool = True, max_bytes: int = inflate_limit()) -> DicomDataset:
    """The dataset of a file path or bytes; InvalidDicomError for what is not DICOM at all, and
    DecompressionBomb for a deflated data set that would inflate to more than `max_bytes`."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        ds = dcmread(_CheckedBytes(source, max_bytes), force=True, stop_before_pixels=not pixels)
    else:
        with _CheckedFile(source, max_bytes) as f:
            ds = dcmread(f, force=True, stop_before_pixels=not pixels)
    if not ds:  # force=True returns an empty dataset for random bytes
        raise InvalidDicomError("not a DICOM file")
    return ds


def frame_count(source) -> int:
    """Number of frames (1 for single-frame files); 0 for a file that holds no image."""
    ds = read_header(source, pixels=False)
    if _no_image_reason(ds, header_only=True):
        return 0
    return max(int(ds.get("NumberOfFrames", 1) or 1), 1)


NO_SOP_CLASS = "no SOP class"


def _sop_class(ds: DicomDataset) -> str:
    uid = ds.get("SOPClassUID") or getattr(ds.get("file_meta"), "MediaStorageSOPClassUID", None)
    if uid is None:
        return NO_SOP_CLASS
    name = getattr(uid, "name", str(uid))
    return name if name != str(uid) else "an unregistered SOP class"


def _no_image_reason(ds: DicomDataset, header_only: bool = False) -> str:
    meta = ds.get("file_meta")
    if "DirectoryRecordSequence" in ds or getattr(meta, "MediaStorageSOPClassUID", "") == MEDIA_STORAGE_DIRECTORY:
        return "DICOMDIR (an index of the media, no image)"
    has_pixels = any(k in ds for k in PIXEL_KEYWORDS) or (header_only and "Rows" in ds and "Columns" in ds)
    if not has_pixels:
        return f"DICOM without an image ({_sop_class(ds)})"
    return ""


def _ensure_transfer_syntax(ds: DicomDataset) -> None:
    """Files without a file meta header (pre-Part 10) do not name their encoding; pydicom read them
    with its guess, and the decoder needs that guess written down."""
    meta = ds.get("file_meta")
    if meta is not None and "TransferSyntaxUID" in meta:
        return
    implicit, little = ds.original_encoding
    if not little:
        raise ValueError("big endian DICOM without a file meta header")
    ds.ensure_file_meta()
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian


def decode_dicom(data: bytes, window: Window, frame: int | None = None, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """One frame (default: the middle one) as an RGB image, windowed as described above. pydicom's
    warnings about non-conforming values (common in archives) are silenced: a file either decodes
    or is skipped with its reason, and a million warnings would bury that report."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _decode(data, window, frame, max_pixels)


def _decode(data: bytes, window: Window, frame: int | None, max_pixels: int) -> Image.Image:
    try:
        ds = read_header(data, max_bytes=inflate_limit(max_pixels))
    except InvalidDicomError as e:
        if data[128:132] == b"DICM":
            raise DamagedDicom("damaged DICOM file (no data element could be read)") from None
        raise ValueError(f"not a readable DICOM file ({e})") from None
    reason = _no_image_reason(ds)
    if reason and _sop_class(ds) == NO_SOP_CLASS and not reason.startswith("DICOMDIR"):
        raise DamagedDicom("damaged DICOM file (no SOP class and no pixel data)")
    if reason:
        raise NotAnImage(reason)
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if rows * cols > max_pixels:
        raise TooLarge(f"{cols} x {rows} pixels exceeds the limit of {max_pixels}")
    n_frames = max(int(ds.get("NumberOfFrames", 1) or 1), 1)
    index = n_frames // 2 if frame is None else frame
    if not 0 <= index < n_frames:
        raise ValueError(f"no frame {index} (the file has {n_frames})")
    _ensure_transfer_syntax(ds)
    arr = pixel_array(ds, index=index if n_frames > 1 else None)
    return Image.fromarray(_display(arr, frame_view(ds, index), window))


DISPLAY_KEYWORDS = ("Modality", "RescaleType", "RescaleSlope", "RescaleIntercept", "ModalityLUTSequence",
                    "VOILUTSequence", "WindowCenter", "WindowWidth", "VOILUTFunction", "PhotometricInterpretation",
                    "PresentationLUTShape", "PixelRepresentation", "BitsStored", "BitsAllocated", "SamplesPerPixel",
                    "RedPaletteColorLookupTableDescriptor", "GreenPaletteColorLookupTableDescriptor",
                    "BluePaletteColorLookupTableDescriptor", "RedPaletteColorLookupTableData",
                    "GreenPaletteColorLookupTableData", "BluePaletteColorLookupTableData",
                    "SegmentedRedPaletteColorLookupTableData", "SegmentedGreenPaletteColorLookupTableData",
                    "SegmentedBluePaletteColorLookupTableData")
FRAME_GROUPS = ("PixelValueTransformationSequence", "FrameVOILUTSequence")


def frame_view(ds: DicomDataset, index: int) -> DicomDataset:
    """The display attributes of one frame. Enhanced multi-frame objects (Enhanced CT/MR, many DX)
    keep rescale and window in functional groups, shared by all frames or per frame, not at the top
    level: they are laid over the top-level values (shared first, then the frame's own), so a lung
    window meets Hounsfield units there too. Only display attributes are copied (no pixel data)."""
    shared = ds.get("SharedFunctionalGroupsSequence")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if not shared and not per_frame:
        return ds
    view = DicomDataset()
    for keyword in DISPLAY_KEYWORDS:
        if keyword in ds:
            view[keyword] = ds[keyword]
    groups = [shared[0] if shared else None, per_frame[index] if per_frame and index < len(per_frame) else None]
    for group in groups:
        for name in FRAME_GROUPS:
            if group is not None and group.get(name):
                for element in group[name][0]:
                    view[element.tag] = element
    return view


def _display(arr: np.ndarray, ds: DicomDataset, window: Window) -> np.ndarray:
    """Decoded pixels -> H x W x 3 uint8."""
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(arr, ds)
        return to_uint8(rgb.astype(np.float64) / _palette_top(ds))
    if arr.ndim == 3:  # RGB (YBR already converted by pydicom)
        stored = int(ds.get("BitsStored", 8) or 8)
        return to_uint8(arr.astype(np.float64) / (2**stored - 1)) if stored > 8 else arr.astype(np.uint8)
    unit = grayscale_unit(arr, ds, window)
    # MONOCHROME1 (white is low) and the INVERSE presentation shape both mean: show inverted; an
    # IOD that pairs them (DX for presentation) states the same inversion twice, not two inversions
    if photometric == "MONOCHROME1" or str(ds.get("PresentationLUTShape", "")).upper() == "INVERSE":
        unit = 1.0 - unit
    return np.repeat(to_uint8(unit)[..., None], 3, axis=2)


def _palette_top(ds: DicomDataset) -> float:
    """The largest value the palette's entries are scaled to: 2^bits - 1 of its descriptor, except that
    some writers declare 16-bit entries and store 8-bit values; judged on the whole palette, not on the
    entries one image happens to use (a dark image would otherwise be brightened)."""
    entries, first, bits = (int(v) for v in ds.RedPaletteColorLookupTableDescriptor)
    if bits <= 8:
        return 255.0
    every = np.arange(first, first + (entries or 65536), dtype=np.uint16 if first + (entries or 65536) <= 65536 else np.uint32)
    return 255.0 if apply_color_lut(every, ds).max() <= 255 else float(2**bits - 1)


def grayscale_unit(arr: np.ndarray, ds: DicomDataset, window: Window) -> np.ndarray:
    """Stored grayscale values -> [0, 1] after the Modality LUT and the VOI step (before any
    MONOCHROME1 inversion). A preset window applies to CT (Hounsfield units) only; numbers given
    by hand apply to every file; otherwise the file's own VOI is used."""
    values = apply_modality_lut(arr, ds).astype(np.float64, copy=False)
    in_hu = str(ds.get("Modality", "")).upper() == "CT" or str(ds.get("RescaleType", "")).upper() == "HU"
    if not window.is_auto and (window.preset == "custom" or in_hu):
        return linear(values, window.center, window.width)
    voi_luts = ds.get("VOILUTSequence")
    if voi_luts:
        return voi_lut_unit(values, voi_luts[0])
    centers, widths = ds.get("WindowCenter"), ds.get("WindowWidth")
    if centers is not None and widths is not None:
        center = float(centers[0] if _multi(centers) else centers)
        width = float(widths[0] if _multi(widths) else widths)
        if width > 0:
            return linear(values, center, width, str(ds.get("VOILUTFunction", "LINEAR")))
    return linear(values, *percentile_window(values))


def voi_lut_unit(values: np.ndarray, item) -> np.ndarray:
    """A VOI LUT table lookup (PS3.3 C.11.2.1.1): descriptor (entries, 0 meaning 65536; first value
    mapped; bits per entry); values below the first map to the first entry, above the last to the
    last; whole values index the table (the modality output rounded, as a viewer does)."""
    entries, first, bits = (int(v) for v in item.LUTDescriptor)
    entries = entries or 65536
    data = item.LUTData
    if isinstance(data, (bytes, bytearray)):  # OW: 16-bit words, or 8-bit entries packed two to a word
        table = np.frombuffer(data, np.uint8 if bits <= 8 and len(data) == entries else np.dtype("<u2"))
    else:
        table = np.asarray(data if _multi(data) else [data], dtype=np.float64)
    table = table[:entries].astype(np.float64)
    index = np.clip(np.rint(values).astype(np.int64) - first, 0, len(table) - 1)
    return np.clip(table[index] / (2**bits - 1), 0.0, 1.0)


def _multi(value) -> bool:
    return not isinstance(value, (str, bytes)) and hasattr(value, "__len__")
