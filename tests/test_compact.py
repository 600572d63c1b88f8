"""Compact runs: the projection, the embeddings every consumer sees through it, its own query bank, and
the refusals that keep the source run and other folders as they are."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from medembed.adapt.compact import CompactError, fit_projection, make_compact
from medembed.adapt.config import AdaptConfig
from medembed.adapt.run import load_adapter_run
from medembed.adapt.trainer import train
from medembed.cache.reader import load_split
from medembed.common.tensors import unit
from tests.synthetic_features import write_synthetic_features


@pytest.fixture(scope="module")
def source_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("compact")
    features = write_synthetic_features(root / "features", n_train=300, n_eval=80, captions_per_image=2, latent=6)
    train(AdaptConfig(features_dir=str(features), out=str(root / "run"), head="linear", dim=16, ensemble=2, epochs=4),
          progress=False)
    return root / "run"


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_a_compact_run_embeds_through_the_projection_of_its_train_embeddings(source_run, tmp_path):
    before = _digests(source_run)
    run = load_adapter_run(source_run)
    assert run.dim == 32
    out = tmp_path / "run-6"
    done = make_compact(source_run, 6, out)
    assert _digests(source_run) == before  # the source run is left as it is
    small = load_adapter_run(out)
    assert small.dim == 6 and done.dims == 6 and done.source_dims == 32

    train_split = load_split(run.split_files()["train"])
    img, txt = run.embed_images(train_split.image_features), run.embed_texts(train_split.caption_features)
    # the map: the top eigenvectors of the second moment of the unit train embeddings, both sides together
    x = torch.cat([img, txt]).double()
    values, vectors = torch.linalg.eigh(x.T @ x)
    p, kept = fit_projection(run, 6)
    assert torch.allclose(p.T @ p, torch.eye(6), atol=1e-5)
    for j in range(6):  # each column spans the same direction as the j-th largest eigenvector
        assert abs(float(p[:, j].double() @ vectors[:, -1 - j])) == pytest.approx(1.0, abs=1e-5)
    assert kept == pytest.approx(float(values[-6:].sum() / values.sum()), rel=1e-6)
    assert 0.5 < kept < 1 and fit_projection(run, 3)[1] < kept  # a 6-d latent plus noise: most, not all
    # what every consumer gets: the source's unit embeddings through the map, normalised again
    assert torch.allclose(small.embed_images(train_split.image_features), unit(img @ p), atol=1e-5)
    assert torch.allclose(small.embed_texts(train_split.caption_features), unit(txt @ p), atol=1e-5)

    # its own query bank, chosen on valid for these embeddings; its summary says where it came from
    summary = json.loads((out / "summary.json").read_text())
    assert summary["compact"]["dims"] == 6 and summary["compact"]["from"] == str(source_run.resolve())
    assert json.loads((out / "querybank.json").read_text())["valid"] == summary["querybank"]["valid"]
    # its own valid recall (plain cosine), as the bank's choice measured it, not the source's
    assert summary["dim"] == 6
    assert summary["valid"]["mean_recall"] == pytest.approx(summary["querybank"]["valid_plain"]["mean_recall"], abs=1e-4)
    # and it keeps the source's retrieval on valid within a point
    assert summary["querybank"]["valid_plain"]["mean_recall"] >= \
        json.loads((source_run / "summary.json").read_text())["querybank"]["valid_plain"]["mean_recall"] - 1.0


def test_search_index_and_export_use_the_compact_embedding(source_run, tmp_path):
    from medembed.adapt.run_querybank import bank_offsets
    from medembed.serve.export import ExportOptions, export_embeddings
    from medembed.serve.index import IndexOptions, build_index
    from medembed.serve.search import Searcher

    out = tmp_path / "run-6"
    make_compact(source_run, 6, out)
    small = load_adapter_run(out)
    test = load_split(small.split_files()["test"])
    img = small.embed_images(test.image_features)
    exported = export_embeddings(out, ExportOptions(split="test", out=str(tmp_path / "export"), format="npy",
                                                    dtype="float32"))
    assert exported.dim == 6
    emb = np.load(Path(exported.out) / "img_emb" / "img_emb_0.npy")
    assert emb.shape == (test.n_images, 6) and np.allclose(emb, img.numpy(), atol=1e-6)

    _, meta = build_index(out, IndexOptions(kind="flat", split="test"))
    searcher = Searcher(str(out), split="test")
    assert searcher.index is not None
    offsets = bank_offsets(small)
    image_offset = offsets.images(img) if offsets is not None else torch.zeros(len(img))
    for q in range(5):  # through the index: the compact run's brute-force top 5, query bank included
        query = small.embed_texts(test.caption_features[q : q + 1])
        got = [h.image_id for h in searcher.images(query, k=5).hits]
        want = ((query @ img.T)[0] + image_offset).topk(5).indices.tolist()
        assert got == [test.image_ids[i] for i in want]


def test_refusals(source_run, tmp_path):
    with pytest.raises(CompactError, match="must be between 1 and the run's 32 dimensions"):
        make_compact(source_run, 32, tmp_path / "a")
    make_compact(source_run, 6, tmp_path / "b")
    with pytest.raises(CompactError, match="already a compact run"):
        make_compact(tmp_path / "b", 3, tmp_path / "c")
    with pytest.raises(FileExistsError, match="already holds a compact run; pass --overwrite"):
        make_compact(source_run, 4, tmp_path / "b")
    assert load_adapter_run(tmp_path / "b").dim == 6  # nothing replaced
    make_compact(source_run, 4, tmp_path / "b", overwrite=True)
    assert load_adapter_run(tmp_path / "b").dim == 4
    import shutil

    tuned = tmp_path / "tuned"
    shutil.copytree(source_run, tuned)
    (tuned / "finetuned.safetensors").write_bytes(b"")
    with pytest.raises(CompactError, match="carries fine-tuned towers"):
        make_compact(tuned, 6, tmp_path / "e")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    from medembed.cli import main

    r = CliRunner().invoke(main, ["compact", "--run", str(source_run), "--dims", "6", "--out", str(mine)])
    assert r.exit_code == 1 and "exists and is not an earlier compact run" in r.output and "Traceback" not in r.output
    assert (mine / "notes.txt").read_text() == "mine"
    r = CliRunner().invoke(main, ["compact", "--run", str(source_run), "--dims", "5", "--out", str(tmp_path / "d")])
    assert r.exit_code == 0, r.output
    assert "5 of 32 dimensions" in r.output and "second moment kept" in r.output


def test_a_compact_run_of_a_refit_run_chooses_with_its_projected_selection_heads(source_run, tmp_path):
    """The source refit on train + valid (the default): its selection heads come along, projected the
    same way, and valid chooses the compact run's bank and measures it through them, not through heads
    that trained on valid; eval chooses the concept detectors' settings with them too."""
    from medembed.adapt.run_querybank import calibrate
    from medembed.common.ranking import recall_summary
    from medembed.model.embedding import model_from_run

    assert "refit" in json.loads((source_run / "summary.json").read_text())
    make_compact(source_run, 6, tmp_path / "c")
    small = load_adapter_run(tmp_path / "c")
    chosen = small.selection()
    source_chosen = load_adapter_run(source_run).selection()
    valid = load_split(small.split_files()["valid"], with_views=False)
    projection = fit_projection(load_adapter_run(source_run), 6)[0]
    assert torch.allclose(chosen.embed_images(valid.image_features),
                          unit(source_chosen.embed_images(valid.image_features) @ projection), atol=1e-5)
    assert not torch.allclose(chosen.embed_images(valid.image_features), small.embed_images(valid.image_features))
    summary = json.loads((tmp_path / "c" / "summary.json").read_text())
    want = recall_summary(chosen.embed_images(valid.image_features), chosen.embed_texts(valid.caption_features),
                          valid.caption_image)
    assert summary["valid"] == pytest.approx(want) and summary["refit"]["epochs"] >= 1
    (tmp_path / "again").mkdir()
    again = calibrate(tmp_path / "again", run=chosen, splits=(small.split_files()["train"], valid))
    assert summary["querybank"]["setting"] == again["setting"]
    assert model_from_run(small).chooser is not None


