"""Extraction pipeline on tiny fixtures with the tiny random backbone: outputs, bad files, strict
mode, provenance refusal, concurrent writers, and crash-resume that matches an uninterrupted run."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from medembed.cache.lock import CacheBusy, writer_lock
from medembed.cache.provenance import ProvenanceMismatch
from medembed.cache.reader import load_split
from medembed.cache.schema import split_file
from medembed.extract.extraction import ExtractConfig, ExtractError, extract
from tests.conftest import REPO, make_imageclef2023

FEATURE_DATASETS = (
    "images/ids", "images/features", "captions/text", "captions/image_row", "captions/features",
    "concepts/ids", "concepts/indptr", "concepts/indices", "concepts/text_features", "skipped/ids",
)


def _cfg(data, out, **kw) -> ExtractConfig:
    return ExtractConfig(data=str(data), backbone="tiny-clip", out=str(out), batch_size=4, workers=0,
                         progress=False, **kw)


def _break_some_images(root: Path) -> dict[str, str]:
    imgs = root / "images"
    (imgs / "IMG_00001.jpg").write_bytes(b"")  # zero-byte
    data = (imgs / "IMG_00002.jpg").read_bytes()
    (imgs / "IMG_00002.jpg").write_bytes(data[: len(data) // 3])  # truncated
    (imgs / "IMG_00003.jpg").write_bytes(b"this is a text file, not a JPEG\n" * 20)  # not an image
    (imgs / "IMG_00005.jpg").unlink()  # missing
    return {"IMG_00001": "zero-byte", "IMG_00002": "truncated", "IMG_00003": "not an image", "IMG_00005": "missing"}


def test_extract_writes_every_split(tiny_dataset, tmp_path):
    summary = extract(_cfg(tiny_dataset, tmp_path / "out"))
    assert [s.split for s in summary.splits] == ["train", "valid"]
    tr = load_split(summary.splits[0].path)
    assert tr.n_images == 24 and tr.n_captions == 24
    assert tr.image_ids[:3] == ["IMG_00000", "IMG_00001", "IMG_00002"]
    assert tr.caption_image.tolist() == list(range(24))
    assert tr.captions[1] == "A green square, case 1."
    # vocabulary shared by splits: 4 colours + C0009999, names from cui_names.csv, unnamed -> ""
    assert tr.concept_ids == ["C0000001", "C0000002", "C0000003", "C0000004", "C0009999"]
    assert tr.concept_names[0] == "red colour" and tr.concept_names[4] == ""
    assert tr.concept_dense()[1].tolist() == [False, True, False, False, True]
    assert tr.concept_text_features.shape[:2] == (5, len(tr.templates))
    assert tr.concept_text_features[0].abs().sum() > 0  # named: encoded from "red colour" prompts
    assert tr.concept_text_features[4].abs().sum() == 0  # unnamed: zeros, flagged by its empty name
    a = tr.attrs
    assert a["backbone"] == "tiny-clip" and len(a["weights_sha256"]) == 64 and a["split"] == "train"
    for key in ("preprocess", "image_layer", "image_pooling", "text_layer", "dataset_fingerprint",
                "toolkit_version", "created", "data_root"):
        assert a[key], key
    with h5py.File(summary.splits[0].path) as f:
        assert f["images/features"].dtype == np.float16
        assert f["images/features"].attrs["pooling"] == a["image_pooling"]
    # raw features, not unit vectors
    assert not np.allclose(tr.image_features.norm(dim=1).numpy(), 1.0, atol=1e-3)
    assert not list((tmp_path / "out").rglob("*.parts"))
    # a second run finds the split up to date
    again = extract(_cfg(tiny_dataset, tmp_path / "out"))
    assert [s.status for s in again.splits] == ["up to date", "up to date"]


def test_bad_images_are_skipped_and_reported(tiny_dataset, tmp_path):
    expected = _break_some_images(tiny_dataset)
    summary = extract(_cfg(tiny_dataset, tmp_path / "out", splits=["train"]))
    s = summary.splits[0]
    got = {rid: reason for rid, _, reason in s.skipped}
    assert set(got) == set(expected)
    for rid, word in expected.items():
        assert word in got[rid], (rid, got[rid])
    tr = load_split(s.path)
    assert tr.n_images == 20 and "IMG_00002" not in tr.image_ids
    assert len(tr.captions) == 20  # captions of skipped images are left out with them
    with h5py.File(s.path) as f:
        assert sorted(x.decode() for x in f["skipped/ids"][()]) == sorted(expected)


def test_strict_stops_naming_file_and_keeps_finished_batches(tiny_dataset, tmp_path):
    (tiny_dataset / "images" / "IMG_00009.jpg").write_bytes(b"")
    with pytest.raises(ExtractError, match=r"IMG_00009\.jpg: record IMG_00009 \(zero-byte file\)"):
        extract(_cfg(tiny_dataset, tmp_path / "out", splits=["train"], strict=True))
    parts = tmp_path / "out" / "tiny" / "tiny-clip" / "train.parts"
    assert sorted(p.name for p in parts.glob("img_*.npz")) == ["img_000000.npz", "img_000001.npz"]


def test_refuses_other_provenance(tiny_dataset, tmp_path):
    extract(_cfg(tiny_dataset, tmp_path / "out", splits=["valid"]))
    with pytest.raises(ProvenanceMismatch, match="dtype: cache has float16, this run has float32"):
        extract(_cfg(tiny_dataset, tmp_path / "out", splits=["valid"], dtype="float32"))
    # same for leftover parts of an interrupted run
    (tiny_dataset / "valid_captions.csv").write_text(
        (tiny_dataset / "valid_captions.csv").read_text().replace("case 30", "case thirty"))
    os.remove(tmp_path / "out" / "tiny" / "tiny-clip" / split_file("valid"))
    parts = tmp_path / "out" / "tiny" / "tiny-clip" / "valid.parts"
    parts.mkdir()
    (parts / "manifest.json").write_text('{"provenance": {"dataset_fingerprint": "0000"}, "settings": {"batch_size": 4}}')
    with pytest.raises(ProvenanceMismatch, match="dataset_fingerprint: cache has 0000"):
        extract(_cfg(tiny_dataset, tmp_path / "out", splits=["valid"]))


def test_second_writer_refused(tmp_path):
    target = tmp_path / split_file("train")
    with writer_lock(target):
        with pytest.raises(CacheBusy, match="another extract is already writing"):
            with writer_lock(target):
                pass
    with writer_lock(target):  # released after the first finished
        pass


def test_unknown_split_and_cli_error(tiny_dataset, tmp_path):
    with pytest.raises(ExtractError, match="no split test"):
        extract(_cfg(tiny_dataset, tmp_path / "out", splits=["test"]))
    from medembed.cli import main

    r = CliRunner().invoke(main, ["extract", "--data", str(tiny_dataset), "--backbone", "tiny-clip",
                                  "--splits", "test", "--out", str(tmp_path / "o"), "--workers", "0"])
    assert r.exit_code == 1 and "no split test" in r.output


def _run_cli(data: Path, out: Path, kill_at: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("MEDEMBED_KILL_AT", None)
    if kill_at:
        env["MEDEMBED_KILL_AT"] = kill_at
    cmd = [sys.executable, str(REPO / "cli.py"), "extract", "--data", str(data), "--backbone", "tiny-clip",
           "--out", str(out), "--batch-size", "4", "--workers", "2", "--views", "2", "--splits", "train"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def _feature_bytes(path: Path) -> dict:
    def raw(ds):
        a = ds[()]
        return a.tolist() if a.dtype == object else a.tobytes()

    with h5py.File(path) as f:
        out = {k: raw(f[k]) for k in FEATURE_DATASETS}
        out["images/view_features"] = f["images/view_features"][()].tobytes()
        return out


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical(tmp_path):
    data = make_imageclef2023(tmp_path / "d", {"train": 30})
    (data / "images" / "IMG_00006.jpg").write_bytes(b"")  # one skipped file must survive resumes too
    clean = _run_cli(data, tmp_path / "clean")
    assert clean.returncode == 0, clean.stderr
    reference = _feature_bytes(tmp_path / "clean" / "d" / "tiny-clip" / split_file("train"))
    out = tmp_path / "crashy"
    final = out / "d" / "tiny-clip" / split_file("train")
    # die at several points in turn: after a batch, inside a part write, in the text phase,
    # with the finished file written but not renamed, and after the rename
    for point in ("img:2", "img-part:4", "capb:0", "capb:1", "con:0", "h5-tmp"):
        r = _run_cli(data, out, kill_at=point)
        assert r.returncode == -9, (point, r.returncode, r.stderr[-500:])
        assert not final.exists(), point
    r = _run_cli(data, out, kill_at="h5-final")
    assert r.returncode == -9 and final.exists()
    r = _run_cli(data, out)
    assert r.returncode == 0, r.stderr
    assert "up to date" in r.stdout and "skipped [train] IMG_00006: zero-byte file" in r.stdout
    assert _feature_bytes(final) == reference
    assert not (out / "d" / "tiny-clip" / "train.parts").exists()


def test_generic_csv_without_labels_several_captions(tmp_path):
    from PIL import Image

    root = tmp_path / "flickrish"
    (root / "images").mkdir(parents=True)
    rows = ["image,caption,split"]
    for i in range(5):
        Image.new("RGB", (40, 30), (i * 40, 90, 200 - i * 30)).save(root / "images" / f"p{i}.jpg")
        rows += [f"p{i}.jpg,first caption of {i},train", f"p{i}.jpg,second caption of {i},train"]
    (root / "captions.csv").write_text("\n".join(rows) + "\n")
    s = extract(_cfg(root, tmp_path / "out")).splits[0]
    tr = load_split(s.path)
    assert tr.n_images == 5 and tr.n_captions == 10
    assert tr.caption_image.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert tr.captions[3] == "second caption of 1"
    assert tr.concept_ids == [] and tr.concepts.shape == (5, 0)


@pytest.mark.parametrize("terminal", [True, False])
def test_the_steps_before_the_first_bar_are_named_on_a_terminal_only(tiny_dataset, tmp_path, capsys, monkeypatch,
                                                                     terminal):
    """Reading the dataset, comparing splits, building the backbone and preparing its image tower take
    seconds with no bar of their own: a terminal is told what runs; a log or a caller is not."""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: terminal)
    extract(ExtractConfig(data=str(tiny_dataset), backbone="tiny-clip", out=str(tmp_path / "f"), workers=0,
                          batch_size=16))
    err = capsys.readouterr().err
    steps = [f"extract: reading the dataset {tiny_dataset} ...", "extract: comparing the splits",
             "extract: building the backbone tiny-clip on cpu ...", "extract: preparing the image tower (--runtime auto)"]
    assert all(s in err for s in steps) == terminal, err
    assert any(s in err for s in steps) == terminal, err
    if terminal:  # in the order they run
        assert [err.index(s) for s in steps] == sorted(err.index(s) for s in steps)
