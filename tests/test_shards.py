"""Sharded extraction: shard files with completion markers, merge that refuses gaps, and the Ray engine."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from medembed.cache.reader import find_splits, load_split
from medembed.cache.shards import MergeError, merge_shards
from medembed.extract.extraction import ExtractConfig, ExtractError, extract, parse_shard, shard_records
from tests.conftest import make_imageclef2023


def _cfg(data, out, **kw) -> ExtractConfig:
    return ExtractConfig(data=str(data), backbone="tiny-clip", out=str(out), batch_size=4, workers=0,
                         progress=False, dtype="float32", **kw)


def test_shard_blocks_cover_the_split_once():
    recs = list(range(10))
    blocks = [shard_records(recs, (i, 3)) for i in range(3)]
    assert blocks == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
    assert parse_shard("2/3") == (2, 3)
    for bad in ("3/3", "a/b", "1", "-1/2"):
        with pytest.raises(ExtractError, match="--shard"):
            parse_shard(bad)


def test_shards_merge_to_the_unsharded_result(tmp_path):
    data = make_imageclef2023(tmp_path / "d", {"train": 14, "valid": 5})
    (data / "images" / "IMG_00004.jpg").write_bytes(b"")
    whole = extract(_cfg(data, tmp_path / "whole"))
    folder = tmp_path / "sharded" / "d" / "tiny-clip"
    for i in range(3):
        extract(_cfg(data, tmp_path / "sharded", shard=f"{i}/3"))
    names = sorted(p.name for p in folder.iterdir())
    assert "train.shard-0001-of-0003.h5" in names and "train.shard-0001-of-0003.done" in names
    with pytest.raises(FileNotFoundError, match="no finished cache files"):
        find_splits(folder)  # shard files alone are not finished splits
    merged = merge_shards(folder)
    assert sorted(p.name for p in merged) == ["train.h5", "valid.h5"]
    for split in ("train", "valid"):
        a = load_split(tmp_path / "whole" / "d" / "tiny-clip" / f"{split}.h5")
        b = load_split(folder / f"{split}.h5")
        assert a.image_ids == b.image_ids and a.captions == b.captions
        assert torch.equal(a.caption_image, b.caption_image)
        assert (a.concepts != b.concepts).nnz == 0
        # batch boundaries differ between the two runs; the maths is the same
        assert torch.allclose(a.image_features, b.image_features, atol=1e-4)
        assert torch.allclose(a.caption_features, b.caption_features, atol=1e-4)
        assert b.attrs["shard"] == "" and b.attrs["merged_from_shards"] == 3
    assert [s for s in whole.splits if s.split == "train"][0].skipped[0][0] == "IMG_00004"
    assert load_split(folder / "train.h5").n_images == 13


def test_merge_refuses_missing_or_unfinished_shards(tmp_path):
    data = make_imageclef2023(tmp_path / "d", {"train": 8})
    folder = tmp_path / "o" / "d" / "tiny-clip"
    extract(_cfg(data, tmp_path / "o", shard="0/3"))
    extract(_cfg(data, tmp_path / "o", shard="2/3"))
    with pytest.raises(MergeError, match=r"shard 1/3 is missing"):
        merge_shards(folder)
    (folder / "train.shard-0002-of-0003.done").unlink()
    (folder / "train.shard-0001-of-0003.parts").mkdir()
    with pytest.raises(MergeError, match=r"shard 1/3 is still being written; shard 2/3 has no completion marker"):
        merge_shards(folder)
    assert not (folder / "train.h5").exists()
    from medembed.cli import main

    r = CliRunner().invoke(main, ["cache", "merge", str(folder)])
    assert r.exit_code == 1 and "shard 1/3" in r.output


@pytest.mark.slow
def test_ray_engine_on_a_local_two_cpu_cluster(tmp_path):
    pytest.importorskip("ray", reason="Ray is the optional [distributed] extra")
    from medembed.extract.distributed import extract_with_ray

    data = make_imageclef2023(tmp_path / "d", {"train": 12, "valid": 4})
    summary = extract_with_ray(_cfg(data, tmp_path / "o"), shards=2, num_cpus=2)
    assert [s.split for s in summary.splits] == ["train", "valid"]
    assert [s.images for s in summary.splits] == [12, 4]
    ref = extract(_cfg(data, tmp_path / "ref"))
    for s, r in zip(summary.splits, ref.splits):
        a, b = load_split(s.path), load_split(r.path)
        assert a.image_ids == b.image_ids
        assert np.allclose(a.image_features.numpy(), b.image_features.numpy(), atol=1e-4)
