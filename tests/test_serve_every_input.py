"""Every route of the search page answers every input: each pool kind (captioned, image-only, DICOM
image-only; with an index and without) x each query kind (text, image uploads raw and as a form,
DICOM uploads, similar-by-key, garbage and empty bodies, bad parameters). No request may get a 5xx;
a refusal is a 4xx with a one-line reason. The routes and their parameters are read from the app
itself, so a route added later is driven here without a line of this file changing."""
from __future__ import annotations

import io
import shutil
import typing
from pathlib import Path

import numpy as np
import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from matplotlib.text import Text
from PIL import Image
from pydicom.data import get_testdata_file
from starlette.routing import Mount

from medembed.adapt.config import AdaptConfig
from medembed.adapt.run import read_querybank
from medembed.adapt.trainer import train
from medembed.model import grids
from medembed.serve.index import IndexOptions, build_index
from medembed.serve.page import ServeLimits, create_app
from medembed.serve.search import Searcher, search
from tests.conftest import tiny_clip_cache

DICOMS = ("CT_small.dcm", "MR_small_RLE.dcm", "MR_small.dcm")
LIMITS = ServeLimits(max_upload_bytes=300_000, max_upload_pixels=1200 * 1200)


def _image(mode: str = "RGB", size=(40, 40), fmt: str = "PNG", colour=None, **save) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, colour if colour is not None else (200, 40, 40) if mode == "RGB" else 100).save(
        buf, format=fmt, **save)
    return buf.getvalue()


def _gif_frames() -> bytes:
    buf = io.BytesIO()
    frames = [Image.new("P", (24, 24), i) for i in (10, 200)]
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    return buf.getvalue()


def _nifti() -> bytes:
    import nibabel as nib

    volume = np.arange(12 * 10 * 3, dtype=np.int16).reshape(12, 10, 3)
    return nib.Nifti1Image(volume, np.eye(4)).to_bytes()


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("every-input")
    cache = tiny_clip_cache(root, {"train": 16, "valid": 8, "test": 8})
    run = root / "run"
    train(AdaptConfig(features_dir=str(cache), out=str(run), head="linear", dim=16, epochs=1, batch_size=8),
          progress=False)
    images = root / "photos"
    images.mkdir()
    for i, colour in enumerate([(220, 30, 30), (30, 200, 40), (30, 40, 220), (128, 128, 128)]):
        Image.new("RGB", (36, 36), colour).save(images / f"p{i}.png")
    dicoms = root / "dicom-archive"
    dicoms.mkdir()
    for name in DICOMS:  # pydicom's sample files, copied at test time
        shutil.copy(get_testdata_file(name), dicoms / name)
    features = root / "pools"
    assert read_querybank(run).images.active  # the pools' indexes are checked against a bank of their own
    build_index(run, IndexOptions(kind="ivf", nlist=2, nprobe=1))
    build_index(run, IndexOptions(kind="hnsw", m=8, data=str(images), features_root=str(features)))
    build_index(run, IndexOptions(kind="flat", data=str(dicoms), features_root=str(features)))
    return {"run": run, "data": {"captioned": None, "image-only": images, "dicom": dicoms}, "features": features}


POOLS = [(kind, indexed) for kind in ("captioned", "image-only", "dicom") for indexed in (True, False)]


def _client(project, kind: str, indexed: bool) -> TestClient:
    data = project["data"][kind]
    searcher = Searcher(project["run"], data=None if data is None else str(data),
                        features_root=str(project["features"]), use_index=indexed)
    assert (searcher.index is not None) == indexed
    return TestClient(create_app(searcher, LIMITS), raise_server_exceptions=False)


