"""Files built to hurt a reader: a caption longer than the csv module's field limit, compressed images
that inflate to gigabytes, a DICOM preamble followed by noise. Each is read, or skipped with a
one-line reason that names what is wrong, without the process growing by what the file claims."""
from __future__ import annotations

import csv
import gzip
import io
import json
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import CTImageStorage, DeflatedExplicitVRLittleEndian, generate_uid

from medembed.cache.reader import load_split
from medembed.extract.datasets import load_dataset
from medembed.extract.datasets.base import DatasetError
from medembed.extract.datasets.csv_reader import LongFieldReader
from medembed.extract.datasets.mimic_cxr import read_split_file
from medembed.extract.extraction import ExtractConfig, extract
from medembed.extract.imaging import DEFAULT_DECODE, CorruptStream, DecompressionBomb, decode_image, open_image
from medembed.extract.imaging.dicom import DamagedDicom
from medembed.extract.worker import describe_error
from medembed.model.thumbnails import load_image_thumbnail

GiB = 1 << 30
LONG_CAPTION = "a long caption " * 70_000  # 1,050,000 characters, 8 times csv's default field limit


def _png(path: Path, colour: tuple[int, int, int]) -> None:
    Image.new("RGB", (32, 32), colour).save(path)


def _extract(data: Path, out: Path):
    return extract(ExtractConfig(data=str(data), backbone="tiny-clip", out=str(out), batch_size=4, workers=0,
                                 progress=False)).splits


# ----------------------------------------------------------------------------- captions beyond csv's limit


@pytest.mark.parametrize("suffix", [".csv", ".tsv"])
def test_a_caption_longer_than_the_csv_field_limit_is_read_whole(tmp_path, suffix):
    _png(tmp_path / "a.png", (200, 30, 30))
    _png(tmp_path / "b.png", (30, 30, 200))
    sep = "," if suffix == ".csv" else "\t"
    lines = [f"image{sep}caption", f"a.png{sep}a red square", f"b.png{sep}{LONG_CAPTION}"]
    (tmp_path / f"captions{suffix}").write_text("\n".join(lines) + "\n")
    limit = csv.field_size_limit()
    ds = load_dataset(tmp_path)
    assert {r.image_id: r.captions for r in ds.records} == {"a.png": ("a red square",), "b.png": (LONG_CAPTION.strip(),)}
    assert csv.field_size_limit() == limit  # the process-wide limit is as it was
    if suffix == ".csv":  # and it extracts: the caption is tokenised (and truncated there), not refused
        (split,) = _extract(tmp_path, tmp_path / "out")
        assert split.images == 2 and split.captions == 2 and not split.skipped
        cached = load_split(next((tmp_path / "out").rglob("train.h5")))
        assert sorted(cached.captions, key=len) == ["a red square", LONG_CAPTION.strip()]


def test_a_long_first_line_in_a_second_table_does_not_stop_layout_detection(tmp_path):
    """Detection reads the first line of every table in the folder for its columns."""
    _png(tmp_path / "a.png", (200, 30, 30))
    (tmp_path / "captions.csv").write_text("image,caption\na.png,a red square\n")
    (tmp_path / "notes.csv").write_text("x" * 200_000 + ",note\n")
    assert [r.captions for r in load_dataset(tmp_path).records] == [("a red square",)]


def test_the_field_limit_is_raised_only_while_a_row_is_parsed():
    text = "id,caption\n1," + "y" * 300_000 + "\n2,short\n"
    limit = csv.field_size_limit()
    reader = LongFieldReader(io.StringIO(text, newline=""), len(text))
    assert next(reader) == ["id", "caption"] and csv.field_size_limit() == limit
    assert next(reader) == ["1", "y" * 300_000] and csv.field_size_limit() == limit
    with pytest.raises(csv.Error, match="field larger than field limit"):  # a plain reader meanwhile: limited as ever
        list(csv.reader(io.StringIO(text, newline="")))
    assert next(reader) == ["2", "short"] and reader.line_num == 3


def test_a_long_field_in_the_mimic_split_file_is_read(tmp_path):
    path = tmp_path / "mimic-cxr-2.0.0-split.csv"
    note = "n" * 200_000
    path.write_text(f"dicom_id,study_id,subject_id,split,note\na1,50414267,10000032,train,{note}\n")
    assert read_split_file(path) == ({"a1": "train"}, {"50414267": "train"})


