"""NIfTI volumes (.nii, .nii.gz) as axial slices, oriented as a radiologist reads them.

Whatever the voxel order on disk, the slice is cut across the axis the affine maps to
superior-inferior and shown with anterior at the top and the patient's right on the image's left
(radiological convention), so the same anatomy looks the same from every scanner's export.
Intensities are the header-scaled values (scl_slope / scl_inter: NIfTI's modality LUT), windowed
like DICOM: a chosen window, else a percentile window.
"""
from __future__ import annotations

import math
import struct

import nibabel as nib
import numpy as np
from nibabel.orientations import io_orientation
from PIL import Image

from medembed.extract.imaging.windows import Window, linear, percentile_window, to_uint8
from medembed.extract.limits import (
    GZIP_WBITS,
    MAX_PIXELS,
    BufferStream,
    DecompressionBomb,
    inflate_chunks,
    inflate_limit,
)

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_nifti(name: str) -> bool:
    return name.lower().endswith(NIFTI_SUFFIXES)


HEADER_KINDS = (nib.Nifti1Header, nib.Nifti2Header)  # header sizes 348 and 540 bytes


def load_nifti(data: bytes | bytearray, max_pixels: int = MAX_PIXELS) -> nib.Nifti1Image:
    if data[:2] == b"\x1f\x8b":
        data = inflate_volume(data, inflate_limit(max_pixels))
    for kind in (nib.Nifti1Image, nib.Nifti2Image):
        try:
            return kind.from_stream(BufferStream(data))  # not from_bytes: its BytesIO would copy a bytearray
        except Exception:  # noqa: BLE001 - the other NIfTI version, or not NIfTI at all
            continue
    raise ValueError("not a readable NIfTI file")


def inflate_volume(data: bytes | bytearray, limit: int) -> bytearray:
    """The header and voxels of a gzipped volume, and never more: the header (inflated first) says
    how many bytes the volume holds; a header claiming more than `limit` is refused before its voxels
    are inflated, whatever follows the voxels is not inflated at all, and a stream that does not start
    with a NIfTI header is refused after its first chunk. So a gzip bomb costs a chunk of memory,
    not its inflated size. The buffer inflated into is returned as it is: a copy into bytes would
    hold the volume twice. A damaged or cut stream is CorruptStream (a ValueError)."""
    chunks = inflate_chunks(data, GZIP_WBITS, limit, "the volume")
    kept = bytearray()
    for chunk in chunks:
        kept += chunk
        if len(kept) >= HEADER_KINDS[-1].template_dtype.itemsize:
            break
    need = volume_bytes(bytes(kept))
    if need > limit:
        raise DecompressionBomb(f"the volume's header claims {need} bytes, more than the decoder's limit of {limit}")
    while len(kept) < need and (chunk := next(chunks, None)) is not None:  # the stream's end not asked for
        kept += chunk
    del kept[need:]
    return kept


def volume_bytes(head: bytes) -> int:
    """Bytes from the start of a NIfTI-1 or NIfTI-2 file to the end of its voxels, from its header
    (`head`: at least the header's first bytes); ValueError when `head` starts with no NIfTI header.
    The header size field is checked before nibabel parses it, so random bytes are refused quietly."""
    for kind in HEADER_KINDS:
        size = kind.template_dtype.itemsize
        if len(head) < size or size not in (struct.unpack("<i", head[:4])[0], struct.unpack(">i", head[:4])[0]):
            continue
        try:
            header = kind(head[:size], check=False)
            voxels = math.prod(int(n) for n in header.get_data_shape()) * header.get_data_dtype().itemsize
            return max(int(header.get_data_offset()), size + 4) + voxels  # + 4: the extension flag
        except Exception:  # noqa: BLE001 - a damaged header: not this kind
            continue
    raise ValueError("not a readable NIfTI file (no NIfTI header at its start)")


def _axes(img) -> tuple[int, int, int, np.ndarray]:
    """(axial axis, left-right axis, anterior-posterior axis, orientation) of the first 3 voxel axes."""
    if len(img.shape) < 2:
        raise ValueError(f"a NIfTI image of shape {img.shape} has no slices")
    if len(img.shape) == 2:
        return -1, 0, 1, np.array([[0, -1], [1, -1]])  # shown as stored
    ornt = io_orientation(img.affine)
    by_world = {int(w): i for i, (w, _) in enumerate(ornt[:3]) if not np.isnan(w)}
    if len(by_world) < 3:  # a degenerate affine: keep the stored order
        return 2, 0, 1, np.array([[0, 1], [1, 1], [2, 1]])
    return by_world[2], by_world[0], by_world[1], ornt


def slice_count(img) -> int:
    axial, _, _, _ = _axes(img)
    return 1 if axial < 0 else int(img.shape[axial])


def nifti_slice_count(path: str) -> int:
    """Axial slices of a NIfTI file on disk, from its header alone."""
    return slice_count(nib.load(path))


def decode_nifti(data: bytes | bytearray, window: Window, index: int | None = None,
                 max_pixels: int = MAX_PIXELS) -> Image.Image:
    """One axial slice (default: the middle one) as an RGB image."""
    img = load_nifti(data, max_pixels)
    axial, lr, ap, ornt = _axes(img)
    n = 1 if axial < 0 else img.shape[axial]
    k = n // 2 if index is None else index
    if not 0 <= k < n:
        raise ValueError(f"no slice {k} (the volume has {n} axial slices)")
    if img.shape[lr] * img.shape[ap] > max_pixels:
        raise ValueError(f"{img.shape[lr]} x {img.shape[ap]} pixels exceeds the limit of {max_pixels}")
    select: list = [slice(None)] * len(img.shape)
    if axial >= 0:
        select[axial] = k
    for extra in range(3, len(img.shape)):  # 4-D (time, echoes): the first volume
        select[extra] = 0
    plane = np.asarray(img.dataobj[tuple(select)], dtype=np.float64)
    kept = [a for a in range(min(len(img.shape), 3)) if a != axial]
    plane = plane if kept.index(ap) == 0 else plane.T  # rows: anterior-posterior, columns: left-right
    if ornt[ap][1] > 0:  # voxel index grows toward anterior: reverse, so anterior is the top row
        plane = plane[::-1, :]
    if ornt[lr][1] > 0:  # grows toward the patient's right: reverse, so right is the left column
        plane = plane[:, ::-1]
    unit = linear(plane, window.center, window.width) if not window.is_auto else linear(plane, *percentile_window(plane))
    return Image.fromarray(np.repeat(to_uint8(unit)[..., None], 3, axis=2))
