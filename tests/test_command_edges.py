"""Commands at their edges. A damaged cache under a run with an index is named as damaged: `search`
says which file and dataset (not "stale index", which sends the user to the wrong file), and `relink`
reads a folder through its checksums and NaN/Inf checks before it points a run at it. An existing
index is replaced only with --overwrite, and a stale index's message names the command that does it
(reading a pool's folder as it was read); an explicitly named kind is refused before `--data` is
encoded, and retrained heads are reported without reading the caches. `export` without --split takes
a pool's only split."""
from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from medembed.adapt import checkpoint as ckpt
from medembed.adapt.config import AdaptConfig
from medembed.adapt.run import load_adapter_run, read_querybank
from medembed.adapt.trainer import train
from medembed.cache.reader import CacheError
from medembed.cache.schema import split_file
from medembed.cli import main
from medembed.serve import index as index_module
from medembed.serve.index import IndexOptions, StaleIndexError, build_index, index_paths, load_index
from tests.conftest import make_imageclef2023, tiny_clip_cache


def _invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _one_line_error(result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


@pytest.fixture(scope="module")
def indexed_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("damaged")
    cache = tiny_clip_cache(root, {"train": 16, "valid": 8, "test": 8})
    train(AdaptConfig(features_dir=str(cache), out=str(root / "run"), head="linear", dim=16, epochs=1, batch_size=8),
          progress=False)
    assert read_querybank(root / "run").images.active  # the index records the bank, as relink rewrites it
    build_index(root / "run", IndexOptions(kind="flat"))
    return root


def _flip_features(path) -> None:
    """Bytes flipped inside the first stored chunk of the image features: its checksum no longer matches."""
    with h5py.File(path, "r") as f:
        info = f["images/features"].id.get_chunk_info(0)
    with open(path, "r+b") as fh:
        fh.seek(info.byte_offset + info.size // 2)
        data = fh.read(32)
        fh.seek(info.byte_offset + info.size // 2)
        fh.write(bytes(b ^ 0xFF for b in data))


def _nan_features(path) -> None:
    """A NaN written through HDF5 by something else: the checksum is valid, the feature is not."""
    with h5py.File(path, "r+") as f:
        ds = f["images/features"]
        row = ds[5]
        row[3] = np.nan
        ds[5] = row


@pytest.mark.parametrize(("damage", "reason"), [(_flip_features, "Fletcher-32 checksum does not match"),
                                                (_nan_features, "holds 1 non-finite values")], ids=["flipped", "nan"])
def test_search_and_relink_name_the_damaged_cache_file_and_dataset(indexed_run, tmp_path, damage, reason):
    run = tmp_path / "run"
    shutil.copytree(indexed_run / "run", run)
    moved = tmp_path / "moved" / "tiny-clip"
    shutil.copytree(indexed_run / "features" / "data" / "tiny-clip", moved)
    assert _invoke("relink", "--run", run, "--features", moved).exit_code == 0  # the intact copy is taken
    damage(moved / split_file("test"))

    line = _one_line_error(_invoke("search", "--run", run, "--text", "a red square"))
    assert f"{moved / 'test.h5'}: dataset images/features" in line and reason in line, line
    assert "stale index" not in line and "querybank.json" not in line

    config = (run / "config.json").read_text()
    copy = tmp_path / "copy" / "tiny-clip"
    shutil.copytree(moved, copy)
    refused = _one_line_error(_invoke("relink", "--run", run, "--features", copy))
    assert f"{copy / 'test.h5'}: dataset images/features" in refused and reason in refused, refused
    assert "provenance checked" not in refused
    assert (run / "config.json").read_text() == config  # nothing re-pointed
    assert json.loads(config)["features_dir"] == str(moved.resolve())


# ------------------------------------------------------------------------------ an index is replaced only when asked


def test_an_index_is_refused_unless_overwrite_which_swaps_the_new_one_in_whole(indexed_run, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(indexed_run / "run", run)
    faiss_path, json_path = index_paths(run, "all", "flat")
    before = (faiss_path.read_bytes(), json_path.read_bytes())
    bank = json.loads((run / "querybank.json").read_text())
    bank["setting"]["images"]["k"] = 5  # another query bank: the index no longer matches the run
    (run / "querybank.json").write_text(json.dumps(bank))
    for kind in ("flat", "auto"):  # auto plans flat for this pool: the same index
        line = _one_line_error(_invoke("index", "--run", run, "--kind", kind))
        assert line == (f"Error: {faiss_path}: already holds a flat index of the all split; pass --overwrite to "
                        "replace it (swapped in whole once the new one is built)"), line
    assert (faiss_path.read_bytes(), json_path.read_bytes()) == before

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(index_module, "fill_index", broken)  # a rebuild that fails keeps the earlier index whole
    with pytest.raises(OSError, match="disk full"):
        build_index(run, IndexOptions(kind="flat", overwrite=True))
    assert (faiss_path.read_bytes(), json_path.read_bytes()) == before
    monkeypatch.undo()
    with pytest.raises(ValueError, match="query bank .* changed"):
        load_index(run)
    result = _invoke("index", "--run", run, "--kind", "flat", "--overwrite")
    assert result.exit_code == 0, result.output
    assert load_index(run)[1].querybank["images"]["k"] == 5  # rebuilt with the run as it is now
    assert sorted(p.name for p in faiss_path.parent.iterdir()) == ["all-flat.faiss", "all-flat.json"]


def _hinted(error: Exception, data: Path | None = None) -> list[str]:
    """The arguments of the command a stale-index message says rebuilds the index (`--data DATA/NAME`
    filled in with `data`)."""
    hint = str(error).splitlines()[-1]
    assert hint.startswith("rebuild it with: python cli.py index "), str(error)
    args = shlex.split(hint.split("python cli.py ", 1)[1])
    return [str(data) if a.startswith("DATA/") and data is not None else a for a in args]


def test_a_stale_index_names_the_command_that_replaces_it(indexed_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(indexed_run / "run", run)
    bank = json.loads((run / "querybank.json").read_text())
    bank["setting"]["images"]["k"] = 5
    (run / "querybank.json").write_text(json.dumps(bank))
    with pytest.raises(StaleIndexError, match="query bank .* changed") as e:
        load_index(run)
    args = _hinted(e.value)
    assert args[-1] == "--overwrite", args  # `index` refuses to replace an index without it
    result = _invoke(*args)
    assert result.exit_code == 0, result.output
    assert load_index(run)[1].querybank["images"]["k"] == 5


def _photos(tmp_path: Path) -> Path:
    """An image-only folder of three coloured squares, p0.png .. p2.png."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, colour in enumerate([(220, 30, 30), (30, 200, 40), (30, 40, 220)]):
        Image.new("RGB", (30, 30), colour).save(photos / f"p{i}.png")
    return photos


def test_a_pools_rebuild_hint_reads_its_folder_as_it_was_read_and_a_named_kind_is_refused_first(indexed_run, tmp_path):
    photos = _photos(tmp_path)
    run, features = tmp_path / "run", tmp_path / "features"
    shutil.copytree(indexed_run / "run", run)
    reading = {"data": str(photos), "features_root": str(features), "follow_links": True, "readable_paths": True}
    faiss_path, _ = build_index(run, IndexOptions(kind="flat", **reading))
    json_path = faiss_path.with_suffix(".json")
    caches = sorted(features.rglob("*.h5"))
    assert caches and "p0.png" in load_index(run, pool="photos", bank=None)[1].image_ids  # readable paths as ids
    meta = json.loads(json_path.read_text())
    json_path.write_text(json.dumps({**meta, "heads_sha256": "0" * 64}))  # as after retraining
    with pytest.raises(StaleIndexError, match="heads .* changed") as e:
        load_index(run, pool="photos", bank=None)
    args = _hinted(e.value, photos)
    assert {"--follow-links", "--readable-paths", "--overwrite"} <= set(args), args
    assert args[args.index("--features-root") + 1] == str(features.resolve())
    result = _invoke(*args)
    assert result.exit_code == 0, result.output
    assert sorted(features.rglob("*.h5")) == caches  # the same encoding, not the folder encoded again
    assert load_index(run, pool="photos", bank=None)[1].heads_sha256 != "0" * 64

    elsewhere = tmp_path / "elsewhere"  # an existing index of a named kind is refused before --data is encoded
    line = _one_line_error(_invoke("index", "--run", run, "--kind", "flat", "--data", photos, "--features-root",
                                   elsewhere, "--readable-paths"))
    assert line.startswith(f"Error: {faiss_path}: already holds a flat index of the all split of photos; "), line
    assert not elsewhere.exists()


def test_retrained_heads_over_a_damaged_cache_are_reported_without_reading_the_caches(indexed_run, tmp_path,
                                                                                      monkeypatch):
    """Stale heads are the usual reason after retraining; verifying every cache file then would read
    the whole pool (tens of GB) to say "stale". The damage surfaces when the index is rebuilt."""
    root = tmp_path / "copy"
    shutil.copytree(indexed_run, root)  # run and features together: the run finds this copy of its cache
    run = root / "run"
    _nan_features(root / "features" / "data" / "tiny-clip" / split_file("test"))
    heads = load_adapter_run(run)
    with torch.no_grad():
        next(heads.image_head.parameters()).add_(0.01)
    ckpt.save_heads(run / ckpt.BEST, heads.image_head, heads.text_head)
    verified = []
    monkeypatch.setattr(index_module, "verify_cache", lambda path: verified.append(path))
    with pytest.raises(StaleIndexError, match=r"stale index(.|\n)*heads \(best.safetensors\) changed") as e:
        load_index(run)
    assert verified == [] and "querybank" not in str(e.value)
    monkeypatch.undo()
    with pytest.raises(CacheError, match="test.h5: dataset images/features"):  # the rebuild names the damage
        build_index(run, IndexOptions(kind="flat", overwrite=True))


# ------------------------------------------------------------------------------ export takes a pool's only split


def test_export_without_a_split_takes_the_pools_only_split(indexed_run, tmp_path):
    photos = _photos(tmp_path)
    run, features = indexed_run / "run", tmp_path / "features"
    result = _invoke("export", "--run", run, "--data", photos, "--features-root", features, "--out", tmp_path / "ex")
    assert result.exit_code == 0, result.output
    assert re.search(rf"exported 3 rows x \d+ dims in 1 partition\(s\) as npy to {re.escape(str(tmp_path / 'ex'))}\n",
                     result.output), result.output
    assert json.loads((tmp_path / "ex" / "export.json").read_text())["split"] == "all"
    own = _invoke("export", "--run", run, "--out", tmp_path / "own")  # the run's own cache: test, as before
    assert own.exit_code == 0 and "exported 8 rows" in own.output, own.output
    two = make_imageclef2023(tmp_path / "two-splits", {"train": 2, "valid": 2})
    refused = _one_line_error(_invoke("export", "--run", run, "--data", two, "--features-root", features))
    assert refused == (f"Error: {two}: no test split to export by default (splits: train, valid); name one with "
                       "--split, or --split all"), refused
    assert not (features / "two-splits").exists()  # refused before anything was encoded
