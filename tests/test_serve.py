"""The search page's API with an in-process client (tiny-clip run): ranked results equal
`cli.py search`, requests never reach a path outside the pool, bad input gets a 4xx with a reason."""
from __future__ import annotations

import asyncio
import io
import shutil
import socket
import time
from types import SimpleNamespace

import httpx
import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from PIL import Image

from medembed.adapt.config import AdaptConfig
from medembed.adapt.trainer import train
from medembed.cache.reader import load_split
from medembed.cache.schema import split_file
from medembed.cli import main
from medembed.serve import page as serve_module
from medembed.serve import search as search_module
from medembed.serve.index import IndexOptions, build_index
from medembed.serve.page import ServeLimits, create_app
from medembed.serve.page_upload import FORM_FRAMING
from medembed.serve.search import Searcher, SearchOptions, search
from tests.conftest import tiny_clip_cache

CAP = 50_000  # the served app's upload cap in bytes


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    cache = tiny_clip_cache(root, {"train": 24, "valid": 8, "test": 12})
    train(AdaptConfig(features_dir=str(cache), out=str(root / "run"), head="linear", dim=16, epochs=2, batch_size=8),
          progress=False)
    searcher = Searcher(root / "run")
    client = TestClient(create_app(searcher, ServeLimits(max_upload_bytes=CAP, max_upload_pixels=640 * 640)))
    return {"client": client, "run": root / "run", "test": load_split(cache / split_file("test")), "root": root}


def _png(size=(40, 40), colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def test_info_names_the_run_and_pool(served):
    info = served["client"].get("/api/info").json()
    assert info["backbone"] == "tiny-clip" and info["pool_images"] == 44 and info["index"] is None
    assert info["splits"] == ["test", "train", "valid"]
    assert {c["id"] for c in info["concepts"]} >= {"C0000001", "C0000002"}
    assert info["k"] == SearchOptions().k  # the page's hits per page: the command line's and the API's default


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


def _upload(client, params: dict, image: bytes | None = None) -> httpx.Response:
    """An image query the way the page sends it: the file's own bytes as the body."""
    return client.post("/api/search/image", content=image or _png(), headers={"Content-Type": "image/png"},
                       params=params)


def test_image_queries_and_neighbours(served):
    client = served["client"]
    up = client.post("/api/search/image", files={"file": ("q.png", _png(), "image/png")}, params={"k": 4}).json()
    assert len(up["hits"]) == 4 and up["captions"] and up["target"] == "images"
    raw = _upload(client, {"k": 4}).json()  # the page's form: the same answer as a multipart form's
    assert [h["key"] for h in raw["hits"]] == [h["key"] for h in up["hits"]] and raw["captions"] == up["captions"]
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
        (client.post("/api/search/image", content=b"not an image"), 400, "upload: not an image"),
        (client.post("/api/search/image", content=b"\x89PNG" + b"0" * 60_000), 413, "larger than 50000 bytes"),
        (client.post("/api/search/image", files={"other": ("q.png", _png(), "image/png")}), 400,
         "no file part named 'file'"),
        (_upload(client, {"split": "nope"}), 400, "split 'nope' is not in the pool"),
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


# --- uploads are capped while they stream in ------------------------------------------------------------


class Body:
    """A request body of `chunks` chunks of `size` bytes, counting how many bytes the server pulled."""

    def __init__(self, chunks: int, size: int = 8192, head: bytes = b""):
        self.chunks, self.size, self.head, self.sent = chunks, size, head, 0

    async def __aiter__(self):
        for i in range(self.chunks):
            chunk = self.head if i == 0 and self.head else b"\x89PNG" + b"0" * (self.size - 4)
            self.sent += len(chunk)
            yield chunk


def _post_streamed(app, body: Body, headers: dict) -> httpx.Response:
    """POST through httpx's ASGI transport, which hands the app the body chunk by chunk as it asks
    (starlette's TestClient reads a streamed body whole before the app sees a byte)."""
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://serve") as client:
            return await client.post("/api/search/image", content=body, headers=headers)

    return asyncio.run(go())


def test_a_streamed_upload_is_cut_off_at_the_cap(served):
    body = Body(chunks=1200)  # ~10 MB, no Content-Length: only counting the stream can stop it
    r = _post_streamed(served["client"].app, body, {"Content-Type": "image/png"})
    assert CAP < body.sent <= CAP + body.size, body.sent  # the cap and at most one chunk past it
    assert r.status_code == 413 and "larger than 50000 bytes" in r.json()["error"]


BOUNDARY = "b0undary"
FORM = f"multipart/form-data; boundary={BOUNDARY}"
FORM_HEAD = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.png\"\r\n"
             "Content-Type: image/png\r\n\r\n").encode()  # a form whose file part never ends


