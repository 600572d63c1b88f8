"""The corpus layouts (ROCOv2 parquet, MIMIC-CXR, IU X-ray / OpenI, WebDataset shards) and reading
images out of containers, on tiny folders built per test."""
from __future__ import annotations

import gzip
import hashlib
import io
import multiprocessing
import os
import tarfile
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from medembed.extract.containers import CONTAINER_SUFFIXES, is_container, member_size, read_member
from medembed.extract.datasets import (
    DatasetError,
    detect_layout,
    load_dataset,
    mimic_cxr,
    openi,
    rocov2_parquet,
    webdataset_shards,
)
from medembed.extract.path_key import load_path_key
from medembed.extract.records import Dataset, Record
from tests.conftest import make_imageclef2023

NEW_LAYOUTS = (rocov2_parquet, mimic_cxr, openi, webdataset_shards)


def image_bytes(colour: tuple[int, int, int], fmt: str = "PNG", size: tuple[int, int] = (6, 4)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format=fmt)
    return buf.getvalue()


def write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        path.write_text(data, encoding="utf-8")
    else:
        path.write_bytes(data)
    return path


def by_id(ds: Dataset) -> dict[str, Record]:
    return {r.image_id: r for r in ds.records}


def counts(ds: Dataset) -> dict[str, int]:
    return {s: len(ds.split(s)) for s in ds.splits}


def member_bytes(location: str) -> bytes:
    return read_member(*location.split("::", 1))


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def bump_mtime(path: Path) -> None:
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))


# ---------------------------------------------------------------------------------------------- containers


def _read_in_child(container: str, member: str) -> bytes:
    return read_member(container, member)


def test_tar_members_read_in_place_survive_rewrite_and_fork(tmp_path: Path) -> None:
    first, second = image_bytes((1, 2, 3)), image_bytes((200, 100, 50), size=(9, 9))
    shard = write_tar(tmp_path / "s.tar", [("k/a.png", first), ("b.txt", b"caption")])
    assert is_container(str(shard)) and is_container("X.PARQUET") and not is_container("a.png")
    assert CONTAINER_SUFFIXES == (".zip", ".tar", ".parquet")
    assert read_member(str(shard), "k/a.png") == first
    assert member_size(str(shard), "k/a.png") == len(first)
    assert member_size(str(shard), "nope.png") == -1
    assert member_size(str(tmp_path / "absent.tar"), "k/a.png") == -1
    with pytest.raises(FileNotFoundError, match=r"s\.tar: no member 'nope\.png'"):
        read_member(str(shard), "nope.png")
    with multiprocessing.get_context("fork").Pool(1) as pool:
        assert pool.apply(_read_in_child, (str(shard), "k/a.png")) == first
    write_tar(shard, [("k/a.png", second)])
    bump_mtime(shard)
    assert read_member(str(shard), "k/a.png") == second
    assert member_size(str(shard), "b.txt") == -1


def test_zip_member_and_unknown_container(tmp_path: Path) -> None:
    data = image_bytes((9, 9, 9), "JPEG")
    archive = tmp_path / "images.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("x/a.jpg", data)
    assert read_member(str(archive), "x/a.jpg") == data
    assert member_size(str(archive), "x/a.jpg") == len(data)
    assert member_size(str(archive), "x/b.jpg") == -1
    with pytest.raises(FileNotFoundError, match="no member 'x/b.jpg'"):
        read_member(str(archive), "x/b.jpg")
    with pytest.raises(ValueError, match="not a container"):
        read_member(str(tmp_path / "a.rar"), "a.jpg")


