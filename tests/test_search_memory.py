"""Search within --max-memory-gb: a pool whose embeddings do not fit is streamed from its cache files
and answers exactly as the held pool does; the streamed process stays under its budget; a budget
nothing fits is refused in one line."""
from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from medembed.adapt.config import AdaptConfig
from medembed.adapt.trainer import train
from medembed.cache.reader import load_split
from medembed.cache.schema import split_file
from medembed.cli import main
from medembed.common.memory import GB
from medembed.common.planning import MemoryBudgetError
from medembed.serve.index import IndexOptions, build_index
from medembed.serve.search import Searcher
from medembed.serve.search_memory import ENCODER_BYTES, plan_search_memory
from tests.synthetic_features import correlated_split, write_cache, write_synthetic_features


@pytest.fixture(scope="module")
def bank_run(tmp_path_factory) -> Path:
    """A run ranking with a query bank, over three splits with two captions per image and concepts."""
    root = tmp_path_factory.mktemp("search-memory")
    features = write_synthetic_features(root / "features", n_train=120, n_eval=50, captions_per_image=2,
                                        n_concepts=6, concept_rate=0.3)
    train(AdaptConfig(features_dir=str(features), out=str(root / "run"), head="linear", dim=16, epochs=2,
                      ensemble=1), progress=False)
    return root / "run"


def _streamed(run: Path, chunk_rows: int, **kw) -> Searcher:
    """A searcher that streams in small chunks, so one scan crosses many chunks and every split."""
    s = Searcher(run, **kw)
    s.memory = dataclasses.replace(s.memory, hold=False, chunk_rows=chunk_rows)
    return s


def _same(a, b) -> None:
    assert [(h.split, h.image_row, h.image_id, h.caption, h.location) for h in a.hits] == \
        [(h.split, h.image_row, h.image_id, h.caption, h.location) for h in b.hits]
    assert [h.score for h in a.hits] == pytest.approx([h.score for h in b.hits], abs=1e-5)
    assert [h.cosine for h in a.hits] == pytest.approx([h.cosine for h in b.hits], abs=1e-5)
    assert (a.via, a.pool, a.ranking, a.bank) == (b.via, b.pool, b.ranking, b.bank)


def test_a_streamed_pool_answers_as_the_held_one(bank_run):
    held = Searcher(bank_run, use_index=False)
    assert held.memory.hold and held.model.gallery_offsets is not None
    streamed = _streamed(bank_run, 13, use_index=False)
    test = load_split(held.run.features_dir / split_file("test"))
    queries = held.model.texts(test.caption_features[:6])
    rng = np.random.default_rng(0)
    allowed = rng.random(held.pool.n_images) < 0.4
    for q in queries:
        _same(streamed.images(q[None], 15), held.images(q[None], 15))  # ranked with the query bank
        _same(streamed.images(q[None], 7, allowed=allowed), held.images(q[None], 7, allowed=allowed))
    row = held.pool.pool_row("test", 4)
    torch.testing.assert_close(streamed.image_embedding(row), held.image_embedding(row), atol=1e-6, rtol=0)
    image_query = held.image_embedding(row)
    _same(streamed.images(image_query, 9, by="image"), held.images(image_query, 9, by="image"))
    assert streamed.images(image_query, 1, by="image").hits[0].image_row == 4
    _same(streamed.captions(image_query, 12), held.captions(image_query, 12))
    # what a hit shows is read from the file: the image's first caption, the caption's own image
    hit = held.images(queries[0][None], 1).hits[0]
    split = load_split(held.run.features_dir / split_file(hit.split))
    assert hit.caption == split.first_captions()[hit.image_row] and hit.location == split.image_path(hit.image_row)
    for cap in held.captions(image_query, 12).hits:
        own = load_split(held.run.features_dir / split_file(cap.split))
        assert cap.image_id == own.image_ids[cap.image_row]
        assert cap.caption in [c for c, r in zip(own.captions, own.caption_image.tolist()) if r == cap.image_row]
    # the streamed searcher never projected the whole pool
    assert streamed._images is None and streamed._captions is None
    with pytest.raises(RuntimeError, match="streamed"):
        _ = streamed.image_embeddings


def test_an_index_over_a_streamed_pool_reads_only_its_hits(bank_run):
    build_index(bank_run, IndexOptions(split="test", kind="flat"))
    exact = Searcher(bank_run, "test", use_index=False)
    indexed = _streamed(bank_run, 11, split="test")
    assert indexed.index is not None
    test = load_split(exact.run.features_dir / split_file("test"))
    for q in exact.model.texts(test.caption_features[:5]):
        got, want = indexed.images(q[None], 8), exact.images(q[None], 8)
        assert got.via == "flat index" and [h.image_row for h in got.hits] == [h.image_row for h in want.hits]
        assert [h.score for h in got.hits] == pytest.approx([h.score for h in want.hits], abs=1e-5)
        assert [h.cosine for h in got.hits] == pytest.approx([h.cosine for h in want.hits], abs=1e-5)
    assert indexed._images is None


