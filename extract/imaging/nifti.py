"""NIfTI volumes (.nii, .nii.gz) as axial slices, oriented as a radiologist reads them.

Whatever the voxel order on disk, the slice is cut across the axis the affine maps to
superior-inferior and shown with anterior at the top and the patient's right on the image's left
(radiological convention), so the same anatomy looks the same from every scanner's export.
Intensities are the header-scaled values (scl_slope / scl_inter: NIfTI's modality LUT), windowed
like DICOM: a chosen window, else a percentile window.
"""
from __future__ import annotations

import zlib

import nibabel as nib
import numpy as np
from nibabel.orientations import io_orientation
from PIL import Image

from medembed.extract.imaging.windows import Window, linear, percentile_window, to_uint8

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_nifti(name: str) -> bool:
    return name.lower().endswith(NIFTI_SUFFIXES)


# decompressed bytes allowed per pixel of the decoder's limit: a volume may hold many slices of that
# size, but a few kilobytes of gzip must not be able to claim all of memory
BYTES_PER_PIXEL_LIMIT = 32


def load_nifti(data: bytes, max_pixels: int = 64_000_000) -> nib.Nifti1Image:
    if data[:2] == b"\x1f\x8b":
        limit = max_pixels * BYTES_PER_PIXEL_LIMIT
        inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)  # gzip framing
        data = inflate.decompress(data, limit)
        if inflate.unconsumed_tail:
            raise ValueError(f"the volume decompresses to more than {limit} bytes (the decoder's limit)")
    for kind in (nib.Nifti1Image, nib.Nifti2Image):
        try:
            return kind.from_bytes(data)
        except Exception:  # noqa: BLE001 - the other NIfTI version, or not NIfTI at all
            continue
    raise ValueError("not a readable NIfTI file")


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


def decode_nifti(data: bytes, window: Window, index: int | None = None, max_pixels: int = 64_000_000) -> Image.Image:
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
