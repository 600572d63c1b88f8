"""Every misuse of eval, search, extract and adapt that a user has met ends in a one-line message
naming the flag, file or record, a non-zero exit, no traceback, and nothing half-made or lost.
Each test is one row of the RELIABILITY table in BENCHMARKS.md."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from medembed.adapt.config import AdaptConfig
from medembed.adapt.trainer import train
from medembed.cache.schema import split_file
from medembed.cli import main
from tests.conftest import make_imageclef2023
from tests.synthetic_features import correlated_split, write_cache, write_synthetic_features


def _invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def _one_line_error(res, exit_code: int = 1) -> str:
    assert res.exit_code == exit_code, res.output
    assert "Traceback" not in res.output
    assert not isinstance(res.exception, Exception) or isinstance(res.exception, SystemExit), repr(res.exception)
    lines = [x for x in res.output.strip().splitlines() if x.startswith("Error")]
    assert len(lines) == 1, res.output
    return lines[0]


@pytest.fixture(scope="module")
def two_pools(tmp_path_factory) -> dict[str, Path]:
    """Two trained runs on different synthetic datasets (pools of 60 and 40 test images)."""
    root = tmp_path_factory.mktemp("pools")
    a = write_synthetic_features(root / "features" / "a", n_train=160, n_eval=60, n_concepts=4, image_dim=20, text_dim=12)
    b = root / "features" / "b"
    for i, (name, n) in enumerate((("train", 160), ("valid", 40), ("test", 40))):
        split = correlated_split(n, seed=10 + i, split=name, n_concepts=4, image_dim=20, text_dim=12, world_seed=99)
        split.attrs["dataset"] = "other-synthetic"
        write_cache(split, b / split_file(name))
    for name, features in (("run-a", a), ("run-b", b)):
        train(AdaptConfig(features_dir=str(features), out=str(root / name), head="cca", dim=8), progress=False)
    return {"a": root / "run-a", "b": root / "run-b", "root": root}


def test_comparing_runs_on_different_pools_is_refused_before_anything_is_written(two_pools):
    a, b = two_pools["a"], two_pools["b"]
    res = _invoke("eval", "--run", a, "--skip", "fewshot,detection", "--examples", "0")
    assert res.exit_code == 0, res.output
    earlier = {p.name: p.read_bytes() for p in (a / "eval-test").iterdir()}
    res = _invoke("eval", "--run", a, "--run", b, "--skip", "fewshot,detection", "--examples", "0")
    line = _one_line_error(res)
    assert "run-a and run-b are scored on different pools" in line
    assert "dataset synthetic vs other-synthetic" in line and "pool 60 images" in line and "--cross" in line
    assert not (a / "eval-test-vs-run-b").exists()
    assert {p.name: p.read_bytes() for p in (a / "eval-test").iterdir()} == earlier  # nothing touched


def test_cross_table_scores_each_run_on_its_own_pool(two_pools, tmp_path):
    a, b = two_pools["a"], two_pools["b"]
    res = _invoke("eval", "--run", a, "--run", b, "--cross", "--skip", "fewshot,detection", "--examples", "0",
                  "--out", tmp_path / "cross", "-k", "1,5,50")
    assert res.exit_code == 0, res.output
    comparison = json.loads((tmp_path / "cross" / "comparison.json").read_text())
    cols = comparison["columns"]
    assert set(cols) == {"chance [synthetic/synthetic]", "closed-form [synthetic/synthetic]", "run-a",
                         "chance [other-synthetic/synthetic]", "closed-form [other-synthetic/synthetic]", "run-b"}
    assert comparison["pools"]["run-a"]["pool_images"] == 60 and comparison["pools"]["run-b"]["pool_images"] == 40
    # each chance column is its own pool's: R@1 = 1/60 and 1/40; K=50 is capped at the smaller pool (40)
    assert cols["chance [synthetic/synthetic]"]["t2i_R@1"] == pytest.approx(100 / 60)
    assert cols["chance [other-synthetic/synthetic]"]["t2i_R@1"] == pytest.approx(100 / 40)
    assert "t2i_R@40" in cols["run-a"] and "capped at R@40" in res.output
    assert (tmp_path / "cross" / "recall_at_k.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("command", ["eval", "search"])
def test_a_file_that_is_not_a_run_is_named(two_pools, tmp_path, command):
    readme = tmp_path / "README.md"
    readme.write_text("# not a run\n")
    for bad in (readme, two_pools["a"] / "config.json"):
        extra = ["--text", "a scan"] if command == "search" else []
        line = _one_line_error(_invoke(command, "--run", bad, *extra))
        assert str(bad) in line and "not a run" in line


def test_a_safetensors_file_that_is_not_a_checkpoint_is_named(tmp_path):
    fake = tmp_path / "x.safetensors"
    fake.write_bytes(b"\xff" * 64)
    line = _one_line_error(_invoke("eval", "--run", fake))
    assert str(fake) in line and "not a readable safetensors checkpoint" in line


def test_search_refuses_empty_text_and_non_images(two_pools, tmp_path):
    line = _one_line_error(_invoke("search", "--run", two_pools["a"], "--text", "   "))
    assert "--text: the query is empty" in line
    not_image = tmp_path / "notes.jpg"
    not_image.write_text("these are notes, not pixels")
    line = _one_line_error(_invoke("search", "--run", two_pools["a"], "--image", not_image))
    assert str(not_image) in line and "not an image (unrecognised format)" in line and "BytesIO" not in line


class _CachedCaptions:
    """A backbone stand-in: a caption of the cache encodes to its cached features."""

    def __init__(self, split):
        self.features = dict(zip(split.captions, split.caption_features))

    def encode_texts(self, texts):
        return torch.stack([self.features[t] for t in texts])


def test_search_caps_k_and_says_when_an_approximate_index_falls_short(two_pools, tmp_path):
    import shutil

    from medembed.cache.reader import load_split
    from medembed.serve.index import IndexOptions, build_index
    from medembed.serve.search import format_results, search

    run_dir = Path(shutil.copytree(two_pools["a"], tmp_path / "run", ignore=shutil.ignore_patterns("eval-*")))
    test = load_split(json.loads((run_dir / "config.json").read_text())["features_dir"] + "/test.h5")
    backbone = _CachedCaptions(test)
    capped = search(run_dir, text=test.captions[0], k=1000, split="test", backbone=backbone)
    assert len(capped.hits) == 60 and capped.notes == ["-k 1000 is more than the 60 images in the pool: all 60 are returned"]
    # one of 3 ivf cells scanned: the index cannot return 50 hits and says so; --exact can
    build_index(run_dir, IndexOptions(split="test", kind="ivf", nlist=3, nprobe=1))
    short = search(run_dir, text=test.captions[0], k=50, split="test", backbone=backbone)
    assert short.via == "ivf index" and len(short.hits) < 50
    assert f"the ivf index returned {len(short.hits)} of the 50 images asked for" in short.notes[0]
    assert "--exact" in format_results(short)
    exact = search(run_dir, text=test.captions[0], k=50, split="test", backbone=backbone, use_index=False)
    assert exact.via == "exact scan" and len(exact.hits) == 50 and exact.notes == []


def test_adapt_refuses_options_the_head_ignores_and_leaves_no_folder(two_pools, tmp_path):
    features = json.loads((two_pools["a"] / "config.json").read_text())["features_dir"]
    out = tmp_path / "cca"
    line = _one_line_error(_invoke("adapt", "--features", features, "--head", "cca", "--loss", "margin",
                                   "--epochs", "3", "--batch-size", "7", "--out", out))
    for flag in ("--loss", "--epochs", "--batch-size"):
        assert f"{flag} has no effect on --head cca" in line
    assert not out.exists()
    line = _one_line_error(_invoke("adapt", "--features", features, "--loss", "margin", "--temperature", "0.05",
                                   "--out", out))
    assert "--temperature is the InfoNCE temperature" in line and not out.exists()
    # and a cca run records no loss it never used
    res = _invoke("adapt", "--features", features, "--head", "cca", "--dim", "8", "--out", out)
    assert res.exit_code == 0, res.output
    assert json.loads((out / "config.json").read_text())["loss"] is None


def test_adapt_bad_values_and_resume_of_nothing(two_pools, tmp_path):
    features = json.loads((two_pools["a"] / "config.json").read_text())["features_dir"]
    res = _invoke("adapt", "--features", features, "--lr", "-1", "--out", tmp_path / "neg")
    assert res.exit_code == 2 and "--lr" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "neg").exists()
    line = _one_line_error(_invoke("adapt", "--resume", "--out", tmp_path / "nope"))
    assert f"--resume: {tmp_path / 'nope'} holds no run to continue" in line
    assert not (tmp_path / "nope").exists()
    with pytest.raises(ValueError, match="lr must be > 0"):
        AdaptConfig(features_dir=features, out=str(tmp_path / "x"), lr=0.0)


def test_dataset_folder_names_keep_their_letters_and_never_collide(tmp_path):
    from medembed.extract.extraction import ExtractConfig, extract

    outs = {}
    for name in ("胸部", "Flickr ü 画像", "Flickr ñ"):
        data = make_imageclef2023(tmp_path / "data" / name, {"train": 4, "valid": 2})
        summary = extract(ExtractConfig(data=str(data), backbone="tiny-clip", out=str(tmp_path / "f"), workers=0,
                                        progress=False))
        outs[name] = Path(summary.out_dir)
    assert outs["胸部"] == tmp_path / "f" / "胸部" / "tiny-clip"
    assert outs["Flickr ü 画像"].parent.name.startswith("Flickr_ü_画像-")
    assert outs["Flickr ñ"].parent.name.startswith("Flickr_ñ-")
    assert len({p.parent for p in outs.values()}) == 3
    for p in outs.values():
        assert (p / split_file("train")).exists() and (p / split_file("valid")).exists()
