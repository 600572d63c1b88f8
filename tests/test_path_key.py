"""The key that turns image paths into ids (`extract.path_key`) and the private locations resolved
with it (`imaging.locations`): made once and owner-only, keyed (a guessed path does not give the id),
refused in one line with another machine's key, and caches of unkeyed ids still read."""
from __future__ import annotations

import hashlib
import hmac
import io
import shutil
import stat
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from medembed.cache.schema import PRIVATE_LOCATION, ZIP_SEP
from medembed.extract.datasets import generic, identity, load_dataset
from medembed.extract.datasets.identity import RecordNamingMismatch
from medembed.extract.extraction import ExtractConfig, extract
from medembed.extract.imaging import open_image, split_location
from medembed.extract.imaging.locations import private_location
from medembed.extract.path_key import KEY_ENV, PathKeyError, load_path_key
from medembed.extract.records import Dataset, Record
from medembed.extract.worker import redact

CT = Path(get_testdata_file("CT_small.dcm", download=False))


def test_the_key_is_made_once_owner_only_in_the_users_config_folder(tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    with pytest.raises(PathKeyError, match="no path key"):
        load_path_key()  # resolving never makes one: ids made elsewhere need that machine's key
    key = load_path_key(create=True)
    assert key.path == tmp_path / "config" / "medembed" / "path-key"
    assert stat.S_IMODE(key.path.stat().st_mode) == 0o600 and len(key.secret) == 32
    assert load_path_key(create=True) == key  # made once
    rel = "Doe_Jane/img000.dcm"
    assert key.image_id(rel) == hmac.new(key.secret, rel.encode(), hashlib.sha256).hexdigest()[:16]
    assert key.image_id(rel) != hashlib.sha256(rel.encode()).hexdigest()[:16]  # not found again by guessing
    other = tmp_path / "other-key"
    monkeypatch.setenv(KEY_ENV, str(other))
    assert load_path_key(create=True).image_id(rel) != key.image_id(rel) and other.is_file()
    other.write_text("not hex\n")
    with pytest.raises(PathKeyError, match=f"{other}: unreadable path key"):
        load_path_key()


def _archive(root: Path) -> Path:
    folder = root / "pacs"
    for name in ("Doe_Jane/IM0001", "Roe_Richard/study 2/IM0001.dcm"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(CT, folder / name)
    return folder


def test_a_private_location_is_found_with_its_key_and_refused_with_another(tmp_path, monkeypatch):
    folder = _archive(tmp_path)
    dataset = load_dataset(folder)
    key = load_path_key()
    assert dataset.private_paths and dataset.id_key == key.key_id
    assert sorted(r.image_id for r in dataset.records) == sorted(
        key.image_id(rel) for rel in ("Doe_Jane/IM0001", "Roe_Richard/study 2/IM0001.dcm"))
    record = next(r for r in dataset.records if r.image.endswith("IM0001.dcm"))
    location = f"{folder}{ZIP_SEP}{private_location(record.image_id, key.key_id)}"
    assert split_location(location) == (record.image, None, None)
    assert np.asarray(open_image(location)).shape[:2] == (128, 128)
    monkeypatch.setenv(KEY_ENV, str(tmp_path / "another-machine"))
    load_path_key(create=True)
    with pytest.raises(PathKeyError, match=f"image ids made with path key {key.key_id}, but .* point {KEY_ENV} at"):
        open_image(location)


def test_caches_of_unkeyed_ids_are_still_read(tmp_path):
    folder = _archive(tmp_path)
    legacy = hashlib.sha256(b"Roe_Richard/study 2/IM0001.dcm").hexdigest()[:16]  # what MIMIC-CXR caches hold
    path, member, frame = split_location(f"{folder}{ZIP_SEP}{PRIVATE_LOCATION}{legacy}")
    assert (path, member, frame) == (str(folder / "Roe_Richard/study 2/IM0001.dcm"), None, None)


def test_dicom_tar_members_are_named_by_keyed_ids_and_found_again(tmp_path):
    data = tmp_path / "shards"
    data.mkdir()
    with tarfile.open(data / "train-000000.tar", "w") as tf:
        for name, payload in (("Doe_Jane_001.dcm", CT.read_bytes()), ("Doe_Jane_001.txt", b"a ct slice")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    (record,) = load_dataset(data).records
    key = load_path_key()
    assert record.image_id == key.image_id("train-000000.tar::Doe_Jane_001.dcm")
    location = f"{data}{ZIP_SEP}{private_location(record.image_id, key.key_id)}"
    assert split_location(location) == (str(data / "train-000000.tar"), "Doe_Jane_001.dcm", None)


def test_a_failure_reason_kept_in_a_private_cache_names_no_path():
    location = "/data/pacs/train-000000.tar::Doe_Jane_001.dcm"
    why = "unreadable image (OSError: /data/pacs/train-000000.tar: member 'Doe_Jane_001.dcm' is truncated (9 of 90 bytes))"
    assert redact(why, location) == "unreadable image (OSError: <image>: member '<image>' is truncated (9 of 90 bytes))"
    missing = "unreadable image (FileNotFoundError: [Errno 2] No such file or directory: '/data/pacs/Doe_Jane/IM1')"
    assert "Doe_Jane" not in redact(missing, "/data/pacs/Doe_Jane/IM1")


def test_the_key_file_is_read_once_until_it_changes(tmp_path, monkeypatch):
    """Every private location resolved asks for the key (each page image, each fine-tuning item)."""
    folder = _archive(tmp_path)
    dataset = load_dataset(folder)
    key = load_path_key()
    copy = tmp_path / "key-copy"
    shutil.copy(key.path, copy)
    monkeypatch.setenv(KEY_ENV, str(copy))
    locations = [f"{folder}{ZIP_SEP}{private_location(r.image_id, key.key_id)}" for r in dataset.records] * 5
    reads = []
    real = Path.read_text

    def counting(self, *args, **kwargs):
        reads.append(self)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", counting)
    assert [split_location(loc)[0] for loc in locations] == [r.image for r in dataset.records] * 5
    assert reads == [copy]
    copy.write_text("ab" * 32 + "\n")  # rewritten with another key: read again, and refused
    with pytest.raises(PathKeyError, match="image ids made with path key"):
        split_location(locations[0])
    assert reads == [copy, copy]


def test_a_key_that_cannot_be_made_is_blamed_on_its_folder_not_on_the_data(tmp_path, monkeypatch):
    folder = _archive(tmp_path)
    (tmp_path / "home").write_text("a file where a folder is expected, like a read-only home\n")
    monkeypatch.delenv(KEY_ENV, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "home" / "config"))
    with pytest.raises(PathKeyError) as e:
        load_dataset(folder)
    message = str(e.value)
    assert message.startswith(f"{tmp_path / 'home' / 'config' / 'medembed' / 'path-key'}: cannot make the path key")
    assert KEY_ENV in message and "--readable-paths" in message and "\n" not in message
    assert load_dataset(folder, readable_paths=True).records  # no key needed for readable paths


def test_finding_dicom_by_its_marker_reads_a_bounded_number_of_files(tmp_path, monkeypatch):
    """Every load of a dataset asks whether it holds DICOM; extensionless files used to be opened one
    by one, all of them when none is DICOM, even when a .dcm file listed later settles it."""
    probed = []
    real = identity.dicom_marker

    def counting(path: str) -> bool:
        probed.append(path)
        return real(path)

    monkeypatch.setattr(identity, "dicom_marker", counting)
    names = [f"scan{i:04d}" for i in range(3 * identity.MARKER_PROBES)]
    for name in names:
        (tmp_path / name).write_bytes(b"not a dicom file")

    def dataset(images: list[str]) -> Dataset:
        records = [Record(f"r{i}", str(tmp_path / n), ("c",), (), "train") for i, n in enumerate(images)]
        return Dataset("d", str(tmp_path), "generic", records)

    assert identity.holds_dicom(dataset([*names, "late.dcm"])) and probed == []  # settled by a suffix
    assert not identity.holds_dicom(dataset(names)) and len(probed) == identity.MARKER_PROBES
    probed.clear()
    shutil.copy(CT, tmp_path / "IM0001")  # an extensionless DICOM file among them: found by a probe
    assert identity.holds_dicom(dataset(["IM0001", *names])) and probed == [str(tmp_path / "IM0001")]


def _extract_into(data: Path, out: Path, **kw):
    return extract(ExtractConfig(data=str(data), backbone="tiny-clip", out=str(out), workers=0, progress=False,
                                 batch_size=4, **kw))


def test_a_cache_named_the_other_way_is_refused_in_one_line_saying_how_to_read_it(tmp_path, monkeypatch):
    """A cache of readable paths read with keyed ids (as a DICOM dataset extracted before ids were
    keyed is), and the reverse: one line that names the flag, not a list of provenance keys."""
    data = tmp_path / "ct"
    data.mkdir()
    for name in ("a.dcm", "b.dcm"):
        shutil.copy(CT, data / name)
    (data / "captions.csv").write_text("image,caption\na.dcm,a ct slice\nb.dcm,another ct slice\n")
    _extract_into(data, tmp_path / "readable", readable_paths=True)
    with pytest.raises(RecordNamingMismatch) as e:
        _extract_into(data, tmp_path / "readable")
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{tmp_path / 'readable'}")
    assert ("made with another way of naming records: its records are named by their readable paths, this run names "
            "them by keyed hashes of their paths") in message
    assert "pass --readable-paths to read it as before, or extract it anew into another --out (--features-root" in message
    assert _extract_into(data, tmp_path / "readable", readable_paths=True).splits[0].status == "up to date"

    _extract_into(data, tmp_path / "keyed")
    with pytest.raises(RecordNamingMismatch, match=r"its records are named by keyed hashes of their paths \(path key "
                       r"[0-9a-f]{8}\), this run names them by their paths; read it without --readable-paths") as e:
        _extract_into(data, tmp_path / "keyed", readable_paths=True)
    assert "\n" not in str(e.value)
    made_with = load_path_key().key_id
    monkeypatch.setenv(KEY_ENV, str(tmp_path / "this-machines-key"))
    with pytest.raises(RecordNamingMismatch, match=f"made with path key {made_with}, this machine's key is "
                       f"{load_path_key(create=True).key_id}; point {KEY_ENV} at the key file of the machine"):
        _extract_into(data, tmp_path / "keyed")


def test_a_cache_of_absolute_ids_is_refused_in_one_line(tmp_path, monkeypatch):
    """A generic table naming images by absolute path: its records are now named below the folder."""
    data = tmp_path / "table"
    data.mkdir()
    for name, colour in (("a.png", (200, 0, 0)), ("b.png", (0, 0, 200))):
        Image.new("RGB", (24, 24), colour).save(data / name)
    (data / "captions.csv").write_text(f"image,caption\n{data / 'a.png'},red\n{data / 'b.png'},blue\n")
    with monkeypatch.context() as m:  # as the generic reader named them before
        m.setattr(generic, "name_problem", lambda name: None)
        _extract_into(data, tmp_path / "f")
    with pytest.raises(RecordNamingMismatch) as e:
        _extract_into(data, tmp_path / "f")
    assert str(e.value) == (
        f"{tmp_path / 'f' / 'table' / 'tiny-clip' / 'train.h5'}: made with another way of naming records: its records "
        "are named by the absolute paths (or paths leaving the data folder) its annotations give, this version names "
        "them by their paths below the data folder; extract it anew into another --out (--features-root for commands "
        "given --data), or delete it to rebuild it")
