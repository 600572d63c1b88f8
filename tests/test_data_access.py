"""What a dataset may read (`extract.access`): resolved paths stay inside the data folder unless links
are followed, refusals are counted with their reason, ids never hold `..` or an absolute part, and
the page reads a pool image only under the rule its cache was extracted with."""
from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from PIL import Image

from medembed.adapt.config import AdaptConfig
from medembed.adapt.trainer import train
from medembed.cache.provenance import ProvenanceMismatch
from medembed.cache.reader import SplitHeader, load_split, read_attrs
from medembed.cache.schema import split_file
from medembed.cli import main
from medembed.extract.access import LINK_OUTSIDE, NOT_REGULAR, DataAccess, name_problem, walk
from medembed.extract.datasets import load_dataset
from medembed.extract.datasets.frames import expand_frames
from medembed.extract.extraction import ExtractConfig, extract
from medembed.extract.records import Dataset, Record
from medembed.serve.page import ServeLimits, create_app
from medembed.serve.pool import SearchPool
from medembed.serve.search import Searcher
from tests.conftest import make_imageclef2023


def _jpeg(path: Path, colour=(200, 40, 40)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (24, 20), colour).save(path, format="JPEG")
    return path


def _extract(data: Path, out: Path, **kw):
    return extract(ExtractConfig(data=str(data), backbone="tiny-clip", out=str(out), workers=0, progress=False,
                                 batch_size=4, **kw))


def test_names_that_leave_their_folder_are_unsafe():
    for name in ("../../evil.jpg", "a/../../b.png", "/etc/passwd", "\\\\server\\share\\x.png", "C:\\x.png",
                 "..\\..\\evil.jpg", "", "a\0b"):
        assert name_problem(name), name
    for name in ("k1.jpg", "train/00001.jpg", "a..b.png", ".hidden/x.png", "1.2.840.10008.dcm"):
        assert name_problem(name) is None, name


def test_an_image_folder_reads_no_link_out_of_it_unless_links_are_followed(tmp_path):
    secret = _jpeg(tmp_path / "elsewhere" / "private.jpg", (10, 220, 10))
    folder = tmp_path / "images"
    for i in range(3):
        _jpeg(folder / "scans" / f"img{i}.jpg", (60 * i, 90, 120))
    os.symlink(secret, folder / "scans" / "img9.jpg")  # a file link leading out
    os.symlink(tmp_path / "elsewhere", folder / "more")  # a folder link leading out
    os.symlink(folder / "scans" / "img0.jpg", folder / "alias.jpg")  # a link that stays inside: read
    os.mkfifo(folder / "scans" / "pipe.jpg")  # would block whoever opens it
    out = tmp_path / "features"
    summary = _extract(folder, out, readable_paths=True)
    (split,) = summary.splits
    cached = load_split(split.path)
    assert sorted(cached.image_ids) == ["alias.jpg", "scans/img0.jpg", "scans/img1.jpg", "scans/img2.jpg"]
    assert split.skipped == []
    assert summary.refused[0] == "not read: 3 (2 link outside the data folder, 1 not a regular file)"
    assert sorted(summary.refused[1:]) == [f"not read: more: {LINK_OUTSIDE}", f"not read: scans/img9.jpg: {LINK_OUTSIDE}",
                                           f"not read: scans/pipe.jpg: {NOT_REGULAR}"]
    assert "data_access" not in read_attrs(split.path)
    # following links reads both, records it, and never mixes into the cache made without
    with pytest.raises(ProvenanceMismatch, match="data_access: cache has None, this run has follow-links"):
        _extract(folder, out, readable_paths=True, follow_links=True)
    followed = _extract(folder, tmp_path / "followed", readable_paths=True, follow_links=True)
    ids = load_split(followed.splits[0].path).image_ids
    assert {"scans/img9.jpg", "more/private.jpg"} <= set(ids) and read_attrs(followed.splits[0].path)["data_access"] == \
        "follow-links"
    assert followed.refused == ["not read: 1 (1 not a regular file)", f"not read: scans/pipe.jpg: {NOT_REGULAR}"]


def test_a_folder_link_cycle_ends_when_links_are_followed(tmp_path):
    folder = tmp_path / "data"
    _jpeg(folder / "a" / "x.jpg")
    outside = tmp_path / "out"
    _jpeg(outside / "y.jpg")
    os.symlink(outside, folder / "a" / "to_out")
    os.symlink(folder, outside / "back")  # out/back -> data: a cycle through the link
    rels = [e.rel for e in walk(str(folder), follow_links=True)]
    assert rels == ["a/x.jpg", "a/to_out/y.jpg"]


def _tar(path: Path, members: list[tuple[str, bytes | str]]) -> Path:
    """Members (name, bytes) or symlinks (name, "->target")."""
    with tarfile.open(path, "w") as tf:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            if isinstance(payload, str):
                info.type, info.linkname = tarfile.SYMTYPE, payload.removeprefix("->")
                tf.addfile(info)
            else:
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
    return path


