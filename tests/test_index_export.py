"""FAISS indexes of adapted embeddings and the clip-retrieval style export, on tiny caches.

Exactness is checked against brute-force numpy, approximate kinds by recall@10 against exact search
on clustered vectors, staleness by changing the cache or the heads under a built index, and the
export by reading every file back and matching rows to the cache ids, captions and embeddings.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import faiss
import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from medembed.adapt import checkpoint as ckpt
from medembed.adapt.config import AdaptConfig
from medembed.adapt.run import AdaptedRun, load_adapter_run
from medembed.adapt.trainer import train
from medembed.cache.reader import CachedSplit, load_split
from medembed.cache.schema import split_file
from medembed.cache.writer import write_split
from medembed.serve.export import ExportOptions, export_embeddings
from medembed.serve.index import (
    IndexOptions,
    StaleIndexError,
    build_index,
    index_paths,
    load_index,
    search_index,
)
from tests.synthetic_features import write_synthetic_features

pytest.importorskip("pyarrow", reason="parquet files need pyarrow")


def _write_cache(path: Path, feats: np.ndarray, ids: list[str], captions_per_image: int = 1,
                 fingerprint: str = "fp-1") -> Path:
    n = feats.shape[0]
    rows = np.repeat(np.arange(n), captions_per_image)
    split = CachedSplit(
        split=path.stem, attrs={"backbone": "toy", "dataset": "toy", "dataset_fingerprint": fingerprint, "split": path.stem},
        image_ids=ids, image_locations=[f"images/{i}.png" for i in ids], image_features=torch.from_numpy(feats),
        captions=[f"caption {k} of {ids[r]}" for k, r in enumerate(rows)], caption_image=torch.from_numpy(rows),
        caption_features=torch.from_numpy(feats[rows]))
    return write_split(path, split, dtype="float32")


def _identity_run(run_dir: Path, features_dir: Path, dim: int) -> AdaptedRun:
    """A run whose heads only normalise: its embeddings are the unit raw features."""
    config = {"features_dir": str(features_dir), "dim": dim, "backbone": "toy", "head": "identity"}
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(config))
    return AdaptedRun(run_dir, config, nn.Identity(), nn.Identity())


def _clustered(n: int, dim: int, clusters: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    x = centres[rng.integers(0, clusters, n)] + 0.35 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _brute_top(db: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-(q @ db.T), axis=1, kind="stable")[:, :k]


@pytest.fixture(scope="module")
def cca_run(tmp_path_factory) -> Path:
    """A real closed-form run on a synthetic cache (two captions per image)."""
    root = tmp_path_factory.mktemp("idx")
    features = write_synthetic_features(root / "features", n_train=160, n_eval=60, captions_per_image=2)
    train(AdaptConfig(features_dir=str(features), out=str(root / "run"), head="cca", dim=12), progress=False)
    return root / "run"


# ------------------------------------------------------------------ search and kinds

def test_search_index_hand_computed_scores(tmp_path):
    index = faiss.IndexFlatIP(2)
    s = np.sqrt(0.5)
    index.add(np.array([[1, 0], [0, 1], [s, s]], dtype=np.float32))
    scores, rows = search_index(index, torch.tensor([[1.0, 0.0], [0.0, 1.0]]), k=5)  # k capped at 3
    assert rows.tolist() == [[0, 2, 1], [1, 2, 0]]
    np.testing.assert_allclose(scores, [[1, s, 0], [1, s, 0]], atol=1e-6)
    with pytest.raises(ValueError, match="dimension 3"):
        search_index(index, np.ones((1, 3), np.float32), k=1)


def test_flat_index_is_exact_top_k(cca_run):
    path, meta = build_index(cca_run, IndexOptions(split="test", kind="flat"))
    assert path == cca_run / "index" / "test-flat.faiss" and meta.ntotal == 60 and meta.dim == 12
    run = load_adapter_run(cca_run)
    split = load_split(Path(run.features_dir) / split_file("test"))
    assert meta.image_ids == split.image_ids
    index, _ = load_index(cca_run, "test", "flat")
    db = run.embed_images(split.image_features).numpy()
    q = run.embed_texts(split.caption_features).numpy()
    scores, rows = search_index(index, q, k=10)
    np.testing.assert_array_equal(rows, _brute_top(db, q, 10))
    np.testing.assert_allclose(scores, np.take_along_axis(q @ db.T, rows, 1), atol=1e-5)
    # the run's own captions find their image first far above chance (1/60)
    top1 = (rows[:, 0] == split.caption_image.numpy()).mean()
    assert top1 > 0.5


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_kinds_recall_at_10(tmp_path, kind):
    feats = _clustered(3000, 32, clusters=40, seed=0)
    features = tmp_path / "features"
    _write_cache(features / split_file("test"), feats, [f"img{i:05d}" for i in range(len(feats))])
    run = _identity_run(tmp_path / "run", features, 32)
    _, meta = build_index(run.run_dir, IndexOptions(split="test", kind=kind, m=16), run=run)
    if kind == "ivf":
        assert meta.params["nlist"] == 55 and meta.params["nprobe"] == 16  # min(sqrt(3000), 3000 // 39); max(16, 55/16)
    rng = np.random.default_rng(1)
    q = feats[rng.choice(len(feats), 200, replace=False)] + 0.05 * rng.standard_normal((200, 32)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    index, _ = load_index(run.run_dir, "test", kind)
    _, rows = search_index(index, q, k=10)
    exact = _brute_top(feats, q, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows.tolist(), exact.tolist())])
    assert recall >= 0.9


def test_ivf_rejects_more_cells_than_vectors(tmp_path):
    features = tmp_path / "features"
    _write_cache(features / split_file("test"), _clustered(50, 8, 4, 0), [f"i{i}" for i in range(50)])
    run = _identity_run(tmp_path / "run", features, 8)
    with pytest.raises(ValueError, match="more cells than the 50 vectors"):
        build_index(run.run_dir, IndexOptions(split="test", kind="ivf", nlist=60), run=run)


# ------------------------------------------------------------------ files and staleness

def test_all_splits_index_round_trip(tmp_path):
    features = tmp_path / "features"
    a, b = _clustered(30, 8, 3, 0), _clustered(20, 8, 3, 1)
    _write_cache(features / split_file("train"), a, [f"tr{i}" for i in range(30)])
    _write_cache(features / split_file("test"), b, [f"te{i}" for i in range(20)])
    run = _identity_run(tmp_path / "run", features, 8)
    build_index(run.run_dir, IndexOptions(kind="flat", chunk_rows=7), run=run)  # chunks straddle nothing special
    assert load_index(run.run_dir, "test") is None  # only "all" was built
    index, meta = load_index(run.run_dir)  # split None = all, newest kind
    assert meta.kind == "flat" and [s.split for s in meta.sources] == ["train", "test"]
    assert meta.image_ids == [f"tr{i}" for i in range(30)] + [f"te{i}" for i in range(20)]
    assert meta.locate(0) == ("train", 0) and meta.locate(29) == ("train", 29) and meta.locate(33) == ("test", 3)
    _, rows = search_index(index, b[3:4], k=1)
    assert rows.tolist() == [[33]]
    described = json.loads(index_paths(run.run_dir, "all", "flat")[1].read_text())
    assert described["ntotal"] == 50 and described["dim"] == 8
    assert described["sources"][1]["dataset_fingerprint"] == "fp-1" and described["sources"][1]["backbone"] == "toy"


def test_stale_index_is_refused_with_a_rebuild_hint(tmp_path):
    features = tmp_path / "features"
    feats = _clustered(40, 8, 3, 0)
    ids = [f"img{i}" for i in range(40)]
    _write_cache(features / split_file("test"), feats, ids)
    run = _identity_run(tmp_path / "run", features, 8)
    build_index(run.run_dir, IndexOptions(split="test"), run=run)
    assert load_index(run.run_dir, "test") is not None

    _write_cache(features / split_file("test"), feats[:39], ids[:39])  # re-extracted: one image fewer
    with pytest.raises(StaleIndexError, match=r"39 images now, 40 when the index was built") as e:
        load_index(run.run_dir, "test")
    assert "python cli.py index --run" in str(e.value) and "--split test --kind flat" in str(e.value)

    _write_cache(features / split_file("test"), feats[::-1].copy(), ids[::-1])  # same count, other order
    with pytest.raises(StaleIndexError, match="ids or their order changed"):
        load_index(run.run_dir, "test")

    _write_cache(features / split_file("test"), feats, ids, fingerprint="fp-2")  # data edited upstream
    with pytest.raises(StaleIndexError, match="dataset_fingerprint is 'fp-2'"):
        load_index(run.run_dir, "test")
    assert load_index(run.run_dir, "test", check=False)[1].ntotal == 40

    _write_cache(features / split_file("test"), feats, ids)  # back as built: current again
    assert load_index(run.run_dir, "test")[1].ntotal == 40


def test_retrained_heads_and_damaged_file_make_an_index_stale(cca_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(cca_run, run_dir)
    build_index(run_dir, IndexOptions(split="valid", kind="hnsw", m=8))
    assert load_index(run_dir, "valid")[1].kind == "hnsw"
    run = load_adapter_run(run_dir)
    with torch.no_grad():
        run.image_head.weight.add_(0.01)
    ckpt.save_heads(run_dir / ckpt.BEST, run.image_head, run.text_head)
    with pytest.raises(StaleIndexError, match="heads .* changed"):
        load_index(run_dir, "valid")

    build_index(run_dir, IndexOptions(split="valid", kind="hnsw", m=8, overwrite=True))
    faiss_path, _ = index_paths(run_dir, "valid", "hnsw")
    other = faiss.IndexHNSWFlat(12, 8, faiss.METRIC_INNER_PRODUCT)
    other.add(np.eye(12, dtype=np.float32))
    faiss.write_index(other, str(faiss_path))  # a FAISS file that is not the one described
    with pytest.raises(StaleIndexError, match="holds 12 x 12, its description says 60 x 12"):
        load_index(run_dir, "valid")
    faiss_path.write_bytes(b"not an index")
    with pytest.raises(StaleIndexError, match="unreadable FAISS file"):
        load_index(run_dir, "valid")


# ------------------------------------------------------------------ export

def test_export_npy_rows_align_with_cache(cca_run, tmp_path):
    out = tmp_path / "emb"
    summary = export_embeddings(cca_run, ExportOptions(format="npy", split="test", out=str(out), dtype="float32"))
    assert summary.rows == 60 and summary.partitions == 1
    img = np.load(out / "img_emb" / "img_emb_0.npy")
    txt = np.load(out / "text_emb" / "text_emb_0.npy")
    meta = pd.read_parquet(out / "metadata" / "metadata_0.parquet")
    run = load_adapter_run(cca_run)
    split = load_split(Path(run.features_dir) / split_file("test"))
    assert img.shape == txt.shape == (60, 12) and img.dtype == np.float32
    assert meta["id"].tolist() == split.image_ids
    assert meta["image_path"].tolist() == [f"images/{i}.jpg" for i in split.image_ids]
    # one row per image, beside its first caption (captions are stored image by image, 2 each)
    assert meta["caption_row"].tolist() == list(range(0, 120, 2))
    assert meta["caption"].tolist() == [split.captions[c] for c in range(0, 120, 2)]
    np.testing.assert_allclose(img, run.embed_images(split.image_features).numpy(), atol=1e-6)
    np.testing.assert_allclose(txt, run.embed_texts(split.caption_features[::2]).numpy(), atol=1e-6)
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["n_rows"] == 60 and manifest["dim"] == 12 and manifest["sources"][0]["split"] == "test"


def test_export_parquet_caption_rows_and_partitions(cca_run, tmp_path):
    out = tmp_path / "emb"
    summary = export_embeddings(cca_run, ExportOptions(format="parquet", split="all", out=str(out), rows="captions",
                                                       rows_per_file=100))
    # train 320 captions -> 4 files, valid 120 -> 2, test 120 -> 2: zero-padded to one digit
    assert summary.rows == 560 and summary.partitions == 8
    names = sorted(p.name for p in (out / "img_emb").iterdir())
    assert names == [f"img_emb_{i}.parquet" for i in range(8)]
    run = load_adapter_run(cca_run)
    test = load_split(Path(run.features_dir) / split_file("test"))
    img = pd.read_parquet(out / "img_emb" / "img_emb_6.parquet")  # first 100 test captions
    txt = pd.read_parquet(out / "text_emb" / "text_emb_6.parquet")
    meta = pd.read_parquet(out / "metadata" / "metadata_6.parquet")
    assert (img["split"] == "test").all() and img["caption_row"].tolist() == list(range(100))
    assert img["id"].tolist() == meta["id"].tolist() == [test.image_ids[r] for r in test.caption_image[:100].tolist()]
    assert txt["caption"].tolist() == test.captions[:100]
    np.testing.assert_allclose(np.stack(txt["embedding"].to_numpy()),
                               run.embed_texts(test.caption_features[:100]).numpy(), atol=1e-6)
    emb_img = np.stack(img["embedding"].to_numpy())
    np.testing.assert_allclose(emb_img, run.embed_images(test.image_features[test.caption_image[:100]]).numpy(), atol=1e-6)
    np.testing.assert_array_equal(emb_img[0], emb_img[1])  # two captions of one image share its row

    # exporting again to the same folder is refused, or with overwrite replaces it: no partition of the earlier
    # export survives
    with pytest.raises(FileExistsError, match="already holds an export; pass --overwrite"):
        export_embeddings(cca_run, ExportOptions(format="parquet", split="test", out=str(out)))
    export_embeddings(cca_run, ExportOptions(format="parquet", split="test", out=str(out), overwrite=True))
    assert sorted(p.name for p in (out / "img_emb").iterdir()) == ["img_emb_0.parquet"]
    assert len(pd.read_parquet(out / "metadata" / "metadata_0.parquet")) == 60


@pytest.mark.parametrize("fmt,rows", [("npy", "images"), ("parquet", "captions")])
def test_export_in_chunks_equals_export_at_once(cca_run, tmp_path, monkeypatch, fmt, rows):
    """A partition is read, embedded and written a chunk at a time (memory is one chunk's, whatever the
    split's size): chunks of 7 rows, across partitions of 50, give the files one chunk gives (the same
    rows in the same places, every other column equal; the embeddings equal to float32 rounding, since
    a CPU's matrix kernels may block 7 rows differently from 50)."""
    import medembed.serve.export as export

    opts = dict(format=fmt, split="all", rows=rows, rows_per_file=50, dtype="float32")
    export_embeddings(cca_run, ExportOptions(out=str(tmp_path / "whole"), **opts))
    monkeypatch.setattr(export, "EXPORT_CHUNK", 7)
    export_embeddings(cca_run, ExportOptions(out=str(tmp_path / "chunked"), **opts))
    names = sorted(str(p.relative_to(tmp_path / "whole")) for p in (tmp_path / "whole").rglob("*.*")
                   if p.name != "export.json")
    assert names == sorted(str(p.relative_to(tmp_path / "chunked")) for p in (tmp_path / "chunked").rglob("*.*")
                           if p.name != "export.json")
    # train / valid / test: 160 / 60 / 60 images (2 captions each), partitions of 50 rows within a split
    assert len(names) == 3 * (4 + 2 + 2 if rows == "images" else 7 + 3 + 3)
    for name in names:
        a, b = tmp_path / "whole" / name, tmp_path / "chunked" / name
        if name.endswith(".npy"):
            x, y = np.load(a), np.load(b)
            assert x.shape == y.shape and x.dtype == y.dtype
            np.testing.assert_allclose(x, y, rtol=0, atol=1e-6)
        else:
            x, y = pd.read_parquet(a), pd.read_parquet(b)
            emb = [c for c in x.columns if c == "embedding"]
            pd.testing.assert_frame_equal(x.drop(columns=emb), y.drop(columns=emb))
            for c in emb:
                np.testing.assert_allclose(np.stack(x[c].to_numpy()), np.stack(y[c].to_numpy()), rtol=0, atol=1e-6)


def test_export_float16_and_refuses_a_foreign_folder(cca_run, tmp_path):
    out = tmp_path / "emb"
    export_embeddings(cca_run, ExportOptions(format="npy", split="valid", out=str(out)))
    img = np.load(out / "img_emb" / "img_emb_0.npy")
    assert img.dtype == np.float16
    np.testing.assert_allclose(np.linalg.norm(img.astype(np.float32), axis=1), 1.0, atol=2e-3)
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an earlier export"):
        export_embeddings(cca_run, ExportOptions(out=str(foreign)))
    assert (foreign / "todo.txt").read_text() == "mine"


# ------------------------------------------------------------------ commands

def test_index_and_export_commands(cca_run, tmp_path):
    from medembed.cli import main

    run_dir = tmp_path / "run"
    shutil.copytree(cca_run, run_dir)
    runner = CliRunner()
    res = runner.invoke(main, ["index", "--run", str(run_dir), "--split", "test", "--kind", "ivf", "--nlist", "4"])
    assert res.exit_code == 0, res.output
    assert "ivf index of 60 x 12" in res.output and "nlist 4, nprobe 4" in res.output
    assert (run_dir / "index" / "test-ivf.faiss").exists()
    res = runner.invoke(main, ["index", "--run", str(run_dir), "--split", "nope"])
    assert res.exit_code != 0 and "no nope.h5" in res.output
    res = runner.invoke(main, ["export", "--run", str(run_dir), "--format", "parquet"])
    assert res.exit_code == 0, res.output
    assert "exported 60 rows x 12 dims" in res.output
    assert len(pd.read_parquet(run_dir / "export" / "test-parquet" / "img_emb" / "img_emb_0.parquet")) == 60


# ------------------------------------------------------------------ compressed indexes and budgets

def test_ivfpq_recall_and_size_on_clustered_vectors(tmp_path):
    feats = _clustered(3000, 64, clusters=40, seed=0)
    features = tmp_path / "features"
    _write_cache(features / split_file("test"), feats, [f"img{i:05d}" for i in range(len(feats))])
    run = _identity_run(tmp_path / "run", features, 64)
    path, meta = build_index(run.run_dir, IndexOptions(split="test", kind="ivfpq", pq_bytes=16), run=run)
    assert path.name == "test-ivfpq.faiss"
    # 2 sqrt(3000) = 110 -> 64 cells (a power of two, <= 3000/39), all probed (128 at most); 32 four-bit
    # sub-quantizers over 64 dims
    assert {k: meta.params[k] for k in ("nlist", "nprobe", "pq_dim", "pq_bytes", "coarse")} == {
        "nlist": 64, "nprobe": 64, "pq_dim": 64, "pq_bytes": 16, "coarse": "flat"}
    assert meta.index_bytes < 0.2 * feats.nbytes  # 16-byte codes + 8-byte ids instead of 256-byte vectors
    rng = np.random.default_rng(1)
    q = feats[rng.choice(len(feats), 200, replace=False)] + 0.05 * rng.standard_normal((200, 64)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    index, _ = load_index(run.run_dir, "test", "ivfpq")
    exact = _brute_top(feats, q, 10)
    _, rows = search_index(index, q, k=10)
    raw = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows.tolist(), exact.tolist())])
    _, cand = search_index(index, q, k=100)  # what search re-scores exactly
    top = np.take_along_axis(cand, np.argsort(-np.take_along_axis(q @ feats.T, cand, 1), 1, kind="stable"), 1)[:, :10]
    reranked = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(top.tolist(), exact.tolist())])
    assert raw >= 0.3 and reranked >= 0.97, (raw, reranked)