def test_the_plan_holds_what_fits_streams_what_does_not_and_refuses_the_rest(bank_run):
    held = Searcher(bank_run, use_index=False)
    plan = held.memory
    args = dict(n_images=held.pool.n_images, n_captions=held.pool.n_captions, raw_width=48, itemsize=4, dim=16,
                metadata_bytes=held.pool.metadata_bytes, bank_width=80)
    assert plan_search_memory(plan.budget / GB, **args).hold
    big = {**args, "n_images": 4_000_000, "n_captions": 20_000_000, "dim": 1024}
    streamed = plan_search_memory(2.0, **big)
    assert not streamed.hold and 1024 <= streamed.chunk_rows <= 65536 and streamed.held > 2 * GB
    assert "streamed from disk in chunks of" in streamed.describe()
    with pytest.raises(MemoryBudgetError, match=r"^search needs at least .* raise it to at least [\d.]+$"):
        plan_search_memory(1.0, **big)
    # on the command line: one line, nothing else
    r = CliRunner().invoke(main, ["search", "--run", str(bank_run), "--text", "anything", "--max-memory-gb", "0.5"])
    assert r.exit_code == 1 and "Traceback" not in r.output
    (line,) = r.output.strip().splitlines()
    assert re.search(r"search needs at least [\d.]+ GiB even with the pool streamed .*above --max-memory-gb 0.5; "
                     r"raise it to at least [\d.]+$", line), line


RUNNER = """
import json, sys
import torch
from medembed.common.memory import peak_rss_bytes, release_large_blocks
from medembed.serve.search import Searcher

release_large_blocks()  # as the command line does at start-up
s = Searcher(sys.argv[1], "test", use_index=False, max_memory_gb=float(sys.argv[2]))
query = s.model.texts(s.pool.caption_features([1234]))
text = s.images(query, 10)
near = s.images(s.image_embedding(777), 3, by="image")
caps = s.captions(s.image_embedding(777), 5)
print("RESULT", json.dumps({"hold": s.memory.hold, "chunk_rows": s.memory.chunk_rows, "held": s.memory.held,
      "total": s.memory.total, "fixed": s.memory.fixed,
      "text": [[h.image_row, h.score, h.cosine] for h in text.hits], "near": [h.image_row for h in near.hits],
      "caps": [h.image_row for h in caps.hits], "peak": peak_rss_bytes()}), flush=True)
"""
POOL = 262_144  # test images, one caption each: 768 + 384 float16 features, 0.56 GiB on disk
BUDGET_GB = 2.5


@pytest.mark.slow
def test_a_pool_above_the_budget_is_searched_streamed_under_it(tmp_path):
    features = tmp_path / "features"
    for name, n, seed in (("train", 4000, 0), ("valid", 1000, 1), ("test", POOL, 2)):
        write_cache(correlated_split(n, 768, 384, latent=32, noise=0.5, seed=seed, split=name), features / split_file(name),
                    dtype="float16")
    run = tmp_path / "run"
    train(AdaptConfig(features_dir=str(features), out=str(run), head="linear", dim=1024, ensemble=1, epochs=2),
          progress=False)
    done = subprocess.run([sys.executable, "-c", RUNNER, str(run), str(BUDGET_GB)], capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.rsplit("RESULT", 1)[1])
    # holding the pool's embeddings beside what is always held would pass the budget: it was streamed, under it
    assert not got["hold"] and got["fixed"] + got["held"] > BUDGET_GB * GB and got["chunk_rows"] < POOL
    # no query encoder was loaded here (the queries are cached features): the rest of the plan must hold
    assert got["total"] <= BUDGET_GB * GB
    assert 0 < got["peak"] <= got["total"] - ENCODER_BYTES, f"peak {got['peak'] / GB:.2f} GiB above the plan"
    # the answers are the pool's: an image's nearest image is itself, its best caption its own
    assert got["near"][0] == 777 and got["caps"][0] == 777
    # ... and the streamed text hits are the held pool's (here, with memory to spare)
    held = Searcher(run, "test", use_index=False, max_memory_gb=16)
    assert held.memory.hold
    want = held.images(held.model.texts(held.pool.caption_features([1234])), 10)
    assert [r for r, _, _ in got["text"]] == [h.image_row for h in want.hits]
    assert [s for _, s, _ in got["text"]] == pytest.approx([h.score for h in want.hits], abs=1e-5)
    assert [c for _, _, c in got["text"]] == pytest.approx([h.cosine for h in want.hits], abs=1e-5)
