"""Nothing lost, nothing silently wrong: one writer per output folder (a race ends in one result and
one clear refusal, never a silent loss), checksummed caches (a flipped byte, NaN/Inf or a truncated
file stops every command with one line naming the file and dataset), and finished runs that keep
only what they need."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from medembed.adapt.config import AdaptConfig
from medembed.adapt.trainer import train
from medembed.cache.reader import CacheError, load_split
from medembed.cache.schema import FORMAT, split_file
from medembed.cache.writer import write_split
from medembed.cli import main
from medembed.common.files import TargetChanged, folder_state, replace_folder, staging_folder
from medembed.common.locks import TargetBusy, exclusive, lock_path
from tests.synthetic_features import correlated_split, write_cache, write_synthetic_features

REPO = Path(__file__).resolve().parents[1]


def _invoke(*args) -> object:
    return CliRunner().invoke(main, [str(a) for a in args])


def _one_line_error(res) -> str:
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output
    lines = [x for x in res.output.strip().splitlines() if x.startswith("Error")]
    assert len(lines) == 1, res.output
    return lines[0]


@pytest.fixture(scope="module")
def cca_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("integrity")
    features = write_synthetic_features(root / "features", n_train=120, n_eval=40, captions_per_image=2)
    train(AdaptConfig(features_dir=str(features), out=str(root / "run"), head="cca", dim=8), progress=False)
    return root / "run"


# ------------------------------------------------------------------------------ one writer per folder
def test_a_second_writer_is_refused_while_the_first_holds_the_folder(tmp_path):
    target = tmp_path / "out"
    with exclusive(target, "eval"):
        assert lock_path(target).exists()
        with pytest.raises(TargetBusy, match="another eval is already writing"):
            with exclusive(target, "eval"):
                pass
    assert not lock_path(target).exists()
    with exclusive(target, "eval"):  # released after the first finished
        pass


def test_a_swap_into_a_folder_that_changed_since_the_check_is_refused_and_keeps_both(tmp_path):
    final = tmp_path / "eval-test"
    state = folder_state(final)  # checked: not there yet
    work = staging_folder(final)
    (work / "mine.json").write_text("{}")
    final.mkdir()  # someone else wrote it meanwhile
    (final / "theirs.json").write_text("{}")
    with pytest.raises(TargetChanged, match="changed while this command ran"):
        replace_folder(work, final, state)
    assert (final / "theirs.json").exists() and (work / "mine.json").exists()


_EVAL = ["--split", "test", "--no-closed-form", "--skip", "zeroshot,fewshot,detection", "--examples", "0"]


def test_eval_into_a_folder_another_eval_is_writing_is_refused_in_one_line(cca_run, tmp_path):
    out = tmp_path / "ev"
    with exclusive(out, "eval"):
        line = _one_line_error(_invoke("eval", "--run", cca_run, "--out", out, *_EVAL))
    assert "another eval is already writing" in line and str(out) in line
    assert not out.exists()


def test_export_into_a_folder_another_export_is_writing_is_refused(cca_run, tmp_path):
    out = tmp_path / "ex"
    with exclusive(out, "export"):
        line = _one_line_error(_invoke("export", "--run", cca_run, "--out", out))
    assert "another export is already writing" in line
    assert _invoke("export", "--run", cca_run, "--out", out).exit_code == 0
    again = _one_line_error(_invoke("export", "--run", cca_run, "--out", out))  # an earlier export is kept
    assert "already holds an export" in again and "--overwrite" in again
    assert _invoke("export", "--run", cca_run, "--out", out, "--overwrite").exit_code == 0


def _race(cmds: list[list[str]]) -> list[subprocess.CompletedProcess]:
    env = dict(os.environ, PYTHONPATH=str(REPO.parent), HF_HUB_OFFLINE="1")
    procs = [subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in cmds]
    return [subprocess.CompletedProcess(p.args, p.wait(timeout=300), *p.communicate()) for p in procs]


@pytest.mark.slow
@pytest.mark.parametrize("command", ["eval", "export"])
def test_two_writers_started_together_leave_one_result_and_one_clear_refusal(cca_run, tmp_path, command):
    out = tmp_path / command
    extra = _EVAL if command == "eval" else []
    cmd = [sys.executable, str(REPO / "cli.py"), command, "--run", str(cca_run), "--out", str(out), *extra]
    done = _race([cmd, cmd])
    ok = [p for p in done if p.returncode == 0]
    refused = [p for p in done if p.returncode != 0]
    assert len(ok) == 1 and len(refused) == 1, [(p.returncode, p.stderr[-300:]) for p in done]
    err = refused[0].stderr.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in refused[0].stderr
    assert "already writing" in err[0] or "already holds" in err[0], err
    marker = "comparison.json" if command == "eval" else "export.json"
    assert (out / marker).exists()  # the winner's output is whole and in place
    assert not list(tmp_path.glob(f".{command}.partial-*"))


# ------------------------------------------------------------------------------ checksummed caches
def _features_chunk(path: Path, name: str = "images/features") -> tuple[int, int]:
    with h5py.File(path, "r") as f:
        info = f[name].id.get_chunk_info(0)
        return info.byte_offset, info.size


def _flip(path: Path, offset: int, n: int = 64) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        data = bytearray(fh.read(n))
        fh.seek(offset)
        fh.write(bytes(b ^ 0xFF for b in data))


@pytest.fixture
def features(tmp_path) -> Path:
    return write_synthetic_features(tmp_path / "features", n_train=120, n_eval=40)


def test_caches_are_written_with_checksums_and_the_current_format(features):
    with h5py.File(features / split_file("train"), "r") as f:
        assert f.attrs["format"] == FORMAT
        for name in ("images/features", "captions/features", "captions/image_row", "concepts/indptr"):
            assert f[name].fletcher32, name


def test_flipped_bytes_in_the_features_stop_training_with_the_file_and_dataset_named(features, tmp_path):
    offset, size = _features_chunk(features / split_file("train"))
    _flip(features / split_file("train"), offset + size // 2)
    with pytest.raises(CacheError, match="images/features is damaged"):
        load_split(features / split_file("train"))
    line = _one_line_error(_invoke("adapt", "--features", features, "--out", tmp_path / "run", "--epochs", "1"))
    assert "train.h5" in line and "images/features" in line and "cli.py extract" in line
    assert "Fletcher-32 checksum does not match" in line
    assert not (tmp_path / "run" / "summary.json").exists()


def test_non_finite_features_are_refused_when_written_and_when_read(features, tmp_path):
    split = load_split(features / split_file("test"))
    split.image_features[3, 1] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        write_split(tmp_path / "bad.h5", split, dtype="float32")
    assert not (tmp_path / "bad.h5").exists() and not list(tmp_path.glob("bad.h5*"))
    split.image_features[3, 1] = 1e6  # finite in float32, Inf once stored as float16
    with pytest.raises(ValueError, match="non-finite"):
        write_split(tmp_path / "bad.h5", split, dtype="float16")
    with h5py.File(features / split_file("test"), "r+") as f:  # written by something else: NaN with a valid checksum
        ds = f["captions/features"]
        row = ds[0]
        row[0] = np.inf
        ds[0] = row
    with pytest.raises(CacheError, match="captions/features holds 1 non-finite"):
        load_split(features / split_file("test"))


def test_a_truncated_cache_gives_one_line_for_adapt_as_for_every_command(features, tmp_path):
    path = features / split_file("train")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    line = _one_line_error(_invoke("adapt", "--features", features, "--out", tmp_path / "run", "--epochs", "1"))
    assert str(path) in line and "not a readable HDF5 cache" in line


def test_a_cache_of_a_newer_format_is_refused_with_what_to_do(features):
    with h5py.File(features / split_file("valid"), "r+") as f:
        f.attrs["format"] = "medembed-cache/99"
    with pytest.raises(CacheError, match="medembed-cache/99.*upgrade medembed"):
        load_split(features / split_file("valid"))


# ------------------------------------------------------------------------------ what a finished run keeps
def test_a_finished_run_keeps_its_best_weights_only_unless_asked(features, tmp_path):
    base = dict(features_dir=str(features), epochs=2, ensemble=1, dim=16, batch_size=32)
    train(AdaptConfig(out=str(tmp_path / "lean"), **base), progress=False)
    assert (tmp_path / "lean" / "best.safetensors").exists()
    assert not (tmp_path / "lean" / "last.safetensors").exists()
    summary = json.loads((tmp_path / "lean" / "summary.json").read_text())
    assert summary["created"].startswith("20")
    train(AdaptConfig(out=str(tmp_path / "kept"), keep_last=True, **base), progress=False)
    assert (tmp_path / "kept" / "last.safetensors").exists()


def test_weight_files_are_as_readable_as_the_rest_of_the_run(features, tmp_path):
    train(AdaptConfig(features_dir=str(features), out=str(tmp_path / "run"), epochs=1, ensemble=1, dim=16,
                      batch_size=32), progress=False)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "run").iterdir() if p.is_file()}
    assert modes["best.safetensors"] == modes["config.json"] == modes["summary.json"], modes


# ------------------------------------------------------------------------------ runs that can move
def _eval_ok(run: Path, out: Path) -> dict:
    res = _invoke("eval", "--run", run, "--out", out, *_EVAL)
    assert res.exit_code == 0, res.output
    return json.loads(next(out.glob("metrics-*.json")).read_text())["metrics"]


@pytest.mark.parametrize("querybank", [True, False])
def test_a_run_moved_with_its_features_still_finds_them(tmp_path, querybank):
    root = tmp_path / "project"
    features = write_synthetic_features(root / "features" / "syn", n_train=120, n_eval=40)
    train(AdaptConfig(features_dir=str(features), out=str(root / "runs" / "r"), epochs=2, ensemble=1, dim=16,
                      batch_size=32, querybank=querybank), progress=False)
    before = _eval_ok(root / "runs" / "r", tmp_path / "ev-before")
    moved = tmp_path / "elsewhere" / "project"
    moved.parent.mkdir()
    shutil.move(root, moved)
    # a different cache now lies where the absolute paths point: the moved run must not rank with it
    for i, (name, n) in enumerate((("train", 120), ("valid", 40), ("test", 40))):
        write_cache(correlated_split(n, seed=20 + i, split=name, world_seed=99), root / "features" / "syn" / split_file(name))
    after = _eval_ok(moved / "runs" / "r", tmp_path / "ev-after")
    assert after["t2i_R@1"] == before["t2i_R@1"] and after["i2t_R@10"] == before["i2t_R@10"]


def test_a_moved_features_folder_is_named_with_relink_and_relink_checks_provenance(tmp_path):
    features = write_synthetic_features(tmp_path / "features" / "syn", n_train=120, n_eval=40)
    run = tmp_path / "runs" / "r"
    train(AdaptConfig(features_dir=str(features), out=str(run), epochs=2, ensemble=1, dim=16, batch_size=32),
          progress=False)
    before = _eval_ok(run, tmp_path / "ev-before")
    new = tmp_path / "archive" / "syn"
    new.parent.mkdir()
    shutil.move(features, new)
    line = _one_line_error(_invoke("eval", "--run", run, "--out", tmp_path / "ev-lost", *_EVAL))
    assert "is not there" in line and "cli.py relink" in line and "cli.py extract first" not in line

    other = write_synthetic_features(tmp_path / "other", n_train=120, n_eval=40, image_dim=24)  # other widths
    refused = _one_line_error(_invoke("relink", "--run", run, "--features", other))
    assert "not the features this run was trained on (feature widths" in refused
    same_shape = tmp_path / "same-shape"
    shutil.copytree(new, same_shape)
    for path in same_shape.glob("*.h5"):
        with h5py.File(path, "r+") as f:
            f.attrs["dataset"] = "another-dataset"
    refused = _one_line_error(_invoke("relink", "--run", run, "--features", same_shape))
    assert "not the features this run was trained on (dataset:" in refused
    assert _invoke("relink", "--run", run, "--features", new).exit_code == 0
    assert json.loads((run / "config.json").read_text())["features_dir"] == str(new.resolve())
    bank = json.loads((run / "querybank.json").read_text())["setting"]["bank_features"]
    assert bank == str(new.resolve())
    after = _eval_ok(run, tmp_path / "ev-after")
    assert after["t2i_R@5"] == before["t2i_R@5"] and after["i2t_R@5"] == before["i2t_R@5"]


def test_image_locations_resolve_after_data_and_features_move_together(tmp_path):
    from tests.conftest import tiny_clip_cache

    root = tmp_path / "proj"
    cache = tiny_clip_cache(root, {"train": 4})
    moved = tmp_path / "moved"
    shutil.move(root, moved)
    split = load_split(moved / cache.relative_to(root) / split_file("train"))
    assert split.attrs["data_root"].startswith(str(root))  # the absolute record is stale ...
    assert Path(split.image_path(0)).is_file()  # ... the relative one finds the image
    assert Path(split.image_path(0)).is_relative_to(moved)


# ------------------------------------------------------------------------------ train/test leakage
def _leaky(tmp_path: Path) -> Path:
    from tests.conftest import make_imageclef2023

    root = make_imageclef2023(tmp_path / "leaky", {"train": 6, "test": 3})
    test_csv = root / "test_captions.csv"
    test_csv.write_text(test_csv.read_text() + 'IMG_00001,"A green square seen again."\n')  # a train image
    return root


def test_an_image_in_two_splits_is_refused_at_extract_naming_it(tmp_path):
    line = _one_line_error(_invoke("extract", "--data", _leaky(tmp_path), "--backbone", "tiny-clip", "--out",
                                   tmp_path / "f", "--workers", "0"))
    assert "1 image is in more than one split" in line
    assert "id IMG_00001 in train+test" in line and "--allow-split-overlap" in line
    assert not (tmp_path / "f").exists() or not list((tmp_path / "f").rglob("*.h5"))


def test_one_file_under_two_ids_in_two_splits_is_found():
    from medembed.extract.records import Dataset, Record

    ds = Dataset("d", "/d", "generic", [Record("a", "/d/x.png", ("c",), (), "train"),
                                       Record("b", "/d/x.png", ("c",), (), "test"),
                                       Record("c", "/d/y.png", ("c",), (), "test")])
    assert ds.split_overlaps() == [("file /d/x.png", ("train", "test"))]


def test_an_allowed_overlap_is_extracted_with_a_loud_warning(tmp_path):
    res = _invoke("extract", "--data", _leaky(tmp_path), "--backbone", "tiny-clip", "--out", tmp_path / "f",
                  "--workers", "0", "--allow-split-overlap")
    assert res.exit_code == 0, res.output
    assert "warning:" in res.output and "IMG_00001" in res.output and "inflated" in res.output


# ------------------------------------------------------------------------------ closed form fitted once
def test_the_closed_form_baseline_is_fitted_once_per_cache_and_reused(cca_run, tmp_path, monkeypatch):
    from medembed.adapt import closed_form_store
    from medembed.evaluate.pipeline import EvalOptions, run_eval

    fits = []
    real = closed_form_store.fit_cca_on_valid
    monkeypatch.setattr(closed_form_store, "fit_cca_on_valid", lambda *a, **k: fits.append(1) or real(*a, **k))
    options = dict(sections=("retrieval",), examples=0, progress=False)
    first = run_eval([cca_run], out_dir=tmp_path / "a", options=EvalOptions(**options))
    second = run_eval([cca_run], out_dir=tmp_path / "b", options=EvalOptions(**options))
    assert len(fits) == 1
    assert first["columns"]["closed-form"] == second["columns"]["closed-form"]
    features = Path(json.loads((cca_run / "config.json").read_text())["features_dir"])
    stored = list((features / "closed-form").glob("*.safetensors"))
    assert len(stored) == 1
    report = (tmp_path / "b" / "report.md").read_text()
    assert f"reused from {stored[0]}" in report
    # a changed cache is a new key: fitted again, never the stale fit
    other = closed_form_store.store_key(load_split(features / split_file("train")), load_split(features / split_file("valid")), 99)
    assert other != stored[0].stem


def test_a_rollback_deletes_only_a_cache_its_cycle_wrote(tmp_path):
    import os
    import time

    from medembed.adapt.tuning.unfreeze import written_since

    folder = tmp_path / "cache"
    folder.mkdir()
    assert not written_since(folder, time.time())  # nothing written: nothing to delete
    old = folder / split_file("train")
    old.write_bytes(b"x")
    os.utime(old, (time.time() - 3600, time.time() - 3600))  # found in place, written an hour ago
    assert not written_since(folder, time.time())
    before = time.time()
    (folder / split_file("valid")).write_bytes(b"x")
    os.utime(old, None)
    assert written_since(folder, before)


def test_a_failed_export_leaves_no_staging_folder(cca_run, tmp_path, monkeypatch):
    from medembed.serve import export as export_module

    def broken(*args, **kwargs):
        raise CacheError("test.h5: dataset images/features is damaged")

    monkeypatch.setattr(export_module, "load_split_rows", broken)  # the cache read of a chunk fails
    with pytest.raises(CacheError):
        export_module.export_embeddings(cca_run, export_module.ExportOptions(out=str(tmp_path / "ex")))
    assert not list(tmp_path.glob(".ex.partial-*")) and not (tmp_path / "ex").exists()


def test_runs_ignores_outputs_that_were_never_swapped_in(cca_run, tmp_path):
    from medembed.evaluate.listing import find_runs

    project = tmp_path / "runs"
    shutil.copytree(cca_run, project / "r")
    aside = project / "r" / ".eval-test.partial-123"
    aside.mkdir()
    (aside / "metrics-r.json").write_text(json.dumps({"split": "test", "run_ref": str(project / "r"),
                                                      "created": "2999", "metrics": {"t2i_R@10": 99.0}}))
    (rows,) = find_runs(project)
    assert rows.test is None