def test_ivfpq_search_rescores_with_the_query_bank_as_exact_search(tmp_path):
    from medembed.adapt.run import QUERYBANK
    from medembed.common.querybank import BankSide, QueryBank
    from medembed.serve.search import Searcher

    features = write_synthetic_features(tmp_path / "features", n_train=160, n_eval=300, captions_per_image=1)
    train(AdaptConfig(features_dir=str(features), out=str(tmp_path / "run"), head="linear", dim=32, epochs=3,
                      ensemble=1), progress=False)
    run_dir = tmp_path / "run"
    chosen = json.loads((run_dir / QUERYBANK).read_text())
    forced = QueryBank(BankSide(5, 1.0), BankSide(5, 1.0), "train", str(features.resolve()))
    (run_dir / QUERYBANK).write_text(json.dumps({**chosen, "setting": forced.to_dict()}))
    _, meta = build_index(run_dir, IndexOptions(split="test", kind="ivfpq", rerank=30))
    assert meta.dim == 33 and meta.querybank["images"] == {"k": 5, "beta": 1.0} and meta.params["pq_bytes"] == 16
    exact, indexed = Searcher(run_dir, "test", use_index=False), Searcher(run_dir, "test")
    run = load_adapter_run(run_dir)
    test = load_split(run.features_dir / split_file("test"))
    queries = run.embed_texts(test.caption_features)
    overlap = []
    for c in range(0, test.n_captions, 10):
        want, got = exact.images(queries[c][None], k=10), indexed.images(queries[c][None], k=10)
        assert got.via == "ivfpq index, 30 candidates re-scored exactly" and got.with_bank
        by_row = {h.image_row: h for h in want.hits}
        overlap.append(len(set(by_row) & {h.image_row for h in got.hits}) / 10)
        for h in got.hits:  # same ids, and every score is the exact one: cosine + the image's bank offset
            assert test.image_ids[h.image_row] == h.image_id
            if h.image_row in by_row:
                assert h.score == pytest.approx(by_row[h.image_row].score, abs=1e-5)
                assert h.cosine == pytest.approx(by_row[h.image_row].cosine, abs=1e-5)
        assert [h.score for h in got.hits] == sorted((h.score for h in got.hits), reverse=True)
    assert np.mean(overlap) >= 0.9, overlap
    # a filter (every third image) reaches through the projection to the cells: only allowed rows, exact scores
    allowed = np.arange(test.n_images) % 3 == 0
    for c in (0, 50, 150):
        want = exact.images(queries[c][None], k=10, allowed=allowed)
        got = indexed.images(queries[c][None], k=10, allowed=allowed)
        assert all(h.image_row % 3 == 0 for h in got.hits) and len(got.hits) == 10
        by_row = {h.image_row: h.score for h in want.hits}
        assert len(set(by_row) & {h.image_row for h in got.hits}) >= 8
        assert all(h.score == pytest.approx(by_row[h.image_row], abs=1e-5) for h in got.hits if h.image_row in by_row)
    # a pool too large to hold re-scores from the index's own full vectors, written beside it: the same
    # hits and scores as re-scoring the held pool
    kept = tmp_path / "run" / "index" / meta.vectors
    assert meta.vectors == "test-ivfpq.vectors" and kept.stat().st_size == 4 * 300 * 33
    streamed = Searcher(run_dir, "test")
    streamed.memory = dataclasses.replace(streamed.memory, hold=False, chunk_rows=64)
    for c in (0, 40, 90):
        want, got = indexed.images(queries[c][None], k=10), streamed.images(queries[c][None], k=10)
        assert [h.image_row for h in got.hits] == [h.image_row for h in want.hits]
        assert [h.score for h in got.hits] == pytest.approx([h.score for h in want.hits], abs=1e-5)
        assert [h.cosine for h in got.hits] == pytest.approx([h.cosine for h in want.hits], abs=1e-5)
    assert streamed._images is None
    # ... and an index whose vectors file is cut short is stale, named with how to rebuild it
    kept.write_bytes(kept.read_bytes()[:-4])
    with pytest.raises(StaleIndexError, match="test-ivfpq.vectors .* is 39596 bytes, 39600 when the index was built"):
        load_index(run_dir, "test", "ivfpq")


