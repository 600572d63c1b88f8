"""Layout detection and reading of every supported dataset layout, on tiny folders built per test."""
from __future__ import annotations

import io
import multiprocessing
import os
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from medembed.extract.datasets import DatasetError, detect_layout, load_dataset
from medembed.extract.imaging import image_size, open_image, read_image_bytes
from medembed.extract.records import Record
from tests.conftest import shared_dataset


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def image_bytes(colour: tuple[int, int, int], size: tuple[int, int] = (6, 4), fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format=fmt)
    return buf.getvalue()


def save_image(path: Path, colour: tuple[int, int, int] = (10, 20, 30), size: tuple[int, int] = (6, 4)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = "JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG"
    path.write_bytes(image_bytes(colour, size, fmt))
    return path


def by_id(records: list[Record]) -> dict[str, Record]:
    return {r.image_id: r for r in records}


# ------------------------------------------------------------------------------------------ imageclef2023


def make_clef2023(root: Path) -> Path:
    write(root / "train_captions.csv", 'ID,Caption\nA1,"Chest CT, axial."\nA2,Brain MRI\nA3,\nA4,Knee x-ray\n')
    write(root / "train_concepts.csv", "ID,CUIs\nA1,C0000001;C0000002\nA2,\nZZ,C0000009\n")
    write(root / "valid_captions.csv", "ID,Caption\nB1,Renal ultrasound\n")
    write(root / "cui_names.csv", "CUI,Canonical name\nC0000001,Chest\nC0000002,\"CT, axial\"\n")
    save_image(root / "images" / "A1.jpg")
    save_image(root / "images" / "A2.png")
    save_image(root / "images" / "A4.jpg")
    save_image(root / "images" / "B1.jpeg")
    return root


def test_imageclef2023_with_images_folder(tmp_path: Path) -> None:
    root = make_clef2023(tmp_path / "clef23")
    ds = load_dataset(root)
    assert (ds.name, ds.layout, ds.root, ds.synthetic) == ("clef23", "imageclef2023", str(root), False)
    assert ds.records == [
        Record("A1", str(root / "images/A1.jpg"), ("Chest CT, axial.",), ("C0000001", "C0000002"), "train"),
        Record("A2", str(root / "images/A2.png"), ("Brain MRI",), (), "train"),
        Record("A4", str(root / "images/A4.jpg"), ("Knee x-ray",), (), "train"),  # no concepts row
        Record("B1", str(root / "images/B1.jpeg"), ("Renal ultrasound",), (), "valid"),  # no concepts file
    ]
    assert ds.concept_names == {"C0000001": "Chest", "C0000002": "CT, axial"}
    assert ds.splits == ["train", "valid"]
    assert len(ds.warnings) == 1
    assert "train_captions.csv" in ds.warnings[0] and "dropped 1 empty caption" in ds.warnings[0]
    assert "line 4" in ds.warnings[0]
    assert "A3 (line 4)" in ds.warnings[0]  # the image the user will miss, not only the line
    assert "ZZ" not in by_id(ds.records)  # concepts of an id without a caption are ignored


def test_imageclef2023_flat_and_split_folders_cui_mapping_missing_image_kept(tmp_path: Path) -> None:
    root = tmp_path / "flat"
    write(root / "val_captions.csv", "ID,Caption\nV1,one\nV2,two\n")
    write(root / "val_concepts.csv", "ID,CUIs\nV1,C1; C2 ;C1\nV2,C3\n")
    write(root / "test_captions.csv", "ID,Caption\nT1,three\n")
    write(root / "cui_mapping.csv", "CUI,Canonical name\nC1,First\nC3,Third\n")
    save_image(root / "V1.png")
    save_image(root / "test" / "T1.jpg")
    ds = load_dataset(root, name="renamed")
    assert ds.name == "renamed"
    records = by_id(ds.records)
    assert records["V1"].image == str(root / "V1.png")
    assert records["V1"].concepts == ("C1", "C2")  # stripped, de-duplicated, order kept
    assert records["V2"].image == str(root / "V2.jpg") and not os.path.exists(records["V2"].image)
    assert records["T1"].image == str(root / "test" / "T1.jpg")
    assert [r.split for r in ds.records] == ["val", "val", "test"]
    assert ds.concept_names == {"C1": "First", "C3": "Third"}
    assert ds.warnings == []


# ------------------------------------------------------------------------------------------ imageclef2022


def test_imageclef2022_tab_separated_without_header_images_in_folders(tmp_path: Path) -> None:
    root = tmp_path / "clef22"
    write(root / "caption_prediction_train.csv", 'X1\tA "quoted" lesion, left lobe\nX2\tSecond caption\n')
    write(root / "concept_detection_train.csv", "X1\tC0000001;C0000002\nX2\n")
    write(root / "caption_prediction_valid.csv", "Y1\tValid caption\n")
    write(root / "concepts.txt", "C0000001\tLung\nC0000002\tNodule\n")
    save_image(root / "train" / "X1.jpg")
    save_image(root / "train" / "X2.jpg")
    save_image(root / "resized_valid" / "Y1.jpg")
    assert detect_layout(root) == "imageclef2022"
    ds = load_dataset(root)
    assert ds.records == [
        Record("X1", str(root / "train/X1.jpg"), ('A "quoted" lesion, left lobe',), ("C0000001", "C0000002"), "train"),
        Record("X2", str(root / "train/X2.jpg"), ("Second caption",), (), "train"),
        Record("Y1", str(root / "resized_valid/Y1.jpg"), ("Valid caption",), (), "valid"),
    ]
    assert ds.concept_names == {"C0000001": "Lung", "C0000002": "Nodule"}


def test_imageclef2022_with_header_images_in_zip_subfolder(tmp_path: Path) -> None:
    root = tmp_path / "clef22zip"
    write(root / "caption_prediction_train.csv", "ID\tcaption\nX1\tFirst\nX2\tSecond\n")
    write(root / "concept_detection_train.csv", "ID\tcuis\nX1\tC1\n")
    write(root / "caption_prediction_test.csv", "ID\tcaption\nZ1\tThird\n")
    write(root / "concepts.txt", "CUI\tname\nC1\tOne\n")
    red, blue = image_bytes((250, 0, 0), (7, 5)), image_bytes((0, 0, 250), (3, 9))
    with zipfile.ZipFile(root / "resized_train.zip", "w") as z:
        z.writestr("resized_train/", "")
        z.writestr("resized_train/X1.png", red)
        z.writestr("__MACOSX/resized_train/._X1.png", b"junk")
        z.writestr("resized_train/X2.png", blue)
    with zipfile.ZipFile(root / "test.zip", "w") as z:
        z.writestr("Z1.png", red)
    ds = load_dataset(root)
    records = by_id(ds.records)
    assert records["X1"].image == f"{root / 'resized_train.zip'}::resized_train/X1.png"
    assert records["X2"].image == f"{root / 'resized_train.zip'}::resized_train/X2.png"
    assert records["Z1"].image == f"{root / 'test.zip'}::Z1.png"
    assert records["X1"].concepts == ("C1",) and records["X2"].concepts == ()
    assert ds.concept_names == {"C1": "One"}
    img = open_image(records["X2"].image)
    assert img.size == (3, 9) and img.getpixel((1, 1)) == (0, 0, 250)
    assert image_size(records["X1"].image) == len(red)
    assert image_size(f"{root / 'resized_train.zip'}::resized_train/nope.png") == -1
    with pytest.raises(FileNotFoundError, match="nope.png"):
        read_image_bytes(f"{root / 'resized_train.zip'}::resized_train/nope.png")


def test_imageclef2022_header_detection_looks_at_the_id_column(tmp_path: Path) -> None:
    write(tmp_path / "h" / "caption_prediction_train.csv", "X1\tCaption\nX2\tcuis\n")  # captions, not a header
    assert [(r.image_id, r.captions) for r in load_dataset(tmp_path / "h").records] == [
        ("X1", ("Caption",)),
        ("X2", ("cuis",)),
    ]
    write(tmp_path / "h" / "caption_prediction_train.csv", "image_id\tCaption\nX1\tone\n")
    assert [r.image_id for r in load_dataset(tmp_path / "h").records] == ["X1"]


def _read_in_child(location: str) -> bytes:
    return read_image_bytes(location)


def test_zip_reads_survive_rewrite_and_fork(tmp_path: Path) -> None:
    archive = tmp_path / "images.zip"
    first, second = image_bytes((1, 2, 3)), image_bytes((200, 100, 50), (5, 5))
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("a.png", first)
    location = f"{archive}::a.png"
    assert read_image_bytes(location) == first  # now cached in this process
    with multiprocessing.get_context("fork").Pool(1) as pool:
        assert pool.apply(_read_in_child, (location,)) == first
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("a.png", second)
    st = os.stat(archive)
    os.utime(archive, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert read_image_bytes(location) == second


# ------------------------------------------------------------------------------------------------ generic


def test_generic_csv_several_captions_per_image(tmp_path: Path) -> None:
    root = tmp_path / "gen"
    write(
        root / "captions.csv",
        "image,caption,split,labels\n"
        "a.jpg,first of a,train,L1\n"
        "b.jpg,only b,test,\n"
        "a.jpg,second of a,train,L2;L1\n"
        "a.jpg,,train,\n"
        "extra/c.png,c caption,valid,\n",
    )
    write(root / "notes.csv", "x,y\n1,2\n")  # not an annotations file: no image/caption columns
    save_image(root / "images" / "a.jpg")
    save_image(root / "images" / "b.jpg")
    save_image(root / "extra" / "c.png")
    assert detect_layout(root) == "generic"
    ds = load_dataset(root)
    assert ds.layout == "generic" and ds.name == "gen"
    assert ds.records == [
        Record("a.jpg", str(root / "images/a.jpg"), ("first of a", "second of a"), ("L1", "L2"), "train"),
        Record("b.jpg", str(root / "images/b.jpg"), ("only b",), (), "test"),
        Record("extra/c.png", str(root / "extra/c.png"), ("c caption",), (), "valid"),
    ]
    assert len(ds.warnings) == 1 and "dropped 1 empty caption" in ds.warnings[0] and "line 5" in ds.warnings[0]


def test_generic_jsonl_with_aliases_passed_as_file(tmp_path: Path) -> None:
    root = tmp_path / "jsonl-data"
    write(
        root / "ann.jsonl",
        '{"filepath": "images/p.png", "text": ["p one", "p two"], "cuis": ["K1", "K2"]}\n'
        "\n"
        '{"filepath": "q.png", "text": "q one", "cuis": "K3;K1", "split": "test"}\n'
        '{"filepath": "images/p.png", "text": "p three"}\n',
    )
    save_image(root / "images" / "p.png")
    ds = load_dataset(root / "ann.jsonl")
    assert ds.name == "jsonl-data" and ds.root == str(root)
    assert ds.records == [
        Record("images/p.png", str(root / "images/p.png"), ("p one", "p two", "p three"), ("K1", "K2"), "train"),
        Record("q.png", str(root / "images/q.png"), ("q one",), ("K3", "K1"), "test"),  # missing file: kept
    ]


def test_detection_of_each_layout(tmp_path: Path) -> None:
    assert detect_layout(make_clef2023(tmp_path / "a")) == "imageclef2023"
    write(tmp_path / "b" / "caption_prediction_train.csv", "X\tcap\n")
    assert detect_layout(tmp_path / "b") == "imageclef2022"
    write(tmp_path / "c" / "data.tsv", "path\ttitle\nx.png\tcap\n")
    assert detect_layout(tmp_path / "c") == "generic"
    assert load_dataset(tmp_path / "c").records[0].captions == ("cap",)


def test_synthetic_marker_sets_flag(tmp_path: Path) -> None:
    root = make_clef2023(tmp_path / "marked")
    write(root / "SYNTHETIC", "generated\n")
    assert load_dataset(root).synthetic is True


# ------------------------------------------------------------------------------------------------- errors


def test_folder_matching_no_layout_lists_what_was_looked_for(tmp_path: Path) -> None:
    write(tmp_path / "odd" / "readme.txt", "hello")
    write(tmp_path / "odd" / "table.csv", "a,b\n1,2\n")
    with pytest.raises(DatasetError) as err:
        load_dataset(tmp_path / "odd")
    message = str(err.value)
    assert str(tmp_path / "odd") in message
    assert "{split}_captions.csv" in message and "caption_prediction_{split}.csv" in message
    assert "table.csv" in message


def test_missing_required_columns(tmp_path: Path) -> None:
    write(tmp_path / "c23" / "train_captions.csv", "ID,Text\nA,b\n")
    with pytest.raises(DatasetError, match=r"train_captions\.csv:1: missing required column\(s\) Caption"):
        load_dataset(tmp_path / "c23")
    path = write(tmp_path / "gen" / "captions.csv", "image,label\na.jpg,x\n")
    with pytest.raises(DatasetError, match=r"captions\.csv:1: missing required column\(s\) caption"):
        load_dataset(path)
    path = write(tmp_path / "js" / "a.jsonl", '{"image": "a.png", "text": "x"}\n{"image": "b.png"}\n')
    with pytest.raises(DatasetError, match=r"a\.jsonl:2: missing required key\(s\) caption"):
        load_dataset(path)


def test_duplicate_ids_name_both_lines(tmp_path: Path) -> None:
    write(tmp_path / "c23" / "train_captions.csv", "ID,Caption\nA,one\nB,two\nA,three\n")
    with pytest.raises(DatasetError, match=r"train_captions\.csv:4: duplicate ID 'A' \(first on line 2\)"):
        load_dataset(tmp_path / "c23")
    write(tmp_path / "c22" / "caption_prediction_train.csv", "A\tone\nB\ttwo\nA\tthree\n")
    with pytest.raises(DatasetError, match=r"caption_prediction_train\.csv:3: duplicate ID 'A' \(first on line 1\)"):
        load_dataset(tmp_path / "c22")
    write(tmp_path / "c23b" / "train_captions.csv", "ID,Caption\nA,one\n")
    write(tmp_path / "c23b" / "train_concepts.csv", "ID,CUIs\nA,C1\nA,C2\n")
    with pytest.raises(DatasetError, match=r"train_concepts\.csv:3: duplicate ID 'A' \(first on line 2\)"):
        load_dataset(tmp_path / "c23b")


def test_same_id_in_two_splits_is_allowed(tmp_path: Path) -> None:
    write(tmp_path / "c" / "train_captions.csv", "ID,Caption\nA,one\n")
    write(tmp_path / "c" / "test_captions.csv", "ID,Caption\nA,two\n")
    assert [(r.split, r.captions) for r in load_dataset(tmp_path / "c").records] == [
        ("train", ("one",)),
        ("test", ("two",)),
    ]


def test_non_utf8_bytes_name_file_and_line(tmp_path: Path) -> None:
    root = tmp_path / "latin"
    root.mkdir()
    (root / "train_captions.csv").write_bytes("ID,Caption\nA,fine\nB,caf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(DatasetError, match=r"train_captions\.csv:3: not valid UTF-8 \(byte 0xe9 at column 6\)"):
        load_dataset(root)
    (root / "train_captions.csv").write_bytes(b"\xef\xbb\xbfID,Caption\nA,caf\xc3\xa9\n")  # BOM + valid UTF-8
    assert load_dataset(root).records[0].captions == ("café",)
    gen = tmp_path / "gen"
    gen.mkdir()
    (gen / "captions.csv").write_bytes(b"image,caption\na.png,ok\nb.png,ok\nc.png,bad \xff\n")
    with pytest.raises(DatasetError, match=r"captions\.csv:4: not valid UTF-8"):
        load_dataset(gen)


def test_image_paths_escaping_the_data_root(tmp_path: Path) -> None:
    root = tmp_path / "esc"
    write(root / "captions.csv", "image,caption\nok.png,fine\n../secret.png,sneaky\n")
    with pytest.raises(DatasetError, match=r"captions\.csv:3: image path '\.\./secret\.png' points outside"):
        load_dataset(root)
    outside = save_image(tmp_path / "elsewhere.png")
    write(root / "captions.csv", f"image,caption\n{outside},absolute\n")
    with pytest.raises(DatasetError, match=r"captions\.csv:2: image path .* points outside"):
        load_dataset(root)
    inside = save_image(root / "images" / "in.png")
    write(root / "captions.csv", f"image,caption\n{inside},absolute but inside\n")
    assert load_dataset(root).records[0].image == str(inside)
    write(tmp_path / "c23" / "train_captions.csv", "ID,Caption\nOK,fine\n../../../up,sneaky\n")
    (tmp_path / "c23" / "images").mkdir()
    with pytest.raises(DatasetError, match=r"train_captions\.csv:3: image of ID '\.\./\.\./\.\./up' lies outside"):
        load_dataset(tmp_path / "c23")


def test_generic_conflicting_split_and_bad_json(tmp_path: Path) -> None:
    write(tmp_path / "g" / "captions.csv", "image,caption,split\na.png,x,train\nb.png,y,test\na.png,z,test\n")
    with pytest.raises(DatasetError, match=r"captions\.csv:4: image 'a\.png' is in split 'test' here but in 'train' on line 2"):
        load_dataset(tmp_path / "g")
    path = write(tmp_path / "j" / "a.jsonl", '{"image": "a.png", "caption": "x"}\n{"image": "b.png", "caption": \n')
    with pytest.raises(DatasetError, match=r"a\.jsonl:2: invalid JSON"):
        load_dataset(path)


def test_missing_path_unsupported_file_and_broken_zip(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no such file or folder"):
        load_dataset(tmp_path / "nothing")
    with pytest.raises(DatasetError, match="not an annotations file"):
        load_dataset(write(tmp_path / "x.txt", "hi"))
    write(tmp_path / "broken" / "caption_prediction_train.csv", "X1\tcaption\n")
    (tmp_path / "broken" / "resized_train.zip").write_bytes(b"not a zip at all")
    with pytest.raises(DatasetError, match=r"resized_train\.zip: cannot read the image archive"):
        load_dataset(tmp_path / "broken")


# ---------------------------------------------------------------------------------------------- real data


def test_roco_rad_real_folder() -> None:
    root = shared_dataset("roco-rad")
    ds = load_dataset(root)
    assert (ds.name, ds.layout, ds.synthetic) == ("roco-rad", "imageclef2023", False)
    assert len(ds.records) == 4639
    assert {s: len(ds.split(s)) for s in ds.splits} == {"train": 3722, "valid": 463, "test": 454}
    assert len(ds.concept_names) > 400 and all(ds.concept_names.values())
    assert all(os.path.isfile(r.image) for r in ds.records)
    first = ds.split("train")[0]
    assert first.image_id == "ROCO_00001" and first.captions == ("Axial MRI (coronal view).",) and first.concepts == ()
    assert ds.warnings == []


def test_flickr8k_1k_real_folder() -> None:
    root = shared_dataset("flickr8k-1k")
    ds = load_dataset(root)
    assert (ds.name, ds.layout) == ("flickr8k-1k", "generic")
    assert len(ds.records) == 1000
    assert all(len(r.captions) == 5 for r in ds.records)
    assert {s: len(ds.split(s)) for s in ds.splits} == {"train": 804, "valid": 111, "test": 85}
    first = ds.records[0]
    assert first.image_id == "1000268201_693b08cb0e.jpg"
    assert first.captions[:2] == (
        "A child in a pink dress is climbing up a set of stairs in an entry way .",
        "A girl going into a wooden building .",
    )
    assert all(os.path.isfile(r.image) for r in ds.records)