# ------------------------------------------------------------------------------------ decompression bombs


def _zeros_deflate(n_bytes: int, prefix: bytes = b"") -> bytes:
    """A raw deflate stream of `prefix` then `n_bytes` zeros, made in well under a second: 64 MiB of
    zeros is compressed once and the (self-contained, full-flushed) block repeated."""
    def flushed(data: bytes) -> bytes:
        c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        return c.compress(data) + c.flush(zlib.Z_FULL_FLUSH)

    block = 64 << 20
    assert n_bytes % block == 0
    return (flushed(prefix) if prefix else b"") + flushed(bytes(block)) * (n_bytes // block) + b"\x03\x00"


def _gzip_bomb(n_bytes: int, prefix: bytes = b"") -> bytes:
    """gzip framing around `_zeros_deflate`; its CRC is left 0 (nothing reads that far: computing it
    would cost seconds)."""
    size = (len(prefix) + n_bytes) % (1 << 32)
    return b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff" + _zeros_deflate(n_bytes, prefix) + bytes(4) + size.to_bytes(4, "little")


def _deflated_dicom(body: bytes) -> bytes:
    """A Part 10 file whose meta header says Deflated Explicit VR Little Endian, then `body`."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_file_meta_info(buf, meta)
    return bytes(128) + b"DICM" + buf.getvalue() + body


def _nifti_header(shape: tuple[int, ...]) -> bytes:
    header = nib.Nifti1Image(np.zeros((1, 1, 1), np.uint8), np.eye(4)).header
    header.set_data_shape(shape)
    return header.binaryblock + bytes(4)  # and the extension flag: the voxels start at 352


PEAK_RUNNER = """
import json, sys
from medembed.common.memory import peak_rss_bytes
from medembed.extract.imaging import decode_image, open_image
from medembed.extract.worker import describe_error
reasons, start = {}, peak_rss_bytes()
for name, max_pixels in json.loads(sys.argv[1]):
    try:
        open_image(name, max_pixels=max_pixels)
        reasons[name] = "decoded"
    except Exception as e:
        reasons[name] = describe_error(e)
print(json.dumps({"reasons": reasons, "growth": peak_rss_bytes() - start}))
"""


def test_bombs_are_refused_while_inflating_without_growing_by_their_size(tmp_path):
    """Each file inflates to 3 GiB. Before the cap held while inflating, the gzip without a header
    peaked at twice the 2 GiB limit before being refused."""
    files = {
        "zeros.nii.gz": _gzip_bomb(3 * GiB),  # no NIfTI header: refused after the first chunk
        "claims.nii.gz": _gzip_bomb(3 * GiB, _nifti_header((2048, 2048, 768))),  # a header claiming 3 GiB
        "deflated.dcm": _deflated_dicom(_zeros_deflate(3 * GiB)),  # a data set that inflates to 3 GiB
    }
    for name, data in files.items():
        assert len(data) < 4 << 20, name
        (tmp_path / name).write_bytes(data)
    # the deflated data set is inflated (and dropped) up to the limit: a small one keeps the test fast
    jobs = [[str(tmp_path / "zeros.nii.gz"), 64_000_000], [str(tmp_path / "claims.nii.gz"), 64_000_000],
            [str(tmp_path / "deflated.dcm"), 1_000_000]]
    done = subprocess.run([sys.executable, "-c", PEAK_RUNNER, json.dumps(jobs)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    reasons = {Path(k).name: v for k, v in result["reasons"].items()}
    assert reasons["zeros.nii.gz"] == ("unreadable image (ValueError: not a readable NIfTI file "
                                       "(no NIfTI header at its start))")
    assert reasons["claims.nii.gz"] == ("decompression bomb (the volume's header claims 3221225824 bytes, more than "
                                        "the decoder's limit of 2048000000)")
    assert reasons["deflated.dcm"] == ("decompression bomb (the deflated data set inflates to more than 32000000 "
                                       "bytes, the decoder's limit)")
    assert result["growth"] < 200 << 20, f"peak grew by {result['growth'] / GiB:.2f} GiB"


def _gzip_volume(n_bytes: int, header: bytes) -> bytes:
    """`_gzip_bomb` with its CRC computed: a whole, valid .nii.gz of `header` and `n_bytes` zero voxels."""
    crc, block = zlib.crc32(header), bytes(64 << 20)
    for _ in range(n_bytes // len(block)):
        crc = zlib.crc32(block, crc)
    return _gzip_bomb(n_bytes, header)[:-8] + crc.to_bytes(4, "little") + (len(header) + n_bytes).to_bytes(4, "little")


def test_a_volume_is_held_once_while_it_is_decoded(tmp_path):
    """A 256 MiB volume, gzipped and as a deflated zip member: decoding holds its voxels once. Before
    the inflated buffer was returned as it is (and read without io.BytesIO's copy), both held them twice."""
    volume = 256 << 20
    header = _nifti_header((512, 512, 1024))
    (tmp_path / "v.nii.gz").write_bytes(_gzip_volume(volume, header))
    with zipfile.ZipFile(tmp_path / "volumes.zip", "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        with z.open("v.nii", "w", force_zip64=True) as f:
            f.write(header)
            for _ in range(volume >> 26):
                f.write(bytes(64 << 20))
    for location in (tmp_path / "v.nii.gz", f"{tmp_path / 'volumes.zip'}::v.nii"):
        done = subprocess.run([sys.executable, "-c", PEAK_RUNNER, json.dumps([[str(location), 64_000_000]])],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        result = json.loads(done.stdout.strip().splitlines()[-1])
        assert list(result["reasons"].values()) == ["decoded"], result
        assert result["growth"] < 1.5 * volume, f"{location}: peak grew by {result['growth'] / volume:.2f} volumes"


def test_damaged_compressed_images_are_skipped_with_a_reason_not_a_traceback(tmp_path):
    """Each raised an error no image guard catches (EOFError, zlib.error, BadZipFile, NotImplementedError,
    Pillow's bomb error): a search or eval example grid holding one stopped with a traceback."""
    volume = gzip.compress(nib.Nifti1Image(np.arange(384, dtype=np.int16).reshape(8, 8, 6), np.eye(4)).to_bytes())
    (tmp_path / "cut.nii.gz").write_bytes(volume[: len(volume) // 2])

    def chunk(kind: bytes, body: bytes) -> bytes:
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")

    ihdr = (20_000).to_bytes(4, "big") * 2 + bytes([8, 2, 0, 0, 0])  # claims 400 million pixels
    (tmp_path / "huge.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (9, 99, 199)).save(buf, format="PNG")
    archive = tmp_path / "images.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("stored.png", buf.getvalue(), compress_type=zipfile.ZIP_STORED)
        z.writestr("deflated.png", buf.getvalue() * 4, compress_type=zipfile.ZIP_DEFLATED)
        z.writestr("method.png", buf.getvalue(), compress_type=zipfile.ZIP_STORED)
        z.writestr("fine.png", buf.getvalue(), compress_type=zipfile.ZIP_DEFLATED)
        infos = {i.filename: i for i in z.infolist()}
    raw = bytearray(archive.read_bytes())
    raw[infos["stored.png"].header_offset + 30 + len("stored.png") + 40] ^= 0xFF  # a pixel byte: a bad CRC
    raw[infos["deflated.png"].header_offset + 30 + len("deflated.png") + 5] ^= 0xFF  # the deflate stream
    method = infos["method.png"].header_offset
    raw[method + 8:method + 10] = (99).to_bytes(2, "little")  # a compression method zipfile does not know
    central = raw.find(b"PK\x01\x02" + raw[method + 4:method + 6])
    while raw[central + 46:central + 46 + len("method.png")] != b"method.png":
        central = raw.find(b"PK\x01\x02", central + 4)
    raw[central + 10:central + 12] = (99).to_bytes(2, "little")
    archive.write_bytes(bytes(raw))
    (tmp_path / "broken.zip").write_bytes(b"PK\x03\x04 and nothing of a zip after it")

    reasons = {
        "cut.nii.gz": "the volume is truncated (its compressed stream ends early)",
        "huge.png": "decompression bomb (Image size (400000000 pixels) exceeds limit of 178956970 pixels, could be "
                    "decompression bomb DOS attack.)",
        "images.zip::stored.png": "the zip member is damaged (Bad CRC-32 for file 'stored.png')",
        "images.zip::deflated.png": "the zip member is damaged (",  # then zlib's words, which its version chooses
        "images.zip::method.png": "the zip member is damaged (That compression method is not supported)",
        "broken.zip::a.png": f"{tmp_path / 'broken.zip'}: not a readable zip archive (File is not a zip file)",
    }
    for name, reason in reasons.items():
        location = f"{tmp_path}/{name}"
        assert load_image_thumbnail(location, DEFAULT_DECODE) is None, name  # a placeholder tile, not a traceback
        with pytest.raises((ValueError, OSError)) as e:
            open_image(location)
        got = describe_error(e.value)
        assert got.startswith(reason) if reason.endswith("(") else got == reason, (name, got)
    with pytest.raises(CorruptStream):
        open_image(f"{tmp_path}/cut.nii.gz")
    assert load_image_thumbnail(f"{archive}::fine.png", DEFAULT_DECODE).size == (16, 16)


def test_zip_members_are_inflated_within_the_limit(tmp_path):
    archive = tmp_path / "images.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("big.png", bytes(40_000_000), compress_type=zipfile.ZIP_DEFLATED)  # 40 MB in 39 KB
        z.writestr("packed.png", bytes(1000), compress_type=zipfile.ZIP_BZIP2)
        buf = io.BytesIO()
        Image.new("RGB", (16, 16), (9, 99, 199)).save(buf, format="PNG")
        z.writestr("fine.png", buf.getvalue(), compress_type=zipfile.ZIP_DEFLATED)
    small = 1_000_000  # pixels: a limit of 32 MB inflated
    with pytest.raises(DecompressionBomb, match="inflates to 40000000 bytes, more than the decoder's limit of 32000000"):
        open_image(f"{archive}::big.png", max_pixels=small)
    with pytest.raises(DecompressionBomb, match="bzip2, whose inflation cannot be bounded"):
        open_image(f"{archive}::packed.png", max_pixels=small)
    assert np.asarray(open_image(f"{archive}::fine.png", max_pixels=small))[0, 0].tolist() == [9, 99, 199]


def test_a_gzipped_split_file_is_inflated_within_the_limit(tmp_path):
    path = tmp_path / "mimic-cxr-2.0.0-split.csv.gz"
    rows = "dicom_id,study_id,subject_id,split\n" + "a1,50414267,10000032,train\n" * 100_000  # 2.7 MB
    path.write_bytes(gzip.compress(rows.encode()))
    assert read_split_file(path) == ({"a1": "train"}, {"50414267": "train"})
    with pytest.raises(DatasetError, match=r"split\.csv\.gz: the gzipped split file inflates to more than 1000000 bytes"):
        read_split_file(path, max_bytes=1_000_000)


# ------------------------------------------------------------------------------------------- damaged DICOM


def test_noise_after_a_dicom_preamble_is_damage_and_non_images_keep_their_reason(tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    with pytest.raises(DamagedDicom) as e:
        decode_image(bytes(128) + b"DICM" + noise, "scan.dcm")
    assert describe_error(e.value) == "damaged DICOM file (no SOP class and no pixel data)"
    with pytest.raises(DamagedDicom, match="no data element could be read"):
        decode_image(bytes(128) + b"DICM", "scan.dcm")
    report = Path(get_testdata_file("test-SR.dcm", download=False)).read_bytes()
    with pytest.raises(Exception) as e:
        decode_image(report, "report.dcm")
    assert describe_error(e.value) == "DICOM without an image (Comprehensive SR Storage)"


def test_hostile_images_are_skipped_and_counted_by_reason(tmp_path):
    _png(tmp_path / "a.png", (200, 30, 30))
    (tmp_path / "noise.dcm").write_bytes(bytes(128) + b"DICM" + np.random.default_rng(1).bytes(4000))
    (tmp_path / "report.dcm").write_bytes(Path(get_testdata_file("test-SR.dcm", download=False)).read_bytes())
    (tmp_path / "claims.nii.gz").write_bytes(gzip.compress(_nifti_header((4096, 4096, 256)) + bytes(1 << 20)))
    rows = ["image,caption", "a.png,a red square", "noise.dcm,a scan", "report.dcm,a report", "claims.nii.gz,a volume"]
    (tmp_path / "captions.csv").write_text("\n".join(rows) + "\n")
    (split,) = _extract(tmp_path, tmp_path / "out")
    assert split.images == 1
    reasons = sorted(why for _, _, why in split.skipped)
    assert reasons == ["DICOM without an image (Comprehensive SR Storage)",
                       "damaged DICOM file (no SOP class and no pixel data)",
                       "decompression bomb (the volume's header claims 4294967648 bytes, more than the decoder's "
                       "limit of 2048000000)"]
