"""The public corpora's own formats through `extract`: every image read in place (parquet rows, tar
members, DICOM and JPEG trees), and a WebDataset extraction killed mid-shard resuming to the same
features as one that never stopped."""
from __future__ import annotations

import errno
import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from medembed.cache.parts import PartStore
from medembed.cache.reader import load_split
from medembed.extract.datasets import load_dataset
from medembed.extract.extraction import ExtractConfig, ExtractError, extract
from medembed.extract.imaging import open_image
from tests.test_corpus_layouts import make_mimic, make_openi, make_rocov2, write_tar


def _extract(data: Path, out: Path, **kw):
    cfg = ExtractConfig(data=str(data), backbone="tiny-clip", out=str(out), workers=0, progress=False, batch_size=2, **kw)
    return extract(cfg)


@pytest.mark.parametrize("make", [make_rocov2, make_mimic, make_openi])
def test_each_corpus_extracts_every_image_in_place(tmp_path, make):
    data = tmp_path / "data"
    make(data)
    fake = data / "files/p10/p10000032/s53189527/b2.dcm"
    if fake.exists():  # MIMIC-CXR's DICOM variant: a real DICOM file
        fake.write_bytes(Path(get_testdata_file("CT_small.dcm", download=False)).read_bytes())
    dataset = load_dataset(data)
    summary = _extract(data, tmp_path / "f")
    assert sum(s.records for s in summary.splits) == len(dataset.records) > 0
    missing = [(i, why) for s in summary.splits for i, _, why in s.skipped if "missing" not in why]
    assert missing == []  # nothing unreadable: only images the corpus itself lacks are skipped
    for s in summary.splits:
        cached = load_split(s.path)
        assert cached.n_images == s.images and np.isfinite(cached.image_features).all()
        # every cached image can be opened again from what the cache recorded (the page and tuning do)
        assert all(open_image(cached.image_path(r)).size[0] > 0 for r in range(cached.n_images))
    if dataset.layout == "mimic-cxr":  # paths hold subject and study numbers: no written byte may
        numbers = [b"10000032", b"50414267", b"53189527", b"11000011", b"51111111", b"p10/"]
        written = [p for p in (tmp_path / "f").rglob("*") if p.is_file()]
        assert written and not [(p.name, n) for p in written for n in numbers if n in p.read_bytes()]


def _shards(root: Path, n_shards: int = 2, per_shard: int = 5) -> Path:
    root.mkdir(parents=True)
    for s in range(n_shards):
        members = []
        for i in range(per_shard):
            key = f"{s:02d}{i:07d}"
            buf = io.BytesIO()
            Image.new("RGB", (24, 20), (40 * i, 30 * s, 200 - 20 * i)).save(buf, format="JPEG")
            members += [(f"{key}.jpg", buf.getvalue()), (f"{key}.txt", f"view {i} of shard {s}".encode())]
        write_tar(root / f"train-{s:06d}.tar", members)
    return root


def test_webdataset_killed_mid_shard_resumes_to_the_same_features(tmp_path, monkeypatch):
    data = _shards(tmp_path / "shards")
    assert load_dataset(data).layout == "webdataset"
    whole = load_split(_extract(data, tmp_path / "whole").splits[0].path)

    real_put = PartStore.put
    calls = {"n": 0}

    def dies_in_the_second_shard(self, kind, index, **arrays):
        calls["n"] += 1
        if calls["n"] > 3:  # batches of 2: the 4th batch holds images 6-7, inside the second shard
            raise OSError(errno.EIO, os.strerror(errno.EIO), "killed")
        return real_put(self, kind, index, **arrays)

    monkeypatch.setattr(PartStore, "put", dies_in_the_second_shard)
    with pytest.raises(ExtractError, match="3 finished image batches are kept"):
        _extract(data, tmp_path / "resumed")
    monkeypatch.setattr(PartStore, "put", real_put)
    summary = _extract(data, tmp_path / "resumed")
    assert summary.splits[0].status == "resumed" and summary.splits[0].images == 10
    again = load_split(summary.splits[0].path)
    assert again.image_ids == whole.image_ids
    assert np.array_equal(again.image_features, whole.image_features)
    assert np.array_equal(again.caption_features, whole.caption_features)


def test_webdataset_without_any_split_is_split_by_key(tmp_path):
    """img2dataset's own output names no split: 80/10/10 by key, so adapt finds train and valid."""
    data = tmp_path / "web"
    data.mkdir()
    members = []
    for i in range(40):
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (i, 0, 0)).save(buf, format="JPEG")
        members += [(f"{i:09d}.jpg", buf.getvalue()), (f"{i:09d}.txt", f"caption {i}".encode())]
    write_tar(data / "00000.tar", members)
    dataset = load_dataset(data)
    assert dataset.layout == "webdataset" and set(dataset.splits) == {"train", "valid", "test"}
    assert any("by a hash of each sample's key" in w for w in dataset.warnings)
    assert load_dataset(data).records == dataset.records  # the same split on every run


def test_an_annotations_file_wins_over_a_stray_shard_or_report(tmp_path):
    data = tmp_path / "d"
    data.mkdir()
    Image.new("RGB", (8, 8)).save(data / "a.png")
    (data / "captions.csv").write_text("image,caption\na.png,a chest x-ray\n")
    write_tar(data / "backup.tar", [("x.txt", b"x")])
    (data / "report.xml").write_text('<eCitation><parentImage id="a"/></eCitation>')
    assert load_dataset(data).layout == "generic"
