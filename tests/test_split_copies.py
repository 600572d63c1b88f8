"""Train/test leakage by bytes: one image file copied under a new id into another split is found
before anything is encoded and named in a warning; one byte apart is another image."""
from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
from click.testing import CliRunner

from medembed.cache.reader import load_split
from medembed.cache.schema import split_file
from medembed.cli import main
from medembed.extract import extraction
from medembed.extract.duplicates import HEAD_BYTES, CrossSplitCopy, cross_split_copies
from medembed.extract.imaging import locations
from medembed.extract.records import Dataset, Record
from tests.conftest import make_imageclef2023


def _add_to_test(data: Path, image_id: str, content: bytes) -> None:
    (data / "images" / f"{image_id}.jpg").write_bytes(content)
    with open(data / "test_captions.csv", "a") as f:
        f.write(f'{image_id},"A green square, filed again."\n')
    with open(data / "test_concepts.csv", "a") as f:
        f.write(f"{image_id},C0000002\n")


def _near_copy(content: bytes) -> bytes:
    """The same JPEG but for one byte: the JFIF header's horizontal density (still a valid image)."""
    b = bytearray(content)
    assert b[6:11] == b"JFIF\0" and b[15] == 1
    b[15] = 2
    return bytes(b)


def _extract(data: Path, out: Path, *extra: str):
    return CliRunner().invoke(main, ["extract", "--data", str(data), "--backbone", "tiny-clip", "--out", str(out),
                                     "--workers", "0", "--batch-size", "8", *extra])


def test_a_copy_under_another_id_in_another_split_is_named_in_a_warning(tmp_path):
    data = make_imageclef2023(tmp_path / "d", {"train": 6, "valid": 2, "test": 3})
    original = (data / "images" / "IMG_00001.jpg").read_bytes()
    _add_to_test(data, "ROCO_99998", _near_copy(original))  # one byte apart: another image, not named
    first = _extract(data, tmp_path / "f")
    assert first.exit_code == 0, first.output
    assert "warning:" not in first.output and "ROCO_99998" not in first.output

    _add_to_test(data, "ROCO_99999", original)  # the train image, byte for byte, as a test image
    res = _extract(data, tmp_path / "f2")
    assert res.exit_code == 0 and "Traceback" not in res.output, res.output
    warnings = [x for x in res.output.splitlines() if "warning:" in x]
    assert len(warnings) == 1, res.output
    assert (f"{data}: 1 image is a copy of another split's image under another id (ROCO_99999 in test is a "
            "byte-identical copy of IMG_00001 in train): a run's numbers on the later split count it as unseen"
            ) in warnings[0]
    assert "ROCO_99998" not in warnings[0]
    test = load_split(tmp_path / "f2" / "d" / "tiny-clip" / split_file("test"))
    assert test.image_ids[-2:] == ["ROCO_99998", "ROCO_99999"]


def test_a_shared_id_is_still_refused_and_the_copy_still_named_when_allowed(tmp_path):
    data = make_imageclef2023(tmp_path / "d", {"train": 6, "valid": 2, "test": 3})
    _add_to_test(data, "ROCO_99999", (data / "images" / "IMG_00001.jpg").read_bytes())
    with open(data / "test_captions.csv", "a") as f:  # IMG_00002 of train listed in test as well
        f.write('IMG_00002,"A blue square, listed twice."\n')
    res = _extract(data, tmp_path / "f")
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    assert "IMG_00002 in train+test" in res.output and "--allow-split-overlap" in res.output
    assert not (tmp_path / "f" / "d" / "tiny-clip" / split_file("train")).exists()
    res = _extract(data, tmp_path / "f", "--allow-split-overlap")
    assert res.exit_code == 0, res.output
    warnings = [x for x in res.output.splitlines() if "warning:" in x]
    assert any("kept because of --allow-split-overlap" in w for w in warnings), res.output
    assert any("ROCO_99999 in test is a byte-identical copy of IMG_00001 in train" in w for w in warnings), res.output