def test_a_streamed_form_upload_is_cut_off_at_the_cap(served):
    body = Body(chunks=1200, head=FORM_HEAD)
    r = _post_streamed(served["client"].app, body, {"Content-Type": FORM})
    assert body.sent <= CAP + FORM_FRAMING + body.size, body.sent
    assert r.status_code == 413 and "larger than 50000 bytes" in r.json()["error"]


@pytest.mark.parametrize("content_type", ["image/png", FORM])
def test_a_declared_length_over_the_cap_is_refused_unread(served, content_type):
    body = Body(chunks=1200, head=FORM_HEAD if content_type == FORM else b"")
    r = _post_streamed(served["client"].app, body, {"Content-Type": content_type, "Content-Length": "600000000"})
    assert body.sent == 0
    assert r.status_code == 413 and "larger than 50000 bytes" in r.json()["error"]


# --- image queries take the text query's filters and paging --------------------------------------------


def test_an_image_query_honours_split_filters_and_pages(served):
    client = served["client"]
    only_test = _upload(client, {"k": 20, "split": "test"}).json()
    assert {h["split"] for h in only_test["hits"]} == {"test"} and len(only_test["hits"]) == 12
    first, second = (_upload(client, {"k": 3, "page": p}).json() for p in (0, 1))
    both = _upload(client, {"k": 6}).json()
    assert (first["page"], second["page"]) == (0, 1) and len(first["hits"]) == len(second["hits"]) == 3
    assert not {h["key"] for h in first["hits"]} & {h["key"] for h in second["hits"]}
    assert [h["key"] for h in first["hits"] + second["hits"]] == [h["key"] for h in both["hits"]]
    assert [h["rank"] for h in second["hits"]] == [4, 5, 6]
    red = _upload(client, {"k": 40, "modality": "C0000001"}).json()  # any concept id filters as a modality
    assert len(red["hits"]) == 11 and all("red" in h["caption"] for h in red["hits"])
    green_test = _upload(client, {"k": 40, "concept": "C0000002", "split": "test", "exact": "true"}).json()
    assert green_test["hits"] and all("green" in h["caption"] and h["split"] == "test" for h in green_test["hits"])
    assert _upload(client, {"k": 100, "page": 2}).json()["error"].startswith("k x (page + 1) = 300")


# --- the API speaks of its own parameters ----------------------------------------------------------------


def test_notes_and_errors_name_query_parameters_not_flags(served):
    client = served["client"]
    capped = client.get("/api/search/text", params={"q": "a red square", "k": 10, "page": 1, "split": "test"}).json()
    assert capped["notes"] == ["k x (page + 1) = 20 is more than the 12 images searched: all 12 are ranked"]
    assert len(capped["hits"]) == 2  # ranks 11 and 12 of the 12 test images
    for response in (client.get("/api/search/text", params={"q": "a", "split": "nope"}),
                     client.get("/api/search/text", params={"q": "a", "k": 0}),
                     _upload(client, {"modality": "C9"})):
        error = response.json()["error"]
        assert response.status_code in (400, 422) and "--" not in error
        assert error.split()[0].rstrip(":") in ("split", "k", "modality"), error


