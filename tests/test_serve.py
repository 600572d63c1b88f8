"""The search page's API with an in-process client (tiny-clip run): ranked results equal
`cli.py search`, requests never reach a path outside the pool, bad input gets a 4xx with a reason."""
from __future__ import annotations

import io

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from medembed.adapt.config import AdaptConfig
from medembed.adapt.trainer import train
from medembed.cache.reader import load_split
from medembed.evaluate.search import Searcher, search
from medembed.evaluate.serve import ServeLimits, create_app
from tests.conftest import tiny_clip_cache


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    cache = tiny_clip_cache(root, {"train": 24, "valid": 8, "test": 12})
    train(AdaptConfig(features_dir=str(cache), out=str(root / "run"), head="linear", dim=16, epochs=2, batch_size=8),
          progress=False)
    searcher = Searcher(root / "run")
    client = TestClient(create_app(searcher, ServeLimits(max_upload_bytes=50_000, max_upload_pixels=640 * 640)))
    return {"client": client, "run": root / "run", "test": load_split(cache / "test.h5"), "root": root}


def _png(size=(40, 40), colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def test_info_names_the_run_and_pool(served):
    info = served["client"].get("/api/info").json()
    assert info["backbone"] == "tiny-clip" and info["pool_images"] == 44 and info["index"] is None
    assert info["splits"] == ["test", "train", "valid"]
    assert {c["id"] for c in info["concepts"]} >= {"C0000001", "C0000002"}


def test_text_query_equals_the_command_line(served):
    query = served["test"].captions[3]
    got = served["client"].get("/api/search/text", params={"q": query, "k": 5}).json()
    want = search(served["run"], text=query, k=5)
    assert [h["id"] for h in got["hits"]] == [h.image_id for h in want.hits]
    assert [h["score"] for h in got["hits"]] == pytest.approx([round(h.score, 4) for h in want.hits], abs=1e-4)
    assert got["via"] == "exact scan" and got["pool"] == 44
    # paging: page 1 continues where page 0 stopped
    page1 = served["client"].get("/api/search/text", params={"q": query, "k": 2, "page": 1}).json()
    assert [h["id"] for h in page1["hits"]] == [h.image_id for h in want.hits[2:4]]
    # filters: only test images, only images carrying the concept
    only_test = served["client"].get("/api/search/text", params={"q": query, "k": 20, "split": "test"}).json()
    assert {h["split"] for h in only_test["hits"]} == {"test"} and len(only_test["hits"]) == 12
    red = served["client"].get("/api/search/text", params={"q": query, "k": 40, "concept": "C0000001"}).json()
    assert red["hits"] and all("red" in h["caption"] for h in red["hits"])


def test_image_queries_and_neighbours(served):
    client = served["client"]
    up = client.post("/api/search/image", files={"file": ("q.png", _png(), "image/png")}, params={"k": 4}).json()
    assert len(up["hits"]) == 4 and up["captions"] and up["target"] == "images"
    key = up["hits"][0]["key"]
    near = client.get(f"/api/similar/{key}", params={"k": 3}).json()
    assert near["hits"][0]["key"] == key and near["hits"][0]["score"] == pytest.approx(1.0, abs=1e-4)
    caps = client.get(f"/api/captions/{key}").json()
    assert len(caps["hits"]) == 5 and caps["target"] == "captions"
    thumb = client.get(f"/api/image/{key}")
    assert thumb.status_code == 200 and thumb.content[:4] == b"\x89PNG"


@pytest.mark.parametrize("key", ["../../etc/passwd", "test:999", "test:-1", "x", "..%2F..%2Fetc%2Fpasswd",
                                 "/etc/passwd"])
def test_no_request_reaches_a_path_outside_the_pool(served, key):
    r = served["client"].get(f"/api/image/{key}")
    assert r.status_code == 404
    assert "error" in r.json() and "\n" not in r.json()["error"]


def test_bad_input_gets_a_4xx_with_a_reason(served):
    client = served["client"]
    cases = [
        (client.get("/api/search/text", params={"q": "   "}), 400, "the query is empty"),
        (client.get("/api/search/text", params={"q": "a", "k": 0}), 422, "k:"),
        (client.get("/api/search/text", params={"q": "a", "split": "nope"}), 400, "split 'nope' is not in the pool"),
        (client.get("/api/search/text", params={"q": "a", "concept": "C9"}), 400, "concept 'C9' is not a concept"),
        (client.post("/api/search/image", files={"file": ("n.txt", b"not an image", "text/plain")}), 400,
         "not an image (unrecognised format)"),
        (client.post("/api/search/image", files={"file": ("big.png", b"\x89PNG" + b"0" * 60_000, "image/png")}), 413,
         "larger than 50000 bytes"),
        (client.post("/api/search/image", files={"file": ("huge.png", _png((1000, 1000)), "image/png")}), 400,
         "decompression bomb"),
        (client.get("/api/search/text", params={"q": "a", "k": 100, "page": 3}), 400, "more than the 200 results"),
    ]
    for response, code, reason in cases:
        assert response.status_code == code, (reason, response.text)
        assert reason in response.json()["error"] and "Traceback" not in response.text


def test_the_page_and_its_assets_are_served(served):
    page = served["client"].get("/")
    assert page.status_code == 200 and "medembed search" in page.text
    assert served["client"].get("/static/app.js").status_code == 200
