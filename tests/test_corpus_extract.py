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
        if dataset.layout == "mimic-cxr":  # hashed ids: no subject or study number in them
            assert not any(n in i for i in cached.image_ids for n in ("10000032", "50414267", "11000011"))


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