def test_an_approximate_index_note_names_the_exact_parameter(served, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(served["run"], run)
    build_index(run, IndexOptions(kind="ivf", nlist=4, nprobe=1))  # one cell of four: fewer hits than asked
    client = TestClient(create_app(Searcher(run)))
    for answer in (client.get("/api/search/text", params={"q": "a red square", "k": 40}).json(),
                   _upload(client, {"k": 40})):
        answer = answer if isinstance(answer, dict) else answer.json()
        assert answer["via"] == "ivf index" and len(answer["hits"]) < 40
        assert any("search again with exact=true" in n for n in answer["notes"]), answer["notes"]
        assert not any("--" in n for n in answer["notes"])


# --- `cli.py serve` takes the port before it loads the model ---------------------------------------------


def _never_built(*args, **kwargs):
    raise AssertionError("the searcher was built although the port is busy")


def test_serve_refuses_a_busy_port_at_once(served, monkeypatch):
    monkeypatch.setattr(search_module, "Searcher", _never_built)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        started = time.perf_counter()
        result = CliRunner().invoke(main, ["serve", "--run", str(served["run"]), "--port", str(port)])
        elapsed = time.perf_counter() - started
    assert result.exit_code == 1, result.output
    assert result.output == f"Error: port {port} on 127.0.0.1 is in use; choose another with --port\n"
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert elapsed < 5


def test_serve_listens_before_loading_and_serves_on_that_socket(served, monkeypatch):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    seen = {}

    def searcher(*args, **kwargs):
        with socket.create_connection(("127.0.0.1", port), timeout=2):  # the port already takes connections
            seen["listening"] = True
        return SimpleNamespace(warm=lambda: None, index=None, pool=SimpleNamespace(n_images=3), notes=[],
                               memory=SimpleNamespace(describe=lambda: "pool embeddings held"))

    def run_server(searcher, host, port, sock):
        seen["served on"] = sock.getsockname()

    monkeypatch.setattr(search_module, "Searcher", searcher)
    monkeypatch.setattr(serve_module, "serve", run_server)
    result = CliRunner().invoke(main, ["serve", "--run", str(served["run"]), "--port", str(port)])
    assert result.exit_code == 0, result.output
    assert seen == {"listening": True, "served on": ("127.0.0.1", port)}
    assert f"serving 3 images of {served['run']} (exact scan; pool embeddings held) on http://127.0.0.1:{port}/" in result.output
    with socket.socket() as again:  # closed once the server returns
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(("127.0.0.1", port))


def test_every_answer_says_how_its_scores_were_ranked(served):
    """Hits carry the ranked score and the plain cosine, equal to the command line's; the answer names
    the ranking, as the command line does."""
    query = served["test"].captions[2]
    answer = served["client"].get("/api/search/text", params={"q": query, "k": 4}).json()
    want = search(served["run"], text=query, k=4)
    assert answer["ranked_by"] == want.ranking
    for got, hit in zip(answer["hits"], want.hits):
        assert got["score"] == pytest.approx(hit.score, abs=1e-4)
        assert got["cosine"] == pytest.approx(hit.cosine, abs=1e-4)
    upload = served["client"].post("/api/search/image", content=_png(), headers={"content-type": "image/png"}).json()
    assert upload["ranked_by"] and upload["captions_ranked_by"] and "cosine" in upload["captions"][0]


def test_queries_run_on_onnx_runtime_and_rank_as_pytorch_does(served, monkeypatch):
    on_onnx, on_torch = Searcher(served["run"]), Searcher(served["run"], runtime="torch")
    assert on_onnx.backbone.text_runtime is not None and on_onnx.backbone.image_runtime is not None
    assert on_torch.backbone.text_runtime is None and on_torch.backbone.image_runtime is None
    graphs = sorted(p.name for p in (on_onnx.run.features_dir / "graphs").glob("*.onnx"))
    assert [g.split("-")[1] for g in graphs] == ["clip", "clip"] and len(graphs) == 2  # tiny-clip-image, -text
    query = served["test"].captions[5]
    a, b = on_onnx.embed_text(query), on_torch.embed_text(query)
    assert (a - b).abs().max() < 1e-4
    image = served["root"] / "query.png"
    image.write_bytes(_png())
    assert (on_onnx.embed_image(image) - on_torch.embed_image(image)).abs().max() < 1e-4
    assert [h.image_id for h in on_onnx.images(a, 5).hits] == [h.image_id for h in on_torch.images(b, 5).hits]
    monkeypatch.setattr("medembed.extract.backbones.onnx_runtime.onnxruntime_version", lambda: None)
    result = CliRunner().invoke(main, ["search", "--run", str(served["run"]), "--text", query, "--runtime", "onnx"])
    assert result.exit_code == 1 and result.output.strip().splitlines() == [
        "Error: --runtime onnx needs onnxruntime: pip install onnx onnxruntime (or --runtime torch)"]
    fallback = search(served["run"], text=query, k=3)
    assert any("onnxruntime is not installed" in n for n in fallback.notes)
