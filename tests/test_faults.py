"""Hostile conditions during extraction: a full disk, a second writer, decompression bombs,
hand-made non-images. Each ends in a clear message or a skip-and-report, losing nothing finished."""
from __future__ import annotations

import errno
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from medembed.cache.lock import writer_lock
from medembed.cache.parts import PartStore
from medembed.cache.reader import load_split
from medembed.cache.schema import split_file
from medembed.extract.extraction import ExtractConfig, ExtractError, extract
from tests.conftest import REPO, make_imageclef2023


def _cfg(data, out, **kw) -> ExtractConfig:
    return ExtractConfig(data=str(data), backbone="tiny-clip", out=str(out), batch_size=4, workers=0,
                         progress=False, **kw)


def test_full_disk_is_a_clear_error_and_keeps_earlier_work(tmp_path, monkeypatch):
    data = make_imageclef2023(tmp_path / "d", {"train": 12, "valid": 12})
    out = tmp_path / "o"
    extract(_cfg(data, out, splits=["train"]))
    train_h5 = out / "d" / "tiny-clip" / split_file("train")
    before = train_h5.read_bytes()

    real_put = PartStore.put
    calls = {"n": 0}

    def put_until_full(self, kind, index, **arrays):
        calls["n"] += 1
        if calls["n"] > 2:  # the third batch finds the disk full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path(kind, index)))
        return real_put(self, kind, index, **arrays)

    monkeypatch.setattr(PartStore, "put", put_until_full)
    with pytest.raises(ExtractError, match=r"img_000002\.npz: No space left on device; 2 finished image batches are kept"):
        extract(_cfg(data, out, splits=["valid"]))
    assert train_h5.read_bytes() == before  # the earlier cache is intact
    parts = out / "d" / "tiny-clip" / "valid.parts"
    assert sorted(p.name for p in parts.iterdir()) == ["img_000000.npz", "img_000001.npz", "manifest.json"]
    monkeypatch.setattr(PartStore, "put", real_put)
    s = extract(_cfg(data, out, splits=["valid"])).splits[0]  # space is back: the run continues
    assert s.status == "resumed" and s.images == 12


def test_second_concurrent_extract_refuses(tmp_path):
    """The test process plays the first writer (holding the lock exactly as a running extract does),
    so the second process always meets it mid-run, however fast the machine is."""
    data = make_imageclef2023(tmp_path / "d", {"train": 6})
    out = tmp_path / "o"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [sys.executable, str(REPO / "cli.py"), "extract", "--data", str(data), "--backbone", "tiny-clip",
           "--out", str(out), "--workers", "0"]
    final = out / "d" / "tiny-clip" / split_file("train")
    with writer_lock(final):
        second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 1
    assert "another extract is already writing this cache" in second.stderr
    assert str(final) in second.stderr
    assert not final.exists()
    after = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert after.returncode == 0, after.stderr
    assert load_split(final).n_images == 6


def test_decompression_bomb_and_disguised_files_are_skipped(tmp_path):
    data = make_imageclef2023(tmp_path / "d", {"train": 8})
    imgs = data / "images"
    Image.new("1", (12_000, 12_000)).save(imgs / "IMG_00001.jpg", format="PNG")  # 144 Mpx, a few kB on disk
    assert (imgs / "IMG_00001.jpg").stat().st_size < 100_000
    (imgs / "IMG_00002.jpg").write_bytes(b"%PDF-1.4\n" + bytes(np.arange(256, dtype=np.uint8)) * 8)
    s = extract(_cfg(data, tmp_path / "o")).splits[0]
    reasons = {rid: why for rid, _, why in s.skipped}
    assert reasons["IMG_00001"].startswith("decompression bomb (12000 x 12000 pixels exceeds")
    assert reasons["IMG_00002"] == "not an image (unrecognised format)"
    assert s.images == 6