def test_runs_shows_a_compact_run_of_a_refit_run_with_its_selection_heads_valid(source_run, tmp_path):
    """What `runs` ranks a compact run by: the valid recall of the source's selection heads, projected,
    named as such; a compact run saved before the selection heads came along (its valid measured through
    the refit heads, which trained on valid) is shown as not held out and ranked after it."""
    from medembed.evaluate.listing import find_runs, format_runs, sort_runs

    make_compact(source_run, 6, tmp_path / "now", progress=False)
    summary = json.loads((tmp_path / "now" / "summary.json").read_text())
    assert (summary["valid_heads"], summary["valid_held_out"]) == ("selection", True)
    old = tmp_path / "before"
    make_compact(source_run, 6, old, progress=False)
    (old / "selection.safetensors").unlink()  # as compact left a refit source's run before it carried them
    record = json.loads((old / "summary.json").read_text())
    for key in ("valid_heads", "valid_held_out"):
        record.pop(key)
    record["querybank"]["valid"]["mean_recall"] = 99.0  # whatever it says, it is not ranked above a held-out run
    (old / "summary.json").write_text(json.dumps(record))
    (old / "querybank.json").write_text(json.dumps(record["querybank"]))
    rows = sort_runs(find_runs(tmp_path), "valid")
    assert [r.name for r in rows] == ["now", "before"]
    now, before = rows
    assert (now.valid_source.heads, now.valid_source.held_out) == ("selection", True)
    assert now.valid == pytest.approx(summary["querybank"]["valid"]["mean_recall"])
    assert now.valid_plain == pytest.approx(summary["valid"]["mean_recall"])
    assert (before.valid_source.heads, before.valid_source.held_out) == ("best", False)
    assert "refit heads" in before.valid_source.why
    table = format_runs(rows)
    assert "best, not held out" in table and "(99.0)" in table


def test_compact_shows_its_progress_and_is_quiet_without(source_run, tmp_path, capsys):
    make_compact(source_run, 6, tmp_path / "a")
    err = capsys.readouterr().err
    rows = 300 + 600  # train images and captions, each embedded once
    assert "compact" in err and f"{rows}/{rows}" in err and "embedding the train split" in err
    assert "eigendecomposition of the 32 x 32 second moment" in err and "choosing the query bank on valid" in err
    make_compact(source_run, 6, tmp_path / "b", progress=False)
    assert capsys.readouterr().err == ""
