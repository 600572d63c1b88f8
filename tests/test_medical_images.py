"""DICOM, NIfTI and 16-bit images decoded as a viewer shows them, checked against files no one on
this project wrote: the sample DICOM files pydicom ships inside its own package (read from the
installed package, never copied into the repository) and volumes built here with nibabel."""
from __future__ import annotations

import gzip
import io
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_modality_lut, apply_windowing, pixel_array

from medembed.extract.datasets import detect_layout, load_dataset
from medembed.extract.datasets.frames import chosen_frames, expand_frames, parse_frames
from medembed.extract.extraction import ExtractConfig, ExtractError, extract
from medembed.extract.imaging import DecodeOptions, DecompressionBomb, decode_image, open_image, parse_window
from medembed.extract.imaging.windows import PRESETS
from medembed.extract.path_key import load_path_key


def sample(name: str) -> Path:
    path = get_testdata_file(name, download=False)
    assert path is not None, f"{name} is not among the sample files of the installed pydicom"
    return Path(path)


def decoded(name: str, window: str = "auto") -> np.ndarray:
    return np.asarray(open_image(str(sample(name)), DecodeOptions.from_text(window)))


def rounded(unit: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(unit * 255), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------ pixel values


def test_mr_uses_the_files_window_like_pydicom():
    """MR_small: no rescale, window 600/1600 in the header. pydicom's own windowing (its output spans
    the stored 16-bit range) scaled to 8 bits must equal ours; so must the formula worked by hand."""
    ds = pydicom.dcmread(sample("MR_small.dcm"))
    assert (float(ds.WindowCenter), float(ds.WindowWidth)) == (600.0, 1600.0)
    raw = pixel_array(ds).astype(np.float64)
    ours = decoded("MR_small.dcm")
    assert ours.shape == (64, 64, 3) and (ours[..., 0] == ours[..., 1]).all()
    by_hand = rounded(np.clip((raw - 599.5) / 1599 + 0.5, 0, 1))
    assert np.array_equal(ours[..., 0], by_hand)
    theirs = apply_windowing(raw, ds)  # y in [-(2^15), 2^15 - 1] for signed 16-bit data
    lo, hi = -(2 ** (ds.BitsStored - 1)), 2 ** (ds.BitsStored - 1) - 1
    assert np.abs(ours[..., 0].astype(int) - rounded((theirs - lo) / (hi - lo)).astype(int)).max() <= 1


def test_ct_goes_through_the_modality_lut_then_the_chosen_window():
    """CT_small: rescale slope 1, intercept -1024 (stored 1024 is water, 0 HU); no window in the file."""
    ds = pydicom.dcmread(sample("CT_small.dcm"))
    hu = apply_modality_lut(pixel_array(ds), ds)
    assert float(ds.RescaleIntercept) == -1024 and "WindowCenter" not in ds
    for preset in ("lung", "soft-tissue", "bone"):
        c, w = PRESETS[preset]
        want = rounded(np.clip((hu - (c - 0.5)) / (w - 1) + 0.5, 0, 1))
        assert np.array_equal(decoded("CT_small.dcm", preset)[..., 0], want), preset
    # no window in the file: the 0.5..99.5th percentile of the Hounsfield values
    lo, hi = np.percentile(hu, (0.5, 99.5))
    c, w = (lo + hi) / 2, hi - lo
    want = rounded(np.clip((hu - (c - 0.5)) / (w - 1) + 0.5, 0, 1))
    assert np.array_equal(decoded("CT_small.dcm")[..., 0], want)
    assert not np.array_equal(decoded("CT_small.dcm", "lung"), decoded("CT_small.dcm", "bone"))
    # a preset is a Hounsfield window: an MR keeps its own; numbers given by hand apply to every file
    assert np.array_equal(decoded("MR_small.dcm", "lung"), decoded("MR_small.dcm"))
    raw = pixel_array(pydicom.dcmread(sample("MR_small.dcm"))).astype(float)
    assert np.array_equal(decoded("MR_small.dcm", "1000,500")[..., 0],
                          rounded(np.clip((raw - 999.5) / 499 + 0.5, 0, 1)))


def test_a_voi_lut_sequence_wins_over_the_window(tmp_path):
    """A VOI LUT in the file maps values through its table (PS3.3 C.11.2), before any window there."""
    from pydicom.dataset import Dataset as DicomDataset
    from pydicom.sequence import Sequence

    ds = pydicom.dcmread(sample("MR_small.dcm"))
    table = np.clip(np.arange(4096) // 10, 0, 255).astype(np.uint16)  # an 8-bit ramp over 0..2550
    lut = DicomDataset()
    lut.LUTDescriptor = [4096, 0, 8]
    lut.add_new(0x00283006, "US", table.tolist())  # LUT Data as unsigned shorts (8-bit entries)
    ds.VOILUTSequence = Sequence([lut])
    ds.save_as(tmp_path / "voilut.dcm")
    raw = pixel_array(ds).astype(int)
    want = rounded(table[np.clip(raw, 0, 4095)] / 255.0)
    assert np.array_equal(np.asarray(open_image(str(tmp_path / "voilut.dcm")))[..., 0], want)
    assert not np.array_equal(want, decoded("MR_small.dcm")[..., 0])  # not what the window gives


def test_monochrome1_is_inverted(tmp_path):
    ds = pydicom.dcmread(sample("MR_small.dcm"))
    ds.PhotometricInterpretation = "MONOCHROME1"
    path = tmp_path / "mono1.dcm"
    ds.save_as(path)
    inverted = np.asarray(open_image(str(path))).astype(int)
    assert np.abs(inverted - (255 - decoded("MR_small.dcm").astype(int))).max() <= 1


def test_rescale_and_window_in_functional_groups_are_applied_per_frame(tmp_path):
    """Enhanced multi-frame objects keep rescale and window in shared or per-frame functional groups."""
    from pydicom.dataset import Dataset as DicomDataset
    from pydicom.sequence import Sequence

    ds = pydicom.dcmread(sample("CT_small.dcm"))
    transform = DicomDataset()
    transform.RescaleSlope, transform.RescaleIntercept, transform.RescaleType = ds.RescaleSlope, ds.RescaleIntercept, "HU"
    shared = DicomDataset()
    shared.PixelValueTransformationSequence = Sequence([transform])
    voi = DicomDataset()
    voi.WindowCenter, voi.WindowWidth = 40, 400
    frame = DicomDataset()
    frame.FrameVOILUTSequence = Sequence([voi])
    del ds.RescaleSlope, ds.RescaleIntercept
    ds.Modality = "MR"  # so only the functional groups' RescaleType says Hounsfield units
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    ds.PerFrameFunctionalGroupsSequence = Sequence([frame])
    path = tmp_path / "enhanced.dcm"
    ds.save_as(path)
    hu = pixel_array(ds).astype(float) - 1024
    assert np.array_equal(np.asarray(open_image(str(path)))[..., 0],
                          rounded(np.clip((hu - 39.5) / 399 + 0.5, 0, 1)))  # the frame's own window
    assert np.array_equal(np.asarray(open_image(str(path), DecodeOptions.from_text("lung"))), decoded("CT_small.dcm", "lung"))


def test_presentation_lut_shape_inverse_inverts_monochrome2(tmp_path):
    ds = pydicom.dcmread(sample("MR_small.dcm"))
    ds.PresentationLUTShape = "INVERSE"
    ds.save_as(tmp_path / "inv.dcm")
    inverted = np.asarray(open_image(str(tmp_path / "inv.dcm"))).astype(int)
    assert np.abs(inverted - (255 - decoded("MR_small.dcm").astype(int))).max() <= 1


@pytest.mark.parametrize("name", ["MR_small_implicit.dcm", "MR_small_bigendian.dcm", "MR_small_expb.dcm",
                                  "MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm",
                                  "MR_small_padded.dcm"])
def test_every_lossless_transfer_syntax_gives_the_same_picture(name):
    """One MR slice stored as explicit/implicit little endian, big endian, RLE, JPEG-LS and JPEG 2000."""
    assert np.array_equal(decoded(name), decoded("MR_small.dcm"))


def test_colour_files_and_compressed_syntaxes():
    rle = decoded("SC_rgb_rle.dcm")
    assert np.array_equal(decoded("SC_rgb_jpeg_gdcm.dcm"), rle)  # JPEG lossless, process 14
    assert np.abs(decoded("SC_rgb_jpeg_dcmtk.dcm").astype(int) - rle).mean() < 3  # JPEG baseline (lossy)
    assert np.array_equal(decoded("SC_rgb_rle_16bit.dcm"), rle)  # 16-bit RGB scaled, not clipped
    # the same colour bars stored as YBR_FULL_422 (chroma subsampled): RGB again, within subsampling error
    ybr = pydicom.dcmread(sample("SC_ybr_full_422_uncompressed.dcm"))
    assert ybr.PhotometricInterpretation == "YBR_FULL_422"
    diff = np.abs(decoded("SC_ybr_full_422_uncompressed.dcm").astype(int) - rle)
    assert diff.mean() < 1 and diff.max() <= 8
    assert decoded("examples_ybr_color.dcm").shape == (240, 320, 3)  # YBR JPEG, 30 frames: the middle one
    palette = pydicom.dcmread(sample("examples_palette.dcm"))
    from pydicom.pixels import apply_color_lut
    want = apply_color_lut(pixel_array(palette), palette)
    assert np.abs(decoded("examples_palette.dcm").astype(int) - rounded(want / 65535.0).astype(int)).max() <= 1
    j2k = decoded("JPEG2000.dcm")  # JPEG 2000, signed 16-bit
    assert j2k.shape == (1024, 256, 3) and j2k.std() > 10
    ext = decoded("JPGExtended.dcm")  # 12-bit JPEG Extended
    assert ext.shape == (1024, 256, 3) and ext.std() > 10
    assert decoded("image_dfl.dcm").shape == (512, 512, 3)  # deflated explicit little endian
    assert decoded("JPEGLSNearLossless_16.dcm").shape == (50, 10, 3)


def test_multi_frame_files_give_the_middle_frame_or_records_per_frame(tmp_path):
    ds = pydicom.dcmread(sample("rtdose.dcm"))
    assert int(ds.NumberOfFrames) == 15
    middle = decoded("rtdose.dcm")
    assert np.array_equal(middle, np.asarray(open_image(f"{sample('rtdose.dcm')}::frame=7")))
    assert not np.array_equal(middle, np.asarray(open_image(f"{sample('rtdose.dcm')}::frame=0")))
    with pytest.raises(ValueError, match="no frame 15"):
        open_image(f"{sample('rtdose.dcm')}::frame=15")
    folder = tmp_path / "mf"
    folder.mkdir()
    shutil.copy(sample("rtdose.dcm"), folder / "dose.dcm")
    shutil.copy(sample("CT_small.dcm"), folder / "ct.dcm")
    ds_all = expand_frames(load_dataset(folder, readable_paths=True), parse_frames("all"))
    assert sorted(r.image_id for r in ds_all.records) == ["ct.dcm"] + sorted(f"dose.dcm::frame={k}" for k in range(15))
    # by default a DICOM folder's records are keyed hashes of their paths, one per frame all the same
    hashed = expand_frames(load_dataset(folder), parse_frames("all"))
    ids = [r.image_id for r in hashed.records]
    assert len(set(ids)) == 16 and not any("dose" in i or "ct.dcm" in i for i in ids)
    three = expand_frames(load_dataset(folder, readable_paths=True), parse_frames("3"))
    assert [r.image for r in three.records if "dose" in r.image_id] == [
        f"{folder / 'dose.dcm'}::frame={k}" for k in (2, 7, 12)]
    assert chosen_frames(4, "middle") == [2] and chosen_frames(2, 5) == [0, 1]
    with pytest.raises(ValueError, match="--frames 'some'"):
        parse_frames("some")


# ---------------------------------------------------------------------------------- NIfTI, 16-bit


def _volume(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """A 20 x 24 x 9 volume stored in LPS order (x grows to the patient's left, y posterior), with a
    bright marker in the anterior right corner of every axial slice and the slice number as level."""
    data = np.zeros((20, 24, 9), np.int16)
    for k in range(9):
        data[:, :, k] = 100 * k
    data[0, 0, :] = 3000  # voxel (0, 0): patient's right (x smallest in LPS) and anterior (y smallest)
    affine = np.diag([-1.0, -1.0, 2.0, 1.0])  # LPS+ voxel axes in RAS+ world
    path = tmp_path / "vol.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), path)
    return path, data


def test_nifti_middle_axial_slice_in_radiological_orientation(tmp_path):
    path, data = _volume(tmp_path)
    img = np.asarray(open_image(str(path), DecodeOptions.from_text("0,6000")))
    assert img.shape == (24, 20, 3)  # rows: anterior-posterior, columns: right-left
    assert img[0, 0, 0] == img.max() and img[-1, -1, 0] < img[0, 0, 0]  # anterior right is the top left
    level = np.asarray(open_image(f"{path}::frame=2", DecodeOptions.from_text("0,6000")))[5, 5, 0]
    assert level < img[5, 5, 0]  # slice 2 is darker than the middle one (4)
    folder = path.parent
    records = expand_frames(load_dataset(folder, readable_paths=True), parse_frames("3")).records
    assert [r.image_id for r in records] == [f"vol.nii.gz::frame={k}" for k in (1, 4, 7)]


@pytest.mark.parametrize("flips", [(1, 1), (-1, 1), (1, -1)])
def test_nifti_orientation_does_not_depend_on_the_stored_axis_order(tmp_path, flips):
    """The same anatomy stored RAS, LAS and RPS: the marker in the patient's anterior right is always
    the top-left pixel of the axial slice."""
    fx, fy = flips
    data = np.zeros((20, 24, 5), np.int16)
    x = 19 if fx > 0 else 0  # right is the largest world x; a voxel axis that grows toward it ends there
    y = 23 if fy > 0 else 0  # anterior likewise
    data[x, y, :] = 3000
    path = tmp_path / "vol.nii"
    nib.save(nib.Nifti1Image(data, np.diag([float(fx), float(fy), 1.0, 1.0])), path)
    img = np.asarray(open_image(str(path), DecodeOptions.from_text("0,6000")))[..., 0]
    assert img.shape == (24, 20) and img[0, 0] == img.max() > img[-1, -1]


def test_16_bit_png_and_tiff_are_windowed_not_clipped(tmp_path):
    ramp = np.tile(np.linspace(0, 4000, 64).astype(np.uint16), (16, 1))
    for suffix in ("png", "tif"):
        path = tmp_path / f"ramp.{suffix}"
        Image.fromarray(ramp).save(path)
        out = np.asarray(open_image(str(path)))[..., 0]
        assert len(np.unique(out)) > 50, suffix  # Pillow's own conversion would make nearly all of it 255
        assert out[0, 0] == 0 and out[0, -1] == 255 and (np.diff(out[0].astype(int)) >= 0).all()


@pytest.mark.parametrize("window", ["auto", "lung", "bone", "-600,1500", "40/80"])
def test_a_caches_recorded_window_reads_back_as_the_same_options(window):
    """The search page decodes pool and query images with the window the cache records."""
    options = DecodeOptions.from_text(window)
    assert DecodeOptions.from_provenance(options.describe()) == options
    assert DecodeOptions.from_provenance(f"{options.describe()}; frames=all") == options


def test_a_gzip_bomb_named_nii_gz_is_refused_before_it_is_inflated():
    zeros = gzip.compress(b"\0" * 50_000_000)  # 49 KB that would inflate to 50 MB, with no NIfTI header
    with pytest.raises(ValueError, match="not a readable NIfTI file"):
        decode_image(zeros, "upload.nii.gz", max_pixels=640 * 640)
    header = nib.Nifti1Image(np.zeros((1, 1, 1), np.uint8), np.eye(4)).header
    header.set_data_shape((1000, 1000, 50))  # a header claiming 50 MB of voxels, which follow
    bomb = gzip.compress(header.binaryblock + bytes(4) + bytes(50_000_000))
    with pytest.raises(DecompressionBomb, match="header claims 50000352 bytes, more than the decoder's limit of 13107200"):
        decode_image(bomb, "upload.nii.gz", max_pixels=640 * 640)


def test_bad_window_and_frames_are_refused_by_flag(tmp_path):
    with pytest.raises(ValueError, match="expected one of auto, lung"):
        parse_window("lungs")
    with pytest.raises(ExtractError, match="--window 'x,y'"):
        extract(ExtractConfig(data=str(tmp_path), window="x,y", backbone="tiny-clip"))


# --------------------------------------------------------------------- a DICOM folder end to end


NON_IMAGES = {"test-SR.dcm": "DICOM without an image (Comprehensive SR Storage)",
              "rtplan.dcm": "DICOM without an image (RT Plan Storage)",
              "waveform_ecg.dcm": "DICOM without an image (12-lead ECG Waveform Storage)",
              "MR_truncated.dcm": "truncated image",
              "JPEG-lossy.dcm": "undecodable pixel data"}


def dicom_folder(root: Path) -> Path:
    """The shapes a hospital export has: files with and without suffix, a DICOMDIR, reports and
    plans beside the images, one damaged file, one multi-frame file."""
    folder = root / "archive"
    (folder / "study1").mkdir(parents=True)
    for name in ("CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "MR_small_RLE.dcm", "rtdose.dcm", *NON_IMAGES):
        shutil.copy(sample(name), folder / "study1" / name)
    shutil.copy(sample("SC_rgb_jpeg_gdcm.dcm"), folder / "study1" / "IM0001")  # no suffix
    shutil.copy(get_testdata_file("DICOMDIR", download=False), folder / "DICOMDIR")
    return folder


def test_an_image_only_dicom_folder_extracts_with_every_non_image_skipped_and_counted(tmp_path):
    folder = dicom_folder(tmp_path)
    assert detect_layout(folder) == "images"
    summary = extract(ExtractConfig(data=str(folder), backbone="tiny-clip", out=str(tmp_path / "f"), workers=0,
                                    progress=False, batch_size=4))
    (split,) = summary.splits
    assert split.split == "all" and split.records == 12 and split.images == 6 and split.captions == 0
    key = load_path_key()  # an archive export's records are named by a keyed hash of their path
    name_of = {key.image_id(p.relative_to(folder).as_posix()): p.name for p in folder.rglob("*") if p.is_file()}
    reasons = {name_of[image_id]: reason for image_id, _, reason in split.skipped}
    assert set(reasons) == {*NON_IMAGES, "DICOMDIR"}
    for name, why in NON_IMAGES.items():
        assert reasons[name].startswith(why), (name, reasons[name])
    assert reasons["DICOMDIR"].startswith("DICOMDIR (an index of the media")
    # a chosen window is part of the cache's provenance: the same folder is not silently re-used
    with pytest.raises(Exception, match="image_decoding: cache has None, this run has window=lung"):
        extract(ExtractConfig(data=str(folder), backbone="tiny-clip", out=str(tmp_path / "f"), workers=0,
                              progress=False, batch_size=4, window="lung"))


def test_a_folder_named_by_uids_keeps_no_path(tmp_path):
    """Archive exports name folders and files by study and instance UIDs: the records are named by a
    hash, the cache holds no UID, and every image is still found again through the data folder."""
    folder = tmp_path / "export"
    uids = ["1.2.826.0.1.3680043.8.498.101", "1.2.826.0.1.3680043.8.498.101.7", "1.2.826.0.1.3680043.8.498.101.8"]
    (folder / uids[0]).mkdir(parents=True)
    shutil.copy(sample("CT_small.dcm"), folder / uids[0] / uids[1])  # bare UID names: no suffix of ours
    shutil.copy(sample("MR_small.dcm"), folder / uids[0] / f"{uids[2]}.dcm")
    dataset = load_dataset(folder)
    assert dataset.layout == "images" and dataset.private_paths and len(dataset.records) == 2
    assert not any("1.2.826" in r.image_id for r in dataset.records)
    summary = extract(ExtractConfig(data=str(folder), backbone="tiny-clip", out=str(tmp_path / "f"), workers=0,
                                    progress=False))
    from medembed.cache.reader import load_split
    cached = load_split(summary.splits[0].path)
    assert cached.n_images == 2 and all(loc.startswith("private:") for loc in cached.image_locations)
    assert not [p for p in (tmp_path / "f").rglob("*") if p.is_file() and b"3680043" in p.read_bytes()]
    assert np.array_equal(np.asarray(open_image(cached.image_path(cached.image_ids.index(dataset.records[0].image_id)))),
                          decoded("CT_small.dcm"))


def test_uploaded_dicom_bytes_decode_like_the_file():
    data = sample("CT_small.dcm").read_bytes()
    assert np.array_equal(np.asarray(decode_image(data, "upload")), decoded("CT_small.dcm"))
    buf = io.BytesIO()
    Image.fromarray(decoded("CT_small.dcm")).save(buf, format="PNG")
    assert np.array_equal(np.asarray(decode_image(buf.getvalue(), "x.png")), decoded("CT_small.dcm"))