def test_parquet_rows_by_index_struct_and_plain_binary(tmp_path: Path) -> None:
    images = [image_bytes((i * 20, 0, 0)) for i in range(5)]
    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"image": pa.array(images, pa.binary()), "n": list(range(5))}), plain, row_group_size=2)
    assert [read_member(str(plain), str(i)) for i in (4, 0, 3, 1, 2)] == [images[i] for i in (4, 0, 3, 1, 2)]
    assert member_size(str(plain), "3") == len(images[3])
    for bad in ("5", "-1", "x"):
        assert member_size(str(plain), bad) == -1
        with pytest.raises(FileNotFoundError, match="no member"):
            read_member(str(plain), bad)
    struct = tmp_path / "struct.parquet"
    column = pa.array([{"bytes": images[0], "path": "a.png"}, {"bytes": None, "path": "elsewhere.png"}],
                      pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    pq.write_table(pa.table({"picture": column}), struct)
    assert read_member(str(struct), "0") == images[0]
    assert member_size(str(struct), "1") == -1  # only a path: the bytes are not in the file
    with pytest.raises(FileNotFoundError):
        read_member(str(struct), "1")
    pq.write_table(pa.table({"image": pa.array(images[::-1], pa.binary())}), plain)  # rewritten in place
    bump_mtime(plain)
    assert read_member(str(plain), "0") == images[4]


# ------------------------------------------------------------------------------------------ rocov2 parquet

IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def write_rocov2_shard(path: Path, rows: list[tuple[str, bytes, str, object]], row_group_size: int = 2) -> Path:
    """rows of (image_id, image bytes, caption, cui) in the form `datasets` pushes to the hub."""
    path.parent.mkdir(parents=True, exist_ok=True)
    cuis = [r[3] for r in rows]
    cui_type = pa.string() if any(isinstance(c, str) for c in cuis) else pa.list_(pa.string())
    table = pa.table({
        "image": pa.array([{"bytes": r[1], "path": f"{r[0]}.jpg"} for r in rows], IMAGE_STRUCT),
        "image_id": [r[0] for r in rows],
        "caption": [r[2] for r in rows],
        "cui": pa.array(cuis, cui_type),
    })
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def make_rocov2(root: Path) -> dict[str, bytes]:
    images = {f"ROCOv2_2023_{s}_{i:06d}": image_bytes((i * 40, 80, 0 if s == "train" else 200), "JPEG")
              for s, n in (("train", 3), ("valid", 1), ("test", 2)) for i in range(1, n + 1)}
    write_rocov2_shard(root / "data" / "train-00000-of-00001.parquet", [
        ("ROCOv2_2023_train_000001", images["ROCOv2_2023_train_000001"], "Head CT.", ["C0040405", "C0018670"]),
        ("ROCOv2_2023_train_000002", images["ROCOv2_2023_train_000002"], " Chest X-ray. ", []),
        ("ROCOv2_2023_train_000003", images["ROCOv2_2023_train_000003"], "Knee MRI.", ["C0024485"]),
    ])
    write_rocov2_shard(root / "data" / "validation-00000-of-00001.parquet", [
        ("ROCOv2_2023_valid_000001", images["ROCOv2_2023_valid_000001"], "Renal US.", "C0041618; C0022646"),
    ])
    write_rocov2_shard(root / "data" / "test-00000-of-00001.parquet", [
        ("ROCOv2_2023_test_000001", images["ROCOv2_2023_test_000001"], "", ["C0040405"]),
        ("ROCOv2_2023_test_000002", images["ROCOv2_2023_test_000002"], "Abdominal CT.", None),
    ])
    write(root / "cui_mapping.csv", "CUI,Canonical name\nC0040405,X-Ray Computed Tomography\nC0024485,MRI\n")
    return images


def test_rocov2_parquet_reads_text_columns_and_rows(tmp_path: Path) -> None:
    root = tmp_path / "rocov2"
    images = make_rocov2(root)
    assert detect_layout(root) == "rocov2-parquet"
    ds = load_dataset(root)
    assert (ds.layout, ds.name) == ("rocov2-parquet", "rocov2")
    assert counts(ds) == {"train": 3, "valid": 1, "test": 1}
    train = root / "data" / "train-00000-of-00001.parquet"
    records = by_id(ds)
    assert records["ROCOv2_2023_train_000001"] == Record(
        "ROCOv2_2023_train_000001", f"{train}::0", ("Head CT.",), ("C0040405", "C0018670"), "train")
    assert records["ROCOv2_2023_train_000002"] == Record(
        "ROCOv2_2023_train_000002", f"{train}::1", ("Chest X-ray.",), (), "train")
    assert records["ROCOv2_2023_valid_000001"].concepts == ("C0041618", "C0022646")
    assert records["ROCOv2_2023_valid_000001"].split == "valid"
    assert records["ROCOv2_2023_test_000002"].image.endswith("test-00000-of-00001.parquet::1")
    assert ds.concept_names == {"C0040405": "X-Ray Computed Tomography", "C0024485": "MRI"}
    assert len(ds.warnings) == 1 and "ROCOv2_2023_test_000001 (row 0)" in ds.warnings[0]
    for r in ds.records:  # across row groups (2 rows each) and shards
        assert member_bytes(r.image) == images[r.image_id]
        assert member_size(*r.image.split("::")) == len(images[r.image_id])


def test_rocov2_parquet_never_reads_the_image_column_when_reading_the_dataset(tmp_path: Path, monkeypatch) -> None:
    root = tmp_path / "rocov2"
    make_rocov2(root)
    calls: list[tuple[str, object]] = []

    def spy(name, original):
        def wrapper(self, *args, **kwargs):
            calls.append((name, kwargs.get("columns", args[0] if name == "read" and args else None)))
            return original(self, *args, **kwargs)
        return wrapper

    for method in ("read", "read_row_group", "read_row_groups", "iter_batches"):
        monkeypatch.setattr(pq.ParquetFile, method, spy(method, getattr(pq.ParquetFile, method)))
    monkeypatch.setattr(pq, "read_table", lambda *a, **k: pytest.fail("read_table reads every column"))
    ds = load_dataset(root)
    assert len(ds.records) == 5
    # the text columns, a batch of rows at a time (a shard of millions of rows is never read whole)
    assert calls and all(name == "iter_batches" and cols is not None and "image" not in cols for name, cols in calls)


def test_rocov2_parquet_shards_in_the_folder_itself_and_column_errors(tmp_path: Path) -> None:
    flat = tmp_path / "flat"
    data = image_bytes((1, 1, 1))
    write_rocov2_shard(flat / "train-00000-of-00002.parquet", [("A", data, "a", ["C1"])])
    write_rocov2_shard(flat / "train-00001-of-00002.parquet", [("B", data, "b", ["C2"])])
    assert detect_layout(flat) == "rocov2-parquet"
    assert [(r.image_id, r.split) for r in load_dataset(flat).records] == [("A", "train"), ("B", "train")]

    write_rocov2_shard(flat / "test-00000-of-00001.parquet", [("A", data, "again", [])])
    with pytest.raises(DatasetError, match=r"test-00000-of-00001\.parquet: row 0: duplicate image_id 'A' "
                                           r"\(first in train-00000-of-00002\.parquet row 0\)"):
        load_dataset(flat)

    no_caption = tmp_path / "no_caption"
    no_caption.mkdir()
    bad = no_caption / "train-00000-of-00001.parquet"
    pq.write_table(pa.table({"image": pa.array([{"bytes": data, "path": "a"}], IMAGE_STRUCT), "image_id": ["A"]}), bad)
    assert detect_layout(no_caption) == "rocov2-parquet"
    with pytest.raises(DatasetError, match=rf"{bad}: missing required column\(s\) caption"):
        load_dataset(no_caption)

    no_image = tmp_path / "no_image"
    no_image.mkdir()
    pq.write_table(pa.table({"image_id": ["A"], "caption": ["a"]}), no_image / "validation.parquet")
    with pytest.raises(DatasetError, match=r"validation\.parquet: missing required column\(s\) image"):
        load_dataset(no_image)


# ------------------------------------------------------------------------------------------------ MIMIC-CXR

REPORT_FULL = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___F with cough

 COMPARISON:  None.

 FINDINGS:

 Heart size: normal.  No focal consolidation,
 pleural effusion or pneumothorax.

 IMPRESSION:

 No acute cardiopulmonary process.
"""
REPORT_IMPRESSION_ONLY = """                                 FINAL REPORT
 HISTORY:  Dyspnea.

 impression:  Mild cardiomegaly.
"""
REPORT_OTHER = "FINAL REPORT\nFINDINGS: Right lower lobe opacity.\nIMPRESSION: Pneumonia.\n"


def make_mimic(root: Path, split_file: bool = True) -> dict[str, bytes]:
    """2 subjects x 2 studies; reports in the image tree and in a sibling mimic-cxr-reports tree; one
    study without a report; one .dcm."""
    images = {
        "files/p10/p10000032/s50414267/a1.jpg": image_bytes((10, 10, 10), "JPEG"),
        "files/p10/p10000032/s50414267/a2.jpg": image_bytes((20, 20, 20), "JPEG"),
        "files/p10/p10000032/s53189527/b1.jpg": image_bytes((30, 30, 30), "JPEG"),
        "files/p10/p10000032/s53189527/b2.dcm": b"\0" * 128 + b"DICM fake",
        "files/p11/p11000011/s51111111/c1.jpg": image_bytes((40, 40, 40), "JPEG"),
        "files/p11/p11000011/s51111111/e1.jpg": image_bytes((50, 50, 50), "JPEG"),
        "files/p11/p11000011/s52222222/d1.jpg": image_bytes((60, 60, 60), "JPEG"),
    }
    for rel, data in images.items():
        write(root / rel, data)
    write(root / "files/p10/p10000032/s50414267.txt", REPORT_FULL)
    write(root / "files/p10/p10000032/s53189527.txt", REPORT_IMPRESSION_ONLY)
    write(root / "mimic-cxr-reports/files/p11/p11000011/s51111111.txt", REPORT_OTHER)
    if split_file:
        rows = ["dicom_id,study_id,subject_id,split", "a1,50414267,10000032,train", "a2,50414267,10000032,train",
                "b1,53189527,10000032,validate", "c1,51111111,11000011,test", "d1,52222222,11000011,train"]
        write(root / "mimic-cxr-2.0.0-split.csv.gz", gzip.compress(("\n".join(rows) + "\n").encode()))
    return images


def mimic_id(rel: str) -> str:
    """MIMIC-CXR names a record by a keyed hash of its path (the test session's key), not a plain one."""
    keyed = load_path_key().image_id(rel)
    assert keyed != hashlib.sha256(rel.encode()).hexdigest()[:16]
    return keyed


def test_mimic_cxr_reports_sections_and_official_split(tmp_path: Path) -> None:
    root = tmp_path / "mimic"
    images = make_mimic(root)
    assert detect_layout(root) == "mimic-cxr"
    ds = load_dataset(root)
    assert ds.layout == "mimic-cxr"
    # b2 (not in the split file) takes its study's split, e1 too; d1's study has no report
    assert counts(ds) == {"train": 2, "valid": 2, "test": 2}
    records = by_id(ds)
    a1 = records[mimic_id("files/p10/p10000032/s50414267/a1.jpg")]
    assert a1 == Record(a1.image_id, str(root / "files/p10/p10000032/s50414267/a1.jpg"),
                        ("Heart size: normal. No focal consolidation, pleural effusion or pneumothorax. "
                         "No acute cardiopulmonary process.",), (), "train")
    assert records[mimic_id("files/p10/p10000032/s50414267/a2.jpg")].captions == a1.captions
    b2 = records[mimic_id("files/p10/p10000032/s53189527/b2.dcm")]
    assert (b2.captions, b2.split) == (("Mild cardiomegaly.",), "valid")
    e1 = records[mimic_id("files/p11/p11000011/s51111111/e1.jpg")]
    assert (e1.captions, e1.split) == (("Right lower lobe opacity. Pneumonia.",), "test")
    for r in ds.records:
        assert len(r.image_id) == 16
        assert not any(n in r.image_id for n in ("10000032", "11000011", "50414267", "53189527", "51111111"))
        assert Path(r.image).read_bytes() == images[Path(r.image).relative_to(root).as_posix()]
    assert len(ds.warnings) == 1 and "skipped 1 image(s) of 1 studies without a report" in ds.warnings[0]
    assert "s52222222" in ds.warnings[0]


def test_mimic_cxr_section_choice_changes_the_caption(tmp_path: Path) -> None:
    root = tmp_path / "mimic"
    make_mimic(root)
    a1 = mimic_id("files/p10/p10000032/s50414267/a1.jpg")
    b1 = mimic_id("files/p10/p10000032/s53189527/b1.jpg")

    def captions(sections: str) -> tuple[str, str, list[str]]:
        ds = mimic_cxr.read_folder(root, "m", report_sections=sections)
        return by_id(ds)[a1].captions[0], by_id(ds)[b1].captions[0], ds.warnings

    caption, other, warnings = captions("findings")
    assert (caption, other) == ("Heart size: normal. No focal consolidation, pleural effusion or pneumothorax.",
                                "Mild cardiomegaly.")
    assert any("1 studies had no FINDINGS section" in w and "s53189527" in w for w in warnings)
    caption, _, warnings = captions("impression")
    assert caption == "No acute cardiopulmonary process."
    assert not any("had no" in w for w in warnings)
    caption, other, _ = captions("all")
    assert caption.startswith("EXAMINATION: CHEST (PA AND LAT) INDICATION: ___F with cough COMPARISON: None. FINDINGS:")
    assert caption.endswith("IMPRESSION: No acute cardiopulmonary process.") and "FINAL REPORT" not in caption
    assert other == "HISTORY: Dyspnea. impression: Mild cardiomegaly."
    with pytest.raises(ValueError, match="report_sections must be one of"):
        mimic_cxr.read_folder(root, "m", report_sections="history")


def test_mimic_cxr_without_split_file_splits_by_subject(tmp_path: Path) -> None:
    """Every study of one patient lands in one split (as the official split has it), so no patient is
    both trained on and tested on."""
    root = tmp_path / "mimic"
    make_mimic(root, split_file=False)
    assert detect_layout(root) == "mimic-cxr"
    ds = load_dataset(root)
    assert len(ds.records) == 6
    subject_of = {r.image_id: r.image.split(os.sep)[-3] for r in ds.records}
    assert set(subject_of.values()) == {"p10000032", "p11000011"}
    for r in ds.records:
        assert r.split == mimic_cxr.hash_split(subject_of[r.image_id])
    assert len({r.split for r in ds.records if subject_of[r.image_id] == "p10000032"}) == 1
    assert any("no mimic-cxr-2.0.0-split.csv[.gz]: 6 image(s) split 80/10/10" in w and "hash of the subject" in w
               for w in ds.warnings)
    assert ds.private_paths  # subject and study numbers: the cache keeps only hashed ids
    assert load_dataset(root).records == ds.records  # deterministic


def test_mimic_cxr_bad_split_file(tmp_path: Path) -> None:
    root = tmp_path / "mimic"
    make_mimic(root, split_file=False)
    write(root / "mimic-cxr-2.0.0-split.csv", "dicom_id,study_id,subject_id,split\na1,50414267,10000032,holdout\n")
    with pytest.raises(DatasetError, match=r"mimic-cxr-2\.0\.0-split\.csv:2: unknown split 'holdout'"):
        load_dataset(root)
    write(root / "mimic-cxr-2.0.0-split.csv", "dicom,study_id,split\n")
    with pytest.raises(DatasetError, match=r"split\.csv:1: missing required column"):
        load_dataset(root)


# -------------------------------------------------------------------------------------------------- OpenI


def openi_xml(images: list[str], sections: dict[str, str], major: tuple[str, ...] = (),
              minor: tuple[str, ...] = ()) -> str:
    texts = "".join(f'<AbstractText Label="{k}">{v}</AbstractText>' for k, v in sections.items())
    mesh = "".join(f"<major>{t}</major>" for t in major) + "".join(f"<minor>{t}</minor>" for t in minor)
    parents = "".join(f'<parentImage id="{i}"><figureId>F1</figureId><caption>Xray Chest PA and Lateral</caption>'
                      f'<panel type="single"><url>/hadoop/storage/radiology/extract/{i}.jpg</url></panel></parentImage>'
                      for i in images)
    return (f'<?xml version="1.0" encoding="utf-8"?><eCitation><meta type="rr"/><uId id="CXR1"/>'
            f"<MedlineCitation><Article><Abstract>{texts}</Abstract></Article></MedlineCitation>"
            f"<MeSH>{mesh}</MeSH>{parents}</eCitation>")


def make_openi(root: Path) -> dict[str, bytes]:
    write(root / "ecgen-radiology" / "1.xml", openi_xml(
        ["CXR1_1_IM-0001-3001", "CXR1_1_IM-0001-4001"],
        {"COMPARISON": "None.", "INDICATION": "Positive TB test",
         "FINDINGS": "The cardiac silhouette is\n  enlarged.", "IMPRESSION": "Cardiomegaly."},
        major=("Cardiomegaly/mild",), minor=("Opacity/lung/base/left",)))
    write(root / "ecgen-radiology" / "2.xml", openi_xml(
        ["CXR2_1_IM-0652-1001"], {"FINDINGS": "", "IMPRESSION": "No acute disease."}, major=("normal",)))
    write(root / "ecgen-radiology" / "3.xml", openi_xml([], {"IMPRESSION": "Views missing."}))
    images = {i: image_bytes((n * 50, 9, 9)) for n, i in enumerate(
        ["CXR1_1_IM-0001-3001", "CXR1_1_IM-0001-4001", "CXR2_1_IM-0652-1001"])}
    for image_id, data in images.items():
        write(root / "NLMCXR_png" / f"{image_id}.png", data)
    return images


def test_openi_reports_views_mesh_and_split_by_report(tmp_path: Path) -> None:
    root = tmp_path / "iu"
    images = make_openi(root)
    assert detect_layout(root) == "openi"
    ds = load_dataset(root)
    assert ds.layout == "openi" and len(ds.records) == 3
    split1, split2 = mimic_cxr.hash_split("ecgen-radiology/1.xml"), mimic_cxr.hash_split("ecgen-radiology/2.xml")
    expected = {split1: 0, split2: 0}
    expected[split1] += 2
    expected[split2] += 1
    assert counts(ds) == {s: n for s, n in expected.items() if n}
    records = by_id(ds)
    assert records["CXR1_1_IM-0001-3001"] == Record(
        "CXR1_1_IM-0001-3001", str(root / "NLMCXR_png" / "CXR1_1_IM-0001-3001.png"),
        ("The cardiac silhouette is enlarged. Cardiomegaly.",), ("Cardiomegaly/mild", "Opacity/lung/base/left"), split1)
    assert records["CXR1_1_IM-0001-4001"].captions == records["CXR1_1_IM-0001-3001"].captions
    assert records["CXR2_1_IM-0652-1001"].captions == ("No acute disease.",)
    assert ds.concept_names == {"Cardiomegaly/mild": "Cardiomegaly/mild", "normal": "normal",
                                "Opacity/lung/base/left": "Opacity/lung/base/left"}
    for r in ds.records:
        assert Path(r.image).read_bytes() == images[r.image_id]
    assert any("no official split" in w for w in ds.warnings)
    assert any("skipped 1 report(s) with no images or no text: ecgen-radiology/3.xml" in w for w in ds.warnings)

    findings = by_id(openi.read_folder(root, "iu", report_sections="findings"))
    assert findings["CXR1_1_IM-0001-3001"].captions == ("The cardiac silhouette is enlarged.",)
    assert findings["CXR2_1_IM-0652-1001"].captions == ("No acute disease.",)  # fell back to the impression
    everything = by_id(openi.read_folder(root, "iu", report_sections="all"))
    assert everything["CXR1_1_IM-0001-3001"].captions[0].startswith("COMPARISON: None. INDICATION: Positive TB test")


def test_openi_malformed_xml_names_the_file(tmp_path: Path) -> None:
    root = tmp_path / "iu"
    make_openi(root)
    write(root / "ecgen-radiology" / "4.xml", '<eCitation><parentImage id="X"></eCitation>')
    with pytest.raises(DatasetError, match=r"4\.xml:1: malformed XML"):
        load_dataset(root)


# ---------------------------------------------------------------------------------------------- WebDataset


def make_shards(root: Path) -> dict[str, bytes]:
    images = {"a0": image_bytes((1, 0, 0), "JPEG"), "a1": image_bytes((2, 0, 0)), "a2": image_bytes((3, 0, 0), "JPEG"),
              "b0": image_bytes((4, 0, 0), "JPEG"), "b1": image_bytes((5, 0, 0))}
    write_tar(root / "train-000000.tar", [
        ("000000000.jpg", images["a0"]), ("000000000.json", b'{"labels": ["C1", "C2"], "split": "test"}'),
        ("000000000.txt", b"Chest X-ray, PA view.\n"),
        ("000000001.png", images["a1"]), ("000000001.txt", b"Head CT."),
        ("000000002.jpg", images["a2"]),  # no caption: dropped
    ])
    write_tar(root / "000001.tar", [
        ("000010000.jpg", images["b0"]), ("000010000.json", b'{"caption": "Knee MRI.", "split": "test"}'),
        ("000010001.png", images["b1"]), ("000010001.txt", b"Renal US."),
        ("000010001.json", b'{"split": "validation", "concepts": "C3; C4"}'),
    ])
    return images


def test_webdataset_shards_in_tar_order(tmp_path: Path) -> None:
    root = tmp_path / "wds"
    images = make_shards(root)
    assert detect_layout(root) == "webdataset"
    ds = load_dataset(root)
    assert ds.layout == "webdataset"
    # the shard name's split beats the json's; shards come train first, then by name
    assert [r.image_id for r in ds.records] == ["000001/000010000", "000001/000010001",
                                                "train-000000/000000000", "train-000000/000000001"]
    assert counts(ds) == {"train": 2, "valid": 1, "test": 1}
    records = by_id(ds)
    assert records["train-000000/000000000"] == Record(
        "train-000000/000000000", f"{root / 'train-000000.tar'}::000000000.jpg", ("Chest X-ray, PA view.",),
        ("C1", "C2"), "train")
    assert records["000001/000010000"].captions == ("Knee MRI.",) and records["000001/000010000"].split == "test"
    assert records["000001/000010001"].concepts == ("C3", "C4") and records["000001/000010001"].split == "valid"
    for r in ds.records:
        assert member_bytes(r.image) == images[{"000000000": "a0", "000000001": "a1", "000010000": "b0",
                                                "000010001": "b1"}[r.image_id.split("/")[1]]]
    assert ds.warnings == [f"{root}: dropped 1 sample(s) with an image but no caption: train-000000/000000002"]


def test_webdataset_split_subfolders_and_bad_json(tmp_path: Path) -> None:
    root = tmp_path / "wds"
    data = image_bytes((7, 7, 7))
    write_tar(root / "train" / "00000.tar", [("k/0.png", data), ("k/0.txt", b"one")])
    write_tar(root / "valid" / "00000.tar", [("k/0.png", data), ("k/0.txt", b"two")])
    assert detect_layout(root) == "webdataset"
    ds = load_dataset(root)
    assert [(r.image_id, r.split, r.image.split("::")[1]) for r in ds.records] == [
        ("train/00000/k/0", "train", "k/0.png"), ("valid/00000/k/0", "valid", "k/0.png")]
    write_tar(root / "test" / "00000.tar", [("0.png", data), ("0.json", b"{not json")])
    with pytest.raises(DatasetError, match=r"test/00000\.tar::0\.json:1: invalid JSON"):
        load_dataset(root)


# ------------------------------------------------------------------------------------- existing detection


def test_existing_layouts_still_detect_as_before(tmp_path: Path) -> None:
    clef23 = make_imageclef2023(tmp_path / "clef23", {"train": 2, "valid": 1})
    clef22 = tmp_path / "clef22"
    write(clef22 / "caption_prediction_train.csv", "A1\tChest CT\n")
    write(clef22 / "images" / "A1.jpg", image_bytes((1, 1, 1), "JPEG"))
    generic = tmp_path / "generic"
    write(generic / "captions.csv", "image,caption\nimages/a.jpg,Chest CT\n")
    write(generic / "images" / "a.jpg", image_bytes((1, 1, 1), "JPEG"))
    write(generic / "train" / "notes.txt", "not a shard")
    for folder, layout in ((clef23, "imageclef2023"), (clef22, "imageclef2022"), (generic, "generic")):
        assert detect_layout(folder) == layout
        names = [p.name for p in folder.iterdir() if p.is_file()]
        assert not [m.NAME for m in NEW_LAYOUTS if m.detect(folder, names)]
    with pytest.raises(DatasetError, match=r"no dataset layout recognised.*\(rocov2-parquet\).*\(mimic-cxr\)"):
        detect_layout(write(tmp_path / "nothing" / "notes.txt", "no data here").parent)
