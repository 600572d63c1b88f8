"""Sharded extraction: shard files with completion markers, merge that refuses gaps, and the Ray engine."""
from __future__ import annotations

import dataclasses

import h5py
import pytest
import torch
from click.testing import CliRunner

from medembed.cache.reader import CacheError, find_splits, load_split
from medembed.cache.schema import split_file
from medembed.cache.shards import MergeError, merge_shards
from medembed.extract.extraction import (
    ExtractConfig,
    ExtractError,
    empty_shards_note,
    extract,
    parse_shard,
    shard_records,
    shard_rows,
)
from tests.conftest import make_imageclef2023


def _cfg(data, out, **kw) -> ExtractConfig:
    return ExtractConfig(data=str(data), backbone="tiny-clip", out=str(out), batch_size=4, workers=0,
                         progress=False, dtype="float32", **kw)


def test_shard_blocks_cover_the_split_once():
    recs = list(range(10))
    blocks = [shard_records(recs, (i, 3)) for i in range(3)]
    assert blocks == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
    # with batches, shards are whole batches of the unsharded loop (batches [0-3] [4-7] [8-9])
    assert [shard_rows(10, (i, 3), batch_size=4) for i in range(3)] == [(0, 4), (4, 8), (8, 10)]
    assert [shard_rows(10, (i, 2), batch_size=4) for i in range(2)] == [(0, 4), (4, 10)]
    assert shard_rows(10, None, batch_size=4) == (0, 10)
    assert parse_shard("2/3") == (2, 3)
    for bad in ("3/3", "a/b", "1", "-1/2"):
        with pytest.raises(ExtractError, match="--shard"):
            parse_shard(bad)


def test_shards_merge_to_the_unsharded_result(tmp_path, monkeypatch):
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
    # the join copies no feature: they are virtual datasets over the shards, storing no byte of their own
    with h5py.File(folder / split_file("train")) as f:
        for name in ("images/features", "captions/features"):
            assert f[name].is_virtual and f[name].id.get_storage_size() == 0
    # the folder moves as a whole (shards are named relative to the split file), read from elsewhere
    moved = tmp_path / "moved"
    folder.rename(moved)
    monkeypatch.chdir(tmp_path / "d")
    for split in ("train", "valid"):
        a = load_split(tmp_path / "whole" / "d" / "tiny-clip" / split_file(split))
        b = load_split(moved / split_file(split))
        assert a.image_ids == b.image_ids and a.captions == b.captions and a.skipped == b.skipped
        assert torch.equal(a.caption_image, b.caption_image)
        assert (a.concepts != b.concepts).nnz == 0
        # every batch of a shard is the batch the unsharded loop ran: the features are bit for bit the same
        assert torch.equal(a.image_features, b.image_features)
        assert torch.equal(a.caption_features, b.caption_features)
        assert torch.equal(a.concept_text_features, b.concept_text_features)
        assert b.attrs["shard"] == "" and b.attrs["merged_from_shards"] == 3
    assert [s for s in whole.splits if s.split == "train"][0].skipped[0][0] == "IMG_00004"
    assert load_split(moved / split_file("train")).n_images == 13
    # a shard file that went missing is refused by name, never read as fill values
    (moved / "train.shard-0001-of-0003.h5").rename(tmp_path / "away.h5")
    with pytest.raises(CacheError, match=r"train.shard-0001-of-0003.h5, which is missing"):
        load_split(moved / split_file("train"))
    (tmp_path / "away.h5").rename(moved / "train.shard-0001-of-0003.h5")
    # --copy over the joined files: rewritten self-contained, equal to them, readable with the shards gone
    from medembed.cli import main

    r = CliRunner().invoke(main, ["cache", "merge", "--copy", str(moved)])
    assert r.exit_code == 0 and r.output.count("(self-contained)") == 2, r.output
    with h5py.File(moved / split_file("train")) as f:
        assert not f["images/features"].is_virtual
    for p in moved.glob("*.shard-*.h5"):
        p.unlink()
    for split in ("train", "valid"):
        a = load_split(tmp_path / "whole" / "d" / "tiny-clip" / split_file(split))
        b = load_split(moved / split_file(split))
        assert a.image_ids == b.image_ids and torch.equal(a.image_features, b.image_features)
        assert torch.equal(a.caption_features, b.caption_features)


def test_merge_refuses_shards_that_do_not_tile_the_split(tmp_path):
    data = make_imageclef2023(tmp_path / "d", {"train": 12})
    folder = tmp_path / "o" / "d" / "tiny-clip"
    extract(_cfg(data, tmp_path / "o", shard="0/2"))
    extract(dataclasses.replace(_cfg(data, tmp_path / "o", shard="1/2"), batch_size=2))
    with pytest.raises(MergeError, match=r"this shard starts at record 6, the shards before it end at 4"):
        merge_shards(folder)


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
    assert not (folder / split_file("train")).exists()
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
        assert torch.equal(a.image_features, b.image_features)
        assert torch.equal(a.caption_features, b.caption_features)