def test_copies_are_found_by_the_bytes_decoded_in_files_members_and_frames(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, HEAD_BYTES + 4096, dtype=np.uint8).tobytes()  # longer than the hashed head
    files = {
        "a.bin": a, "b.bin": a,  # b: a copy of a
        "tail.bin": a[:-1] + bytes([a[-1] ^ 1]),  # one byte apart after the head: not a copy
        "head.bin": bytes([a[0] ^ 1]) + a[1:],  # one byte apart at the start: not a copy
        "scan.bin": rng.bytes(5000), "e.bin": rng.bytes(300), "f.bin": rng.bytes(300), "empty0.bin": b"",
        "empty1.bin": b"",
    }
    files["scan2.bin"] = files["scan.bin"]
    files["e2.bin"] = files["e.bin"]
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("m/a.bin", a)  # the member's bytes count, not the archive's
    (tmp_path / "archive.zip").write_bytes(buf.getvalue())

    def rec(image_id: str, name: str, split: str) -> Record:
        return Record(image_id, str(tmp_path / name), ("c",), (), split)

    records = [
        rec("A", "a.bin", "train"), rec("B", "b.bin", "test"), rec("Z", "archive.zip::m/a.bin", "test"),
        rec("TAIL", "tail.bin", "test"), rec("HEAD", "head.bin", "valid"),
        # frames of a copied multi-frame file: frame 2 is frame 2 of the original, not frame 1
        rec("S1", "scan.bin::frame=1", "train"), rec("S2", "scan.bin::frame=2", "train"),
        rec("T2", "scan2.bin::frame=2", "test"),
        rec("E", "e.bin", "train"), rec("E2", "e2.bin", "train"),  # a copy inside one split: no leak
        rec("F", "f.bin", "train"), rec("G", "f.bin", "valid"),  # one file in two splits: the overlap check's
        rec("Y0", "empty0.bin", "train"), rec("Y1", "empty1.bin", "test"),  # zero bytes: skipped, not compared
        rec("M", "missing.bin", "train"), rec("M2", "missing.bin", "test"),
    ]
    found = cross_split_copies(Dataset("d", str(tmp_path), "generic", records).records)
    assert found == [CrossSplitCopy(("A", "train"), ("B", "test"), more=1),
                     CrossSplitCopy(("S2", "train"), ("T2", "test"))]
    assert found[0].describe() == "B in test is a byte-identical copy of A in train (and 1 more copy)"


def test_containers_linked_in_from_outside_the_data_folder_are_never_opened(tmp_path, monkeypatch):
    """Sizing a member opens its zip index (or reads a parquet row group): under the data folder's rule,
    an archive that is a link out of the folder is refused before that, as its bytes are."""
    data, outside = tmp_path / "data", tmp_path / "elsewhere"
    data.mkdir()
    outside.mkdir()
    for folder in (data, outside):
        with zipfile.ZipFile(folder / "images.zip", "w") as z:
            z.writestr("a.bin", b"the same bytes")
            z.writestr("b.bin", b"the same bytes")
    (data / "linked.zip").symlink_to(outside / "images.zip")
    opened = []

    def spy(container: str, member: str) -> int:
        opened.append(Path(container).name)
        return real(container, member)

    real = locations.member_size
    monkeypatch.setattr(locations, "member_size", spy)
    records = [Record("A", f"{data}/images.zip::a.bin", ("c",), (), "train"),
               Record("B", f"{data}/images.zip::b.bin", ("c",), (), "test"),
               Record("C", f"{data}/linked.zip::a.bin", ("c",), (), "train"),
               Record("D", f"{data}/linked.zip::b.bin", ("c",), (), "test")]
    dataset = Dataset("d", str(data), "generic", records)
    assert cross_split_copies(dataset.records, dataset.access) == [CrossSplitCopy(("A", "train"), ("B", "test"))]
    assert opened == ["images.zip", "images.zip"]


def test_the_bytes_are_compared_only_when_a_split_will_be_written(tmp_path, monkeypatch):
    """Every --data command starts by extracting; with every split already cached, reading the images
    again (all of them, for a parquet dataset) found nothing new."""
    data = make_imageclef2023(tmp_path / "d", {"train": 4, "test": 2})
    compared = []
    real = extraction.cross_split_copies

    def counting(*args, **kwargs):
        compared.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(extraction, "cross_split_copies", counting)

    def run(splits: list[str]) -> list[str]:
        return [s.status for s in extraction.extract(extraction.ExtractConfig(
            data=str(data), backbone="tiny-clip", out=str(tmp_path / "f"), workers=0, progress=False,
            splits=splits)).splits]

    assert run(["train"]) == ["written"] and len(compared) == 1
    assert run(["train"]) == ["up to date"] and len(compared) == 1
    assert run(["train", "test"]) == ["up to date", "written"] and len(compared) == 2
