"""HDF5 cache: write/read round trip, contiguous row chunks, provenance comparison, part store."""
from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from medembed.cache.parts import PartStore
from medembed.cache.provenance import ProvenanceMismatch, differences
from medembed.cache.reader import CachedSplit, find_splits, load_split
from medembed.cache.schema import split_file
from medembed.cache.writer import write_split


def _write(path, dtype="float16", **over):
    rng = np.random.default_rng(0)
    kw = dict(
        split="train",
        attrs={"backbone": "b", "split": "train", "weights_sha256": "0" * 64},
        image_ids=["a", "b", "c"],
        image_locations=["images/a.jpg", "images/b.jpg", "x.zip::c.png"],
        image_features=torch.from_numpy(rng.normal(size=(3, 5)).astype(np.float32)),
        captions=["one", "two", "three", "four"],
        caption_image=torch.tensor([0, 0, 1, 2]),
        caption_features=torch.from_numpy(rng.normal(size=(4, 6)).astype(np.float32)),
        concept_ids=["C1", "C2", "C3"],
        concept_names=["lung", "", "heart"],
        concepts=sp.csr_matrix((np.ones(3, np.float32), np.array([0, 2, 1]), np.array([0, 2, 2, 3])), shape=(3, 3)),
        templates=["{name}", "an image of {name}"],
        concept_text_features=torch.from_numpy(rng.normal(size=(3, 2, 6)).astype(np.float32)),
        skipped=[("d", "images/d.jpg", "zero-byte file")],
    )
    kw.update(over)
    write_split(path, CachedSplit(**kw), dtype=dtype, feature_attrs={"images": {"layer": "stage7", "pooling": "avg"}})
    return kw


def test_round_trip_float32_exact(tmp_path):
    kw = _write(tmp_path / split_file("train"), dtype="float32")
    s = load_split(tmp_path / split_file("train"))
    assert s.image_ids == ["a", "b", "c"]
    assert s.image_locations[2] == "x.zip::c.png"
    assert torch.equal(s.image_features, kw["image_features"])
    assert torch.equal(s.caption_features, kw["caption_features"])
    assert s.caption_image.tolist() == [0, 0, 1, 2]
    assert s.captions == ["one", "two", "three", "four"]
    assert s.concept_dense().tolist() == [[True, False, True], [False, False, False], [False, True, False]]
    assert s.concept_names == ["lung", "", "heart"]
    assert s.concept_text_features.shape == (3, 2, 6)
    assert s.templates == ["{name}", "an image of {name}"]
    assert s.attrs["n_skipped"] == 1 and s.attrs["complete"]
    with h5py.File(tmp_path / split_file("train")) as f:
        assert f["images/features"].attrs["layer"] == "stage7"
        assert [x.decode() for x in f["skipped/reasons"][()]] == ["zero-byte file"]


def test_float16_default_and_row_chunks(tmp_path):
    feats = np.random.default_rng(1).normal(size=(3000, 512)).astype(np.float32)
    _write(tmp_path / "t.h5", image_features=torch.from_numpy(feats), image_ids=[str(i) for i in range(3000)],
           image_locations=[""] * 3000, caption_image=torch.zeros(4, dtype=torch.long),
           concepts=sp.csr_matrix((3000, 3), dtype=np.float32))
    with h5py.File(tmp_path / "t.h5") as f:
        ds = f["images/features"]
        assert ds.dtype == np.float16
        assert ds.chunks == (1024, 512)  # whole rows in 1 MiB blocks: 1024 rows x 512 x 2 bytes
    s = load_split(tmp_path / "t.h5")
    assert s.image_features.dtype == torch.float32
    assert torch.allclose(s.image_features, torch.from_numpy(feats), atol=2e-3, rtol=1e-3)
    assert not (tmp_path / "t.h5.tmp").exists()


def test_find_splits_orders_and_errors(tmp_path):
    for s in ("test", "train", "valid"):
        _write(tmp_path / split_file(s))
    assert list(find_splits(tmp_path)) == ["train", "valid", "test"]
    with pytest.raises(FileNotFoundError, match="no such features folder"):
        find_splits(tmp_path / "missing")
    (tmp_path / "e").mkdir()
    with pytest.raises(FileNotFoundError, match="no finished cache files"):
        find_splits(tmp_path / "e")


def test_not_a_cache_is_named(tmp_path):
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not hdf5 at all")
    with pytest.raises(ValueError, match="bad.h5"):
        load_split(bad)


def test_differences_name_each_key():
    a = {"backbone": "effnet-lite0+minilm", "weights_sha256": "aa", "split": "train", "created": "t1"}
    b = {"backbone": "tiny-clip", "weights_sha256": "aa", "split": "train", "created": "t2"}
    diffs = differences(a, b)
    assert diffs == ["backbone: cache has effnet-lite0+minilm, this run has tiny-clip"]
    assert differences(a, dict(a, created="later")) == []


def test_part_store_resume_and_refusal(tmp_path):
    final = tmp_path / split_file("train")
    store = PartStore(final)
    settings = store.open({"backbone": "x", "split": "train"}, {"batch_size": 8})
    assert settings == {"batch_size": 8}
    store.put("img", 0, rows=np.arange(3))
    # a second run with another batch size resumes under the recorded one
    again = PartStore(final)
    assert again.open({"backbone": "x", "split": "train"}, {"batch_size": 32}) == {"batch_size": 8}
    assert again.done("img", 0) and not again.done("img", 1)
    assert again.get("img", 0)["rows"].tolist() == [0, 1, 2]
    with pytest.raises(ProvenanceMismatch, match="backbone: cache has x, this run has y"):
        PartStore(final).open({"backbone": "y", "split": "train"}, {"batch_size": 8})
    assert json.loads((store.dir / "manifest.json").read_text())["settings"]["batch_size"] == 8
    store.remove()
    assert not store.dir.exists()