def test_an_index_filled_in_parts_on_ray_answers_as_the_one_machine_build(tmp_path):
    pytest.importorskip("ray", reason="Ray is the optional [distributed] extra")
    from medembed.adapt.run import QUERYBANK
    from medembed.common.querybank import BankSide, QueryBank

    features = write_synthetic_features(tmp_path / "features", n_train=160, n_eval=500, captions_per_image=1)
    run_dir = tmp_path / "run"
    train(AdaptConfig(features_dir=str(features), out=str(run_dir), head="linear", dim=32, epochs=2, ensemble=1),
          progress=False)
    chosen = json.loads((run_dir / QUERYBANK).read_text())
    forced = QueryBank(BankSide(5, 1.0), BankSide(5, 1.0), "train", str(features.resolve()))
    (run_dir / QUERYBANK).write_text(json.dumps({**chosen, "setting": forced.to_dict()}))
    options = IndexOptions(split="test", kind="ivfpq", rerank=50)
    path, local = build_index(run_dir, options)
    want_vectors = path.with_suffix(".vectors").read_bytes()
    queries = np.random.default_rng(0).standard_normal((40, local.dim)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    want = search_index(load_index(run_dir, "test", "ivfpq")[0], queries, 20)
    path, parted = build_index(run_dir, dataclasses.replace(options, engine="ray", parts=3, overwrite=True))
    assert (parted.ntotal, parted.dim, parted.params, parted.vectors) == (local.ntotal, local.dim, local.params, local.vectors)
    # the parts' vectors, appended in row order, are the one-machine build's byte for byte ...
    assert path.with_suffix(".vectors").read_bytes() == want_vectors
    # ... and the merged index finds the same rows with the same scores
    got = search_index(load_index(run_dir, "test", "ivfpq")[0], queries, 20)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_allclose(got[0], want[0], rtol=0, atol=1e-6)
    assert not list(path.parent.glob(".part-*"))  # merged parts are removed
    # a kind that is not filled in parts is refused in one line, before anything is built
    with pytest.raises(ValueError, match=r"--engine ray fills ivf and ivfpq indexes in parts; flat"):
        build_index(run_dir, dataclasses.replace(options, kind="flat", engine="ray"))


def test_plan_picks_the_index_for_the_size_and_budget():
    from medembed.common.planning import MemoryBudgetError

    assert IndexOptions().plan(4639, 4097).kind == "flat"  # roco-rad with the query-bank coordinate
    assert IndexOptions().plan(100_000, 256).kind == "flat"  # 100 MB: one short scan
    assert IndexOptions().plan(1_000_000, 256).params["pq_bytes"] == 64  # ivfpq, the largest code
    assert IndexOptions(kind="ivf").plan(1_000_000, 256).params["nlist"] == 1000  # asked for: full vectors fit 4 GB
    big = IndexOptions().plan(10_000_000, 256)
    assert (big.kind, big.params["pq_bytes"], big.params["nlist"], big.params["coarse"]) == ("ivfpq", 64, 4096, "hnsw")
    assert 70 < big.bytes_per_vector < 80  # 64-byte code + 8-byte id + the cells and projection, shared
    tight = IndexOptions(max_memory_gb=2.4).plan(10_000_000, 256)
    looser = IndexOptions(kind="ivfpq", pq_bytes=2 * tight.params["pq_bytes"], max_memory_gb=100).plan(10_000_000, 256)
    assert tight.params["pq_bytes"] == 16 and looser.build_bytes > 2.4 * (1 << 30)  # the largest code that fits
    # a tight budget reads fewer rows at a time: 4,097-d chunks of at most an eighth of it
    assert IndexOptions(max_memory_gb=4).plan(10_000_000, 4097).chunk_rows == 16380
    assert IndexOptions(max_memory_gb=16).plan(10_000_000, 4097).chunk_rows == 65520
    with pytest.raises(MemoryBudgetError, match=r"^100,000,000 vectors of 256 dimensions need .* above --max-memory-gb 0.5; "
                                          r"raise it to at least [0-9.]+$"):
        IndexOptions(max_memory_gb=0.5).plan(100_000_000, 256)
    with pytest.raises(MemoryBudgetError, match="in --kind hnsw .* or use --kind ivfpq$"):
        IndexOptions(kind="hnsw").plan(10_000_000, 4096)
    with pytest.raises(MemoryBudgetError, match=r"in --kind flat .* at least [0-9.]+$"):  # ivfpq would not fit either
        IndexOptions(kind="flat", max_memory_gb=1).plan(100_000_000, 256)


def test_an_unknown_kind_is_refused_by_the_planner_not_costed_as_another():
    from medembed.common.errors import MedembedError
    from medembed.serve.index_kinds import INDEX_KINDS
    from medembed.serve.index_plan import plan_index

    opts = IndexOptions()
    opts.kind = "ivfqp"  # past the options' own check, as a caller building them by hand would be
    with pytest.raises(MedembedError) as e:
        plan_index(1_000_000, 256, opts)
    (line,) = str(e.value).splitlines()
    assert "'ivfqp'" in line and ", ".join(INDEX_KINDS) in line
    with pytest.raises(MedembedError, match="kind must be one of auto, flat, ivf, hnsw, ivfpq, got 'ivfqp'"):
        IndexOptions(kind="ivfqp")


def test_the_index_command_offers_the_registered_kinds():
    from medembed.cli import main
    from medembed.serve.index_kinds import INDEX_KINDS, KINDS

    assert INDEX_KINDS == tuple(k.name for k in KINDS) == ("flat", "ivf", "hnsw", "ivfpq")
    (kind,) = [p for p in main.commands["index"].params if p.name == "kind"]
    assert list(kind.type.choices) == ["auto", *INDEX_KINDS]


def test_index_command_refuses_a_budget_in_one_line(cca_run):
    from medembed.cli import main

    result = CliRunner().invoke(main, ["index", "--run", str(cca_run), "--split", "test", "--kind", "flat",
                                       "--max-memory-gb", "0.000001", "--overwrite"])  # other tests built one
    assert result.exit_code != 0
    lines = [line for line in result.output.strip().splitlines() if line]
    assert len(lines) == 1 and "--max-memory-gb 1e-06" in lines[0] and "Traceback" not in result.output, result.output
