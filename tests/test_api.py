"""The notebook API on a tiny-clip run: what it returns equals what the command line computes; and
what search prints and returns says how each score was ranked (query bank or plain cosine)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import medembed
from medembed.adapt.config import AdaptConfig
from medembed.adapt.trainer import train
from medembed.cache.reader import load_split
from medembed.cache.schema import split_file
from medembed.serve.search import search as cli_search
from tests.conftest import tiny_clip_cache


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    cache = tiny_clip_cache(root, {"train": 24, "valid": 8, "test": 8})
    train(AdaptConfig(features_dir=str(cache), out=str(root / "run"), head="linear", dim=16, epochs=2, batch_size=8),
          progress=False)
    return root / "run"


def test_package_exposes_the_api_lazily():
    assert medembed.__version__ and callable(medembed.load_run) and callable(medembed.search)
    with pytest.raises(AttributeError):
        medembed.no_such_thing  # noqa: B018


def test_api_matches_the_command_line(run_dir, tmp_path):
    run = medembed.load_run(run_dir)
    test = load_split(run.features_dir / split_file("test"))
    # a caption of the cache embeds to the same vector the run gives its cached features
    emb = medembed.embed_texts(run, test.captions[:2])
    assert emb.shape == (2, 16 * 4) and torch.allclose(emb.norm(dim=1), torch.ones(2))  # 4 heads of dim 16
    assert torch.allclose(emb, run.embed_texts(test.caption_features[:2]), atol=2e-2)
    image = run.features_dir.parents[1].parent / "data" / test.image_locations[0]
    assert torch.allclose(medembed.embed_images(run, [image]), run.embed_images(test.image_features[:1]), atol=2e-2)
    hits = medembed.search(run, test.captions[0], k=3, split="test")
    want = cli_search(run_dir, text=test.captions[0], k=3, split="test").hits
    assert [h.image_id for h in hits] == [h.image_id for h in want]
    columns = medembed.evaluate_run(run, split="test", out_dir=tmp_path / "ev", sections=("retrieval",), examples=0,
                                closed_form=False, progress=False)
    assert set(columns) == {"chance", "run"} and columns["run"]["pool_images"] == 8


def test_a_single_text_or_image_is_one_item_not_a_sequence(run_dir):
    from PIL import Image

    run = medembed.load_run(run_dir)
    test = load_split(run.features_dir / split_file("test"))
    one = medembed.embed_texts(run, "axial CT")
    assert one.shape == (1, run.dim) and torch.allclose(one, medembed.embed_texts(run, ["axial CT"]))
    image = run.features_dir.parents[1].parent / "data" / test.image_locations[0]
    listed = medembed.embed_images(run, [image])
    for single in (image, str(image), Image.open(image).convert("RGB")):
        assert torch.allclose(medembed.embed_images(run, single), listed, atol=1e-6)


def test_empty_inputs_are_refused_by_name(run_dir):
    run = medembed.load_run(run_dir)
    with pytest.raises(ValueError, match="texts: empty"):
        medembed.embed_texts(run, [])
    with pytest.raises(ValueError, match="images: empty"):
        medembed.embed_images(run, [])


def test_search_keeps_one_searcher_per_run_and_split(run_dir, monkeypatch):
    from medembed import api

    built = []

    class CountingSearcher(api.Searcher):
        def __init__(self, *args, **kwargs):
            built.append(kwargs.get("split", args[1] if len(args) > 1 else None))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(api, "Searcher", CountingSearcher)
    run = medembed.load_run(run_dir)
    first = medembed.search(run, "A red square.", k=3, split="test")
    again = medembed.search(run, "A red square.", k=3, split="test")
    assert [h.image_id for h in first] == [h.image_id for h in again] and built == ["test"]
    medembed.search(run, "A blue square.", k=3, split="test")
    medembed.search(run, "A blue square.", k=3, split="valid")  # another pool: its own searcher, once
    medembed.search(run, "A grey square.", k=3, split="valid")
    assert built == ["test", "valid"]


def test_search_falls_back_to_an_exact_scan_when_the_index_returns_too_few(run_dir, tmp_path):
    import shutil

    from medembed.serve.index import IndexOptions, build_index
    from medembed.serve.search import Searcher

    copy = Path(shutil.copytree(run_dir, tmp_path / "run"))
    build_index(copy, IndexOptions(split="test", kind="ivf", nlist=3, nprobe=1))  # one of 3 cells scanned
    run = medembed.load_run(copy)
    query = "A green square."
    searcher = Searcher(run, "test")
    short = searcher.images(searcher.embed_text(query), 8)
    assert short.via == "ivf index" and len(short.hits) < 8  # what the index alone gives
    with pytest.warns(UserWarning, match=rf"ivf index returned {len(short.hits)} of the 8 images .* exactly"):
        hits = medembed.search(run, query, k=100000, split="test")
    exact = searcher.images(searcher.embed_text(query), 8, exact=True)
    assert [h.image_id for h in hits] == [h.image_id for h in exact.hits] and len(hits) == 8
    # the index path projects only its hits to give their cosines: the same as the exact scan's
    cosine = {h.image_id: h.cosine for h in exact.hits}
    assert [h.cosine for h in short.hits] == pytest.approx([cosine[h.image_id] for h in short.hits], abs=1e-5)


# ------------------------------------------------------------------ what a search score is


def _with_bank(run_dir: Path, out: Path) -> Path:
    """A copy of the run ranking with an active query bank (as calibrate writes it), whatever tiny-data
    valid chose: beta 0.5 on the 3 nearest train captions / images."""
    import json
    import shutil

    from medembed.common.querybank import BankSide, QueryBank

    copy = Path(shutil.copytree(run_dir, out))
    config = json.loads((copy / "config.json").read_text())
    setting = QueryBank(BankSide(3, 0.5), BankSide(3, 0.5), "train", config["features_dir"])
    valid = {"mean_recall": 50.0}
    (copy / "querybank.json").write_text(json.dumps({"setting": setting.to_dict(), "description": setting.describe(),
                                                     "valid_plain": valid, "valid": valid}))
    return copy


def _printed_rows(output: str) -> tuple[str, list[list[str]]]:
    lines = output.strip().splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("rank"))
    return lines[header], [line.split() for line in lines[header + 1:] if not line.startswith("note")]


def test_search_labels_bank_scores_and_prints_the_true_cosine(run_dir, tmp_path):
    from click.testing import CliRunner

    from medembed.cli import main
    from medembed.model.embedding import model_from_run

    bank_dir = _with_bank(run_dir, tmp_path / "bank")
    run = medembed.load_run(bank_dir)
    test = load_split(run.features_dir / split_file("test"))
    query = test.captions[0]
    res = CliRunner().invoke(main, ["search", "--run", str(bank_dir), "--text", query, "-k", "4", "--split", "test"])
    assert res.exit_code == 0, res.output
    header, rows = _printed_rows(res.output)
    assert "score (cos − β·hub)" in header and "  cosine  " in header and "ranked by cos − β·hub" in header
    assert "query-bank normalisation" in header and len(rows) == 4
    q = medembed.embed_texts(run, query)[0]
    img = run.embed_images(test.image_features)
    offset, _ = model_from_run(run).offsets(img, None)
    for _rank, score, image_id, cosine, *_ in rows:
        row = test.image_ids.index(image_id)
        assert float(cosine) == pytest.approx(float(img[row] @ q), abs=1e-4)
        assert float(score) == pytest.approx(float(img[row] @ q + offset[row]), abs=1e-4)
    assert any(abs(float(r[1]) - float(r[3])) > 1e-3 for r in rows)  # the two columns really differ
    # the API's hits carry both, named
    hits = medembed.search(run, query, k=4, split="test")
    assert [h.image_id for h in hits] == [r[2] for r in rows]
    for h in hits:
        assert h.cosine == pytest.approx(float(img[h.image_row] @ q), abs=1e-5)
        assert h.score == pytest.approx(h.cosine + float(offset[h.image_row]), abs=1e-5)
    # an image query ranks captions with the caption side of the bank, labelled the same way
    image = run.features_dir.parents[1].parent / "data" / test.image_locations[0]
    res = CliRunner().invoke(main, ["search", "--run", str(bank_dir), "--image", str(image), "-k", "3", "--split", "test"])
    header, rows = _printed_rows(res.output)
    assert res.exit_code == 0 and "score (cos − β·hub)" in header and "  cosine  " in header, res.output
    txt = run.embed_texts(test.caption_features)
    q_img = medembed.embed_images(run, image)[0]
    for row in rows:  # rank, score, image, cosine, caption words
        c = test.captions.index(" ".join(row[4:]))
        assert float(row[3]) == pytest.approx(float(txt[c] @ q_img), abs=1e-4)


def test_search_without_a_bank_labels_its_scores_cosine(run_dir, tmp_path):
    import shutil

    from click.testing import CliRunner

    from medembed.cli import main

    plain_dir = Path(shutil.copytree(run_dir, tmp_path / "plain"))
    (plain_dir / "querybank.json").unlink(missing_ok=True)  # as --no-querybank leaves a run
    run = medembed.load_run(plain_dir)
    test = load_split(run.features_dir / split_file("test"))
    res = CliRunner().invoke(main, ["search", "--run", str(plain_dir), "--text", test.captions[1], "-k", "3",
                                    "--split", "test"])
    assert res.exit_code == 0, res.output
    header, rows = _printed_rows(res.output)
    assert "score (cosine)" in header and "β" not in header and "ranked by plain cosine" in header
    q = medembed.embed_texts(run, test.captions[1])[0]
    img = run.embed_images(test.image_features)
    for _rank, score, image_id, *_ in rows:
        assert float(score) == pytest.approx(float(img[test.image_ids.index(image_id)] @ q), abs=1e-4)
    assert all(h.score == pytest.approx(h.cosine, abs=1e-6) for h in medembed.search(run, test.captions[1], k=3,
                                                                                    split="test"))


def test_printed_cells_stay_on_one_line():
    from medembed.serve.search import Hit, SearchResult, format_results

    hits = [Hit(1, 0.155, 0.468, "IMG\n1", "first line\nsecond\tline\r\n  end", "test", 0, "a.jpg"),
            Hit(2, 0.1, 0.4, "IMG2", "plain", "test", 1, "b.jpg")]
    text = format_results(SearchResult(hits, "images", "exact scan", 2, ["a note\nover lines"], "cos − β·hub", "qb"))
    lines = text.splitlines()
    assert len(lines) == 4 and lines[-1] == "note: a note over lines"
    assert "first line second line end" in lines[1] and "IMG 1" in lines[1]
    assert lines[1].split()[:2] == ["1", "0.1550"] and "0.4680" in lines[1]