def _bodies() -> list[tuple[str, dict]]:
    """(name, request keywords) of every upload tried against a route that takes a body."""
    dicom = {n: Path(get_testdata_file(n)).read_bytes() for n in DICOMS[:2]}
    png = _image()
    raw = {
        "png": (png, "image/png"), "jpeg": (_image(fmt="JPEG", quality=80), "image/jpeg"),
        "CT_small.dcm": (dicom["CT_small.dcm"], "application/dicom"),
        "MR_small_RLE.dcm": (dicom["MR_small_RLE.dcm"], "application/octet-stream"),
        "nifti": (_nifti(), "application/octet-stream"),
        "1x1": (_image(size=(1, 1)), "image/png"), "16-bit grey": (_image("I;16", colour=3000), "image/png"),
        "rgba": (_image("RGBA", colour=(1, 2, 3, 0)), "image/png"), "palette gif": (_gif_frames(), "image/gif"),
        "cmyk jpeg": (_image("CMYK", fmt="JPEG", colour=(0, 50, 90, 10)), "image/jpeg"),
        "1-bit": (_image("1", colour=1), "image/png"), "float tiff": (_image("F", fmt="TIFF", colour=0.5), "image/tiff"),
        "truncated png": (png[: len(png) // 2], "image/png"), "truncated dicom": (dicom["CT_small.dcm"][:1000], ""),
        "garbage": (b"\x00\xffnot an image at all" * 10, "image/png"), "empty": (b"", "image/png"),
        "text": ("ünïcødé ⚕ text".encode(), "text/plain"), "json": (b'{"q": "a"}', "application/json"),
        "too large": (b"\x89PNG" + b"0" * 400_000, "image/png"),
        "bomb": (_image("L", size=(1300, 1300)), "image/png"),
    }
    out = [(f"raw {name}", {"content": data, "headers": {"content-type": ctype} if ctype else {}})
           for name, (data, ctype) in raw.items()]
    for name in ("png", "CT_small.dcm", "MR_small_RLE.dcm", "garbage", "empty"):
        out.append((f"form {name}", {"files": {"file": (name, raw[name][0], raw[name][1] or "application/octet-stream")}}))
    out += [
        ("form without a file part", {"files": {"other": ("a.png", png, "image/png")}}),
        ("form field, not a file", {"data": {"file": "not a file"}}),
        ("form with no boundary", {"content": b"--x\r\n\r\n", "headers": {"content-type": "multipart/form-data"}}),
        ("form cut short", {"content": b"--b0\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a\"\r\n\r\nab",
                            "headers": {"content-type": "multipart/form-data; boundary=b0"}}),
        ("empty form", {"content": b"", "headers": {"content-type": "multipart/form-data; boundary=b0"}}),
        ("bad length", {"content": png, "headers": {"content-type": "image/png", "content-length": "12abc"}}),
        ("urlencoded", {"content": b"file=%00%01", "headers": {"content-type": "application/x-www-form-urlencoded"}}),
    ]
    return out


def _values(name: str, annotation, split: str, key: str) -> list[str | None]:
    """Valid and hostile values of one parameter (the valid ones first); None leaves it out."""
    by_name = {
        "q": ["a red square", "", "   ", "x" * 3000, "ünïcødé ⚕ %00 <script>", "\n"],
        "k": ["3", "0", "-1", "1000", "abc", "1.5", ""],
        "page": ["0", "1", "-1", "99999999999999999999", "x"],
        "split": [None, split, "nope", "", "../test"],
        "modality": [None, "C0000001", "C9", ""],
        "concept": [None, "C0000002", "C9", ""],
        "exact": ["true", "false", "maybe"],
        "size": ["thumb", "full", "huge"],
        "name": [None, "scan.nii.gz", "IM0001", "../../etc/passwd.dcm", "x." + "y" * 40, "x" * 300],
        "key": [key, "nope", f"{split}:999999", f"{split}:-1", f"{split}:01", ":", "..", "%2e%2e%2fetc%2fpasswd",
                f"{split}:{'9' * 40}"],
    }
    if name in by_name:
        return by_name[name]
    kinds = set(typing.get_args(annotation)) or {annotation}
    if int in kinds:
        return ["1", "-1", "x"]
    if bool in kinds:
        return ["true", "x"]
    return ["x", ""]


def _fields(dependant, kind: str) -> list:
    """A route's `kind` parameters (query_params, path_params): its own, then its dependencies'."""
    return [*getattr(dependant, kind), *(f for d in dependant.dependencies for f in _fields(d, kind))]


def _requests(app, split: str, key: str) -> list[tuple[str, str, str, dict, dict]]:
    """(label, method, path, params, request keywords) for every route of `app`: its valid request, then
    each parameter in turn set to each of its values, then (for a route taking a body) every body."""
    out = []
    bodies = _bodies()
    for route in app.routes:
        if isinstance(route, Mount):
            for tail in ("app.js", "index.html", "style.css", "nope.js", "..%2f..%2fpage.py", ""):
                out.append((f"{route.path}/{tail}", "GET", f"{route.path}/{tail}", {}, {}))
            continue
        methods = sorted(getattr(route, "methods", None) or {"GET"})
        params, path_params = {}, {}
        if isinstance(route, APIRoute):
            params = {p.name: _values(p.name, p.field_info.annotation, split, key)
                      for p in _fields(route.dependant, "query_params")}
            path_params = {p.name: _values(p.name, p.field_info.annotation, split, key)
                           for p in _fields(route.dependant, "path_params")}
        for method in methods:
            if method == "HEAD":
                continue
            base_path = {n: v[0] for n, v in path_params.items()}
            base = {n: v[0] for n, v in params.items() if v[0] is not None}
            body = bodies[0][1] if method in ("POST", "PUT", "PATCH") else {}
            variants = [("valid", base_path, base, body)]
            for n, values in path_params.items():
                variants += [(f"{n}={v!r}", {**base_path, n: v}, base, body) for v in values[1:]]
            for n, values in params.items():
                for v in values[1:]:
                    changed = {**base, n: v} if v is not None else {m: w for m, w in base.items() if m != n}
                    variants.append((f"{n}={v[:40]!r}" if v else f"{n}={v!r}", base_path, changed, body))
            if body:
                variants += [(name, base_path, base, kw) for name, kw in bodies[1:]]
            variants.append(("wrong method", base_path, base, {}))
            for label, pp, qp, kw in variants:
                path = route.path.format(**pp) if pp else route.path
                verb = ("GET" if method != "GET" else "DELETE") if label == "wrong method" else method
                out.append((f"{verb} {route.path} {label}", verb, path, qp, kw))
    return out


def _problem(response) -> str | None:
    """What is wrong with one answer, or None."""
    if response.status_code >= 500:
        return f"{response.status_code}: {response.text[:200]}"
    if response.status_code >= 400:
        try:
            error = response.json()["error"]
        except (ValueError, KeyError, TypeError):
            return f"{response.status_code} without a JSON error: {response.text[:200]}"
        if not error or "\n" in error or "Traceback" in response.text:
            return f"{response.status_code}: not one line: {error!r}"
    return None


@pytest.mark.parametrize(("kind", "indexed"), POOLS, ids=[f"{k}-{'index' if i else 'exact'}" for k, i in POOLS])
def test_no_request_to_any_route_gets_a_server_error(project, kind, indexed):
    client = _client(project, kind, indexed)
    info = client.get("/api/info").json()
    split = info["splits"][0]
    key = f"{split}:1"
    requests = _requests(client.app, split, key)
    routes = {r.path for r in client.app.routes}
    assert {"/api/search/text", "/api/search/image", "/api/similar/{key}", "/api/captions/{key}"} <= routes
    assert len(requests) > 150
    problems, answered = [], 0
    for label, method, path, params, kw in requests:
        response = client.request(method, path, params=params, **kw)
        problem = _problem(response)
        if problem:
            problems.append(f"{label}: {problem}")
        answered += response.status_code < 300
    assert problems == [], "\n".join(problems)
    assert answered > 40  # the valid requests were answered, not refused


def test_an_image_query_over_a_caption_less_pool_answers_with_the_most_similar_images(project):
    """As `cli.py search --image` does over an image-only collection: images, no captions, a note."""
    client = _client(project, "dicom", indexed=False)
    for name in DICOMS[:2]:
        data = Path(get_testdata_file(name)).read_bytes()
        for answer in (client.post("/api/search/image", content=data, params={"k": 3}),
                       client.post("/api/search/image", files={"file": (name, data, "application/dicom")},
                                   params={"k": 3})):
            assert answer.status_code == 200, answer.text
            got = answer.json()
            assert got["target"] == "images" and len(got["hits"]) == 3 and got["captions"] == []
            assert got["hits"][0]["cosine"] == pytest.approx(1.0, abs=1e-3)  # the pool's own copy of it, first
            assert any("no captions" in n for n in got["notes"]), got["notes"]
    jpeg = client.post("/api/search/image", content=_image(fmt="JPEG"), headers={"content-type": "image/jpeg"})
    assert jpeg.status_code == 200 and len(jpeg.json()["hits"]) == 3  # k capped at the pool's 3 images
    captions = client.get("/api/captions/all:0")
    assert captions.status_code == 200 and captions.json()["hits"] == []
    assert any("no captions" in n for n in captions.json()["notes"])


def test_search_draws_an_image_query_over_a_caption_less_pool_beside_its_similar_images(project, tmp_path,
                                                                                        monkeypatch):
    """`cli.py search --image --out` over an image-only collection: the grid shows the images it answers
    with (not a list of empty captions), and calls the query "query image", not by its file name."""
    drawn = []
    save = grids.save_figure

    def spy(fig, path):
        drawn.append(([t.get_text() for t in fig.findobj(Text) if t.get_text()],
                      [np.asarray(im.get_array()) for ax in fig.axes for im in ax.get_images()]))
        return save(fig, path)

    monkeypatch.setattr(grids, "save_figure", spy)
    query = tmp_path / "Doe^Jane_MRN55120.png"
    Image.new("RGB", (36, 36), (30, 200, 40)).save(query)  # the pool's green image
    result = search(project["run"], image=str(query), k=3, data=str(project["data"]["image-only"]),
                    features_root=str(project["features"]), out=tmp_path / "grid.png")
    assert result.target == "images" and len(result.hits) == 3
    assert result.hits[0].cosine == pytest.approx(1.0, abs=1e-3)
    ((texts, images),) = drawn
    assert len(images) == 4  # the query, then its three similar images
    assert np.abs(images[1].reshape(-1, 3).mean(0) - (30, 200, 40)).max() < 2  # the best hit: the pool's green image
    assert "query image" in texts and not [t for t in texts if "Doe" in t or "MRN" in t], texts
    assert [next(t for t in texts if t.startswith(f"{i + 1}. ")).split()[1] for i in range(3)] == \
        [h.image_id for h in result.hits]
    assert (tmp_path / "grid.png").read_bytes()[:4] == b"\x89PNG"


def test_the_page_chooser_offers_dicom_and_nifti_files(project):
    page = _client(project, "dicom", indexed=False).get("/").text
    chooser = next(line for line in page.splitlines() if 'type="file"' in line)
    accept = {a.strip() for a in chooser.split('accept="')[1].split('"')[0].split(",")}
    assert {"image/*", ".dcm", "application/dicom", ".nii", ".nii.gz"} <= accept, accept


def test_a_nifti_upload_is_decoded_by_the_suffix_of_the_name_it_gives(project):
    """A NIfTI volume has no signature: the page sends its file's suffix as `name` (nothing more)."""
    import gzip

    client = _client(project, "image-only", indexed=False)
    volume = _nifti()
    for name, body in (("brain.nii", volume), ("Doe^Jane.nii.gz", gzip.compress(volume))):
        answer = client.post("/api/search/image", content=body, params={"k": 2, "name": name})
        assert answer.status_code == 200, answer.text
        assert len(answer.json()["hits"]) == 2
    unnamed = client.post("/api/search/image", content=volume, params={"k": 2})
    assert unnamed.status_code == 400 and unnamed.json()["error"] == "upload: not an image (unrecognised format)"
    refused = client.post("/api/search/image", content=b"\x00" * 400, params={"name": "Doe^Jane.nii.gz"})
    assert refused.status_code == 400 and refused.json()["error"].startswith("upload.nii.gz: ")