def test_tar_members_named_outside_or_linked_are_counted_not_read(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (24, 20), (30, 60, 200)).save(buf, format="JPEG")
    jpeg = buf.getvalue()
    data = tmp_path / "shards"
    data.mkdir()
    _tar(data / "shard-00000.tar", [
        ("k1.jpg", jpeg), ("k1.txt", b"a blue square"), ("k2.jpg", jpeg), ("k2.txt", b"another blue square"),
        ("../../evil.jpg", jpeg), ("../../evil.txt", b"an escaped caption"),
        ("k3.jpg", "->/etc/hostname"), ("k3.txt", b"a linked image")])
    dataset = load_dataset(data)
    assert [r.image_id for r in dataset.records] == ["shard-00000/k1", "shard-00000/k2"]
    assert not any(".." in r.image_id or ".." in r.image for r in dataset.records)
    result = CliRunner().invoke(main, ["extract", "--data", str(data), "--backbone", "tiny-clip", "--workers", "0",
                                       "--out", str(tmp_path / "f"), "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    assert "not read: 3 (2 unsafe name, 1 link member)" in result.output
    assert "not read: shard-00000.tar::../../evil.jpg: unsafe name (a '..' part)" in result.output
    assert "not read: shard-00000.tar::k3.jpg: link member (a tar's links are not read)" in result.output


def test_annotation_paths_are_read_only_inside_and_named_below_the_folder(tmp_path):
    secret = _jpeg(tmp_path / "elsewhere" / "private.jpg")
    data = tmp_path / "data"
    _jpeg(data / "images" / "a.jpg")
    _jpeg(data / "images" / "b.jpg", (20, 200, 20))
    os.symlink(secret, data / "images" / "c.jpg")
    (data / "captions.csv").write_text(f"image,caption\nimages/sub/../a.jpg,a red square\n{data / 'images/b.jpg'},"
                                       "a green square\nimages/c.jpg,a linked square\n")
    dataset = load_dataset(data)
    assert [r.image_id for r in dataset.records] == ["images/a.jpg", "images/b.jpg", "images/c.jpg"]
    summary = _extract(data, tmp_path / "f")
    (split,) = summary.splits
    assert split.images == 2 and [(i, why) for i, _, why in split.skipped] == [("images/c.jpg", LINK_OUTSIDE)]
    assert "1 link outside the data folder" in CliRunner().invoke(
        main, ["extract", "--data", str(data), "--backbone", "tiny-clip", "--workers", "0",
               "--out", str(tmp_path / "f")]).output  # counted per reason in the summary, also when up to date


def test_the_page_serves_no_image_that_became_a_link_out_of_the_data_folder(tmp_path):
    data = make_imageclef2023(tmp_path / "data", {"train": 8, "valid": 4, "test": 4})
    summary = _extract(data, tmp_path / "features")
    train(AdaptConfig(features_dir=summary.out_dir, out=str(tmp_path / "run"), head="linear", dim=8, epochs=1,
                      batch_size=8), progress=False)
    client = TestClient(create_app(Searcher(tmp_path / "run", split="test"), ServeLimits()))
    assert client.get("/api/image/test:1").status_code == 200
    cached = load_split(Path(summary.out_dir) / split_file("test"))
    target = Path(cached.image_path(1))
    secret = _jpeg(tmp_path / "elsewhere" / "private.jpg")
    target.unlink()
    os.symlink(secret, target)  # the folder changed after extraction: its image now leads out
    refused = client.get("/api/image/test:1")
    assert refused.status_code == 404 and refused.json() == {"error": f"test:1: image not readable ({LINK_OUTSIDE})"}
    assert client.get("/api/image/test:2").status_code == 200


def test_reading_flags_need_a_data_folder(tmp_path):
    result = CliRunner().invoke(main, ["search", "--run", str(tmp_path), "--text", "x", "--follow-links"])
    assert result.exit_code == 2 and "--follow-links says how --data is read: give --data too" in result.output
    result = CliRunner().invoke(main, ["export", "--run", str(tmp_path), "--readable-paths"])
    assert result.exit_code == 2 and "--readable-paths says how --data is read" in result.output


def test_the_rule_is_made_once_per_dataset_and_per_pool_split_not_per_image(tmp_path, monkeypatch):
    """Making a rule resolves the data folder (a realpath walk up its parents): done per record when
    frames were expanded, and per request by the page."""
    made = []
    real = DataAccess.__post_init__

    def counting(self) -> None:
        made.append(self.root)
        real(self)

    monkeypatch.setattr(DataAccess, "__post_init__", counting)
    records = [Record(f"r{i}", str(_jpeg(tmp_path / "data" / f"r{i}.jpg")), ("a caption",), (), "train") for i in range(6)]
    dataset = Dataset("d", str(tmp_path / "data"), "generic", records)
    assert len(expand_frames(dataset, "all").records) == 6
    assert made == [str(tmp_path / "data")]

    made.clear()
    header = SplitHeader("test", tmp_path / split_file("test"), 6, 6, 8, 8, 2, np.arange(6), {"data_root": str(tmp_path / "data")})
    pool = SearchPool([header])
    rules = [pool.access("test") for _ in range(10)] + [pool.access(0) for _ in range(10)]
    assert all(rule is rules[0] for rule in rules) and rules[0].refusal(records[0].image) is None
    assert made == [str(tmp_path / "data")]