def test_a_large_split_is_written_in_parts_and_joined(tmp_path):
    """A split above records_per_file is extracted part by part (each assembled alone), then joined
    without copying: the same cache as one file, bit for bit; a re-run finds it up to date."""
    data = make_imageclef2023(tmp_path / "d", {"train": 14, "valid": 5})
    whole = tmp_path / "whole" / "d" / "tiny-clip"
    extract(_cfg(data, tmp_path / "whole"))
    cfg = dataclasses.replace(_cfg(data, tmp_path / "parts"), records_per_file=8)  # two batches of 4 per part
    summary = extract(cfg)
    folder = tmp_path / "parts" / "d" / "tiny-clip"
    train = next(s for s in summary.splits if s.split == "train")
    assert train.status == "written in 2 parts, joined" and train.images == 14
    assert next(s for s in summary.splits if s.split == "valid").status == "written"  # 5 records: one file
    assert sorted(p.name for p in folder.glob("train.shard-*.h5")) == ["train.shard-0000-of-0002.h5",
                                                                        "train.shard-0001-of-0002.h5"]
    with h5py.File(folder / split_file("train")) as f:
        assert f["images/features"].is_virtual
    a, b = load_split(whole / split_file("train")), load_split(folder / split_file("train"))
    assert a.image_ids == b.image_ids and a.captions == b.captions
    assert torch.equal(a.image_features, b.image_features) and torch.equal(a.caption_features, b.caption_features)
    assert (a.concepts != b.concepts).nnz == 0
    again = extract(cfg)
    assert next(s for s in again.splits if s.split == "train").status == "up to date"


def test_an_unfinished_extraction_in_parts_is_continued_not_mixed(tmp_path):
    data = make_imageclef2023(tmp_path / "d", {"train": 14})
    cfg = dataclasses.replace(_cfg(data, tmp_path / "o"), records_per_file=8)
    folder = tmp_path / "o" / "d" / "tiny-clip"
    extract(dataclasses.replace(cfg, shard="0/2"))  # as if the run stopped after its first part
    with pytest.raises(ExtractError, match=r"an earlier extraction of split train in 2 parts with --batch-size 4 is "
                                           r"unfinished here; re-run it with the same --batch-size and --max-memory-gb"):
        extract(dataclasses.replace(cfg, batch_size=2))  # 7 batches of 2 in parts of 4: rows 0-8 and 8-14 no more
    assert not (folder / split_file("train")).exists()
    summary = extract(cfg)  # the same settings continue it
    assert summary.splits[0].status == "written in 2 parts, joined" and summary.splits[0].images == 14


def test_a_shard_left_empty_says_why_and_the_batch_size_it_names_fills_every_shard(tmp_path):
    """40 images, every split under one batch of the default 64: shard 0/2 gets no record of any split
    (a shard takes whole batches, so that the joined shards equal an unsharded extraction) and says so,
    once per split, naming the --batch-size that gives both shards about half."""
    from medembed.cli import main

    data = make_imageclef2023(tmp_path / "d", {"train": 24, "valid": 8, "test": 8})
    r = CliRunner().invoke(main, ["extract", "--data", str(data), "--backbone", "tiny-clip", "--out",
                                  str(tmp_path / "o"), "--workers", "0", "--shard", "0/2"])
    assert r.exit_code == 0, r.output
    notes = [x.strip() for x in r.output.splitlines() if "has no records" in x]
    assert notes == [
        "warning: split train: shard 0/2 has no records: its 24 records are 1 batch of --batch-size 64 and a shard "
        "takes whole batches, so that the joined shards equal an unsharded extraction bit for bit; --batch-size 12 "
        "or less gives every shard some",
        *(f"warning: split {s}: shard 0/2 has no records: its 8 records are 1 batch of --batch-size 64 and a shard "
          "takes whole batches, so that the joined shards equal an unsharded extraction bit for bit; --batch-size 4 "
          "or less gives every shard some" for s in ("valid", "test"))]
    halves = [extract(dataclasses.replace(_cfg(data, tmp_path / "half", shard=f"{i}/2"), batch_size=4)) for i in range(2)]
    for h in halves:
        assert [(s.split, s.records, s.images) for s in h.splits] == [("train", 12, 12), ("valid", 4, 4), ("test", 4, 4)]
        assert not any("has no records" in w for w in h.warnings)
    merged = merge_shards(tmp_path / "half" / "d" / "tiny-clip")
    assert sorted(load_split(p).n_images for p in merged) == [8, 8, 24]
    # more shards than a split has records, and several empty shards at once (as Ray reports them)
    one = extract(_cfg(make_imageclef2023(tmp_path / "one", {"train": 1}), tmp_path / "o1", shard="0/2"))
    assert one.warnings == ["split train: shard 0/2 has no records: its 1 record is 1 batch of --batch-size 4 and a "
                            "shard takes whole batches, so that the joined shards equal an unsharded extraction bit for "
                            "bit; it has fewer records than shards"]
    assert empty_shards_note("test", 454, 64, 16, list(range(8))).startswith(
        "split test: 8 of its 16 shards have no records: its 454 records are 8 batches of --batch-size 64")
