"""`cli.py serve`: a local search page and JSON API over one run's pool.

One `Searcher` (run, pool, backbone, index) answers every request: text -> images, image ->
captions and image -> similar images, filtered by split, modality and named concept, paged. New
text and uploaded images are encoded with the run's own backbone, exactly as `cli.py search` does.

What a request can reach is bounded by construction: an image is addressed by its position in the
pool (`split:row`) and its bytes are read from the location the cache recorded for that row, under
the data folder's rule (`extract.access`: never a file outside it), so no path from a request ever
reaches the file system; uploads are capped in bytes while they stream in
(nothing past the cap is read off the connection, held or spooled) and in pixels (the extractor's
decompression-bomb check); every refusal is a 4xx with a one-line reason, in the API's own terms
(query parameters, never the command line's flags).
"""
from __future__ import annotations

import errno
import io
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Message, Receive

from medembed.evaluate.zeroshot import DEFAULT_MODALITIES
from medembed.extract.imaging import DEFAULT_DECODE, DecodeOptions, decode_image
from medembed.extract.imaging.dicom import DICOM_SUFFIXES
from medembed.extract.imaging.nifti import NIFTI_SUFFIXES
from medembed.extract.worker import describe_error
from medembed.serve.explain import explain
from medembed.serve.search import NO_CAPTIONS, Searcher, SearchResult

STATIC = Path(__file__).with_name("static")
THUMBNAIL = 256
FORM_FRAMING = 16 * 2**10  # a multipart form's boundaries and part headers, allowed on top of the image's bytes
# the command line's flags (in `Searcher`'s messages) -> the query parameter that does the same in the API
API_TERMS = {"--exact": "exact=true", "--text": "q", "--split": "split", "-k": "k"}


@dataclass
class ServeLimits:
    max_upload_bytes: int = 10 * 2**20
    max_upload_pixels: int = 40_000_000
    max_k: int = 200
    max_query_chars: int = 2000


class PagePool:
    """The searcher's pool images as request keys (`split:row`), their filters and concept names.
    Keys are parsed, never listed: a pool of ten million images costs its labels, not ten million
    strings."""

    def __init__(self, searcher: Searcher):
        self.searcher = searcher
        pool = searcher.pool
        self.n_images = pool.n_images
        self.split_names = pool.names
        first = pool.splits[0]
        self.concept_ids = list(first.concept_ids)
        named = [i for i, n in enumerate(first.concept_names) if n]
        self.labels = None
        if first.concepts is not None and first.concepts.shape[1]:
            import scipy.sparse as sp

            self.labels = sp.vstack([s.concepts for s in pool.splits], format="csc")
        counts = np.asarray(self.labels.sum(0)).ravel() if self.labels is not None else np.zeros(len(self.concept_ids))
        self.concepts = [{"id": first.concept_ids[i], "name": first.concept_names[i], "images": int(counts[i])}
                         for i in sorted(named, key=lambda i: -counts[i]) if counts[i] > 0]
        col = {c: i for i, c in enumerate(self.concept_ids)}
        self.modalities = [{"label": m.label, "id": m.concept_id, "images": int(counts[col[m.concept_id]])}
                           for m in DEFAULT_MODALITIES if m.concept_id in col and counts[col[m.concept_id]] > 0]

    def row(self, key: str) -> int:
        """The pool row of `split:row`; 404 for anything else."""
        split, _, row = key.rpartition(":")
        pool = self.searcher.pool
        if split not in self.split_names or not re.fullmatch(r"0|[1-9][0-9]*", row) or \
                int(row) >= pool.splits[self.split_names.index(split)].n_images:
            raise HTTPException(404, f"no image {key!r} in this run's pool")
        return pool.pool_row(split, int(row))

    def location(self, key: str) -> str:
        return self.searcher.pool.location(self.row(key))

    def open_image(self, row: int) -> Image.Image:
        """Pool image `row` (from `row`), read under its data folder's rule: never a file outside it."""
        return self.searcher.pool.open_image(row)

    def unreadable(self, row: int, error: BaseException) -> str:
        """Why pool image `row` could not be opened, naming no path that may identify a patient."""
        return self.searcher.pool.unreadable(row, error)

    def allowed(self, split: str | None, modality: str | None, concept: str | None) -> np.ndarray | None:
        """Which pool images pass the filters (None: all)."""
        mask = np.ones(self.n_images, dtype=bool)
        if split:
            if split not in self.split_names:
                raise HTTPException(400, f"split {split!r} is not in the pool (splits: {', '.join(sorted(self.split_names))})")
            i = self.split_names.index(split)
            starts = self.searcher.pool.image_starts
            mask[:] = False
            mask[starts[i] : starts[i + 1]] = True
        for cid, what in ((modality, "modality"), (concept, "concept")):
            if cid:
                if self.labels is None or cid not in self.concept_ids:
                    raise HTTPException(400, f"{what} {cid!r} is not a concept of this pool")
                mask &= self.labels[:, self.concept_ids.index(cid)].toarray().ravel() > 0
        if not (split or modality or concept):
            return None
        if not mask.any():
            raise HTTPException(404, "no image of the pool passes these filters")
        return mask


def _hits(result: SearchResult, pool: PagePool, offset: int) -> list[dict]:
    out = []
    for h in result.hits[offset:]:
        key = f"{h.split}:{h.image_row}"
        out.append({"rank": h.rank, "score": round(h.score, 4), "cosine": round(h.cosine, 4), "id": h.image_id,
                    "caption": h.caption, "split": h.split, "key": key, "image": f"/api/image/{key}"})
    return out


def _answer(result: SearchResult, pool: PagePool, page: int, per_page: int, started: float, **extra) -> dict:
    # `score` is what the hits are ranked by: `ranked_by` says which (plain cosine, or cos − β·hub with the
    # run's query bank); `cosine` is always the plain cosine of query and hit
    return {"hits": _hits(result, pool, page * per_page), "ranked_by": result.ranking, "via": result.via, "pool": result.pool,
            "target": result.target, "notes": [in_api_terms(n) for n in result.notes], "page": page,
            "per_page": per_page, "ms": round(1000 * (time.perf_counter() - started), 1), **extra}


def _png(image: Image.Image) -> Response:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return Response(buf.getvalue(), media_type="image/png")


_FLAG = re.compile(r"(?<![\w-])(" + "|".join(map(re.escape, sorted(API_TERMS, key=len, reverse=True))) + r")\b")


def in_api_terms(text: str) -> str:
    """`text` with each command-line flag named as the query parameter that does the same.

    `Searcher` words its notes for `cli.py search` ("search again with --exact"); a JSON client sends
    query parameters, so a flag in an answer would name something it cannot send."""
    return _FLAG.sub(lambda m: API_TERMS[m.group(1)], text)


def _too_large(limit: int) -> HTTPException:
    return HTTPException(413, f"upload is larger than {limit} bytes")


def _counted(receive: Receive, cap: int, limit: int) -> Receive:
    """`receive` counting the body's bytes as they arrive: a 413 as soon as they pass `cap`, so at most
    one chunk past the cap is ever pulled off the connection and nothing past it is kept."""
    seen = 0

    async def counted() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > cap:
                raise _too_large(limit)
        return message

    return counted


def _declared_length(request: Request) -> int | None:
    value = request.headers.get("content-length")
    if value is None:
        return None
    if not value.strip().isdigit():
        raise HTTPException(400, f"Content-Length: {value!r} is not a byte count")
    return int(value)


def upload_name(name: str | None) -> str:
    """What a raw-body upload is called while it is decoded and in messages: "upload", plus the NIfTI
    or DICOM suffix of the name the client gave (`?name=scan.nii.gz`), which is what tells a NIfTI
    volume or a DICOM file without the Part 10 preamble apart (other formats are known by their
    content). Nothing else of a file name is kept: it may name a patient."""
    lower = (name or "").lower()
    return "upload" + next((s for s in (*NIFTI_SUFFIXES, *DICOM_SUFFIXES) if lower.endswith(s)), "")


def _is_form(request: Request) -> bool:
    return request.headers.get("content-type", "").split(";")[0].strip().lower() == "multipart/form-data"


async def read_upload(request: Request, limit: int, name: str = "upload") -> tuple[bytes, str]:
    """The uploaded image's bytes and a name for messages, never more than `limit` bytes read.

    The body is the image file itself (what the page sends), or a multipart form whose `file` part is
    (`curl -F file=@x.png`; the form's framing may add FORM_FRAMING bytes). A Content-Length over the
    cap is refused before anything is read; otherwise the body is counted while it streams in, since a
    spooled upload checked only at its end can fill the disk first. `name` is a raw body's name (see
    `upload_name`); a form's file part carries its own."""
    form = _is_form(request)
    cap = limit + (FORM_FRAMING if form else 0)
    declared = _declared_length(request)
    if declared is not None and declared > cap:
        raise _too_large(limit)
    body = Request(request.scope, _counted(request.receive, cap, limit))
    if not form:
        data = bytearray()
        async for chunk in body.stream():
            data += chunk
        return bytes(data), name
    async with body.form(max_files=1, max_fields=8) as fields:
        part = fields.get("file")
        if not isinstance(part, UploadFile):
            raise HTTPException(400, "file: the form has no file part named 'file' (or send the image's bytes as "
                                     "the request body)")
        data = await part.read(limit + 1)
    if len(data) > limit:
        raise _too_large(limit)
    return data, part.filename or "upload"


def decode_upload(data: bytes, name: str, max_pixels: int, options: DecodeOptions = DEFAULT_DECODE) -> Image.Image:
    """An uploaded image (a DICOM file too, windowed as the pool was), or a 400 with the one-line
    reason it is not one (never a traceback)."""
    try:
        return decode_image(data, name, options, max_pixels=max_pixels)
    except Exception as e:  # noqa: BLE001 - any decode failure is one reason
        raise HTTPException(400, f"{name}: {describe_error(e)}") from None


def create_app(searcher: Searcher, limits: ServeLimits | None = None) -> FastAPI:
    """The app: the page at /, the JSON API under /api. Built once per served run."""
    limits = limits or ServeLimits()
    pool = PagePool(searcher)
    app = FastAPI(title="medembed search", docs_url=None, redoc_url=None)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x not in ("query", "body"))
        return JSONResponse({"error": f"{where}: {first.get('msg', 'invalid request')}"}, status_code=422)

    @app.exception_handler(StarletteHTTPException)  # also the router's own 404 / 405
    async def refused(request: Request, exc: StarletteHTTPException):
        """Every refusal as {"error": one line}, a command-line flag in it named as its query parameter."""
        detail = exc.detail if exc.status_code != 404 or exc.detail != "Not Found" else f"no such page: {request.url.path}"
        return JSONResponse({"error": in_api_terms(str(detail))}, status_code=exc.status_code)

    def page_args(k: int, page: int) -> tuple[int, int]:
        if k * (page + 1) > limits.max_k:
            raise HTTPException(400, f"k x (page + 1) = {k * (page + 1)} is more than the {limits.max_k} results served")
        return k, page

    def ranked(query, k: int, page: int, allowed: np.ndarray | None, exact: bool, by: str) -> SearchResult:
        """Pages 0..page of k images. The count asked is capped at the images searched here, so the note
        saying so speaks of k and page (the searcher's own would name `cli.py search`'s -k)."""
        searched = pool.n_images if allowed is None else int(allowed.sum())
        asked = k * (page + 1)
        result = searcher.images(query, min(asked, searched), exact=exact, allowed=allowed, by=by)
        if asked > searched:
            result.notes.insert(0, f"k x (page + 1) = {asked} is more than the {searched} images searched: "
                                   f"all {searched} are ranked")
        return result

    @app.get("/api/info")
    def info() -> dict:
        run, first = searcher.run, searcher.pool.splits[0]
        index = searcher.index[1].kind if searcher.index is not None else None
        return {"run": str(run.checkpoint or run.run_dir), "backbone": first.attrs.get("backbone", ""),
                "dataset": first.attrs.get("dataset", ""), "pool_images": pool.n_images,
                "pool_captions": searcher.pool.n_captions, "splits": sorted(pool.split_names),
                "index": index, "modalities": pool.modalities, "concepts": pool.concepts[:500],
                "explain": True, "ranking": searcher.model.ranking, "max_upload_bytes": limits.max_upload_bytes}

    @app.get("/api/search/text")
    def search_text(q: str = Query(..., max_length=limits.max_query_chars), k: int = Query(12, ge=1, le=100),
                    page: int = Query(0, ge=0), split: str | None = None, modality: str | None = None,
                    concept: str | None = None, exact: bool = False) -> dict:
        started = time.perf_counter()
        if not q.strip():
            raise HTTPException(400, "q: the query is empty")
        k, page = page_args(k, page)
        allowed = pool.allowed(split, modality, concept)
        result = ranked(searcher.embed_text(q), k, page, allowed, exact, "text")
        return _answer(result, pool, page, k, started, query=q)

    @app.get("/api/similar/{key}")
    def similar(key: str, k: int = Query(12, ge=1, le=100), page: int = Query(0, ge=0), split: str | None = None,
                modality: str | None = None, concept: str | None = None, exact: bool = False) -> dict:
        started = time.perf_counter()
        k, page = page_args(k, page)
        query = searcher.image_embedding(pool.row(key))
        result = ranked(query, k, page, pool.allowed(split, modality, concept), exact, "image")
        return _answer(result, pool, page, k, started, query_key=key)

    @app.get("/api/captions/{key}")
    def captions(key: str, k: int = Query(5, ge=1, le=50)) -> dict:
        started = time.perf_counter()
        result = searcher.captions(searcher.image_embedding(pool.row(key)), k)
        return _answer(result, pool, 0, k, started, query_key=key)

    def image_answer(data: bytes, name: str, k: int, page: int, allowed: np.ndarray | None, exact: bool) -> dict:
        image = decode_upload(data, name, limits.max_upload_pixels, searcher.pool.decode)
        started = time.perf_counter()
        query = searcher.embed_image(image)
        images = ranked(query, k, page, allowed, exact, "image")
        caps = searcher.captions(query, min(k, 10))
        if not searcher.pool.n_captions:  # an image-only collection: the similar images are the whole answer
            images.notes.append(f"{NO_CAPTIONS}: these are the most similar images")
        return {**_answer(images, pool, page, k, started), "captions": _hits(caps, pool, 0),
                "captions_ranked_by": caps.ranking}

    @app.post("/api/search/image")
    async def search_image(request: Request, k: int = Query(12, ge=1, le=100), page: int = Query(0, ge=0),
                           split: str | None = None, modality: str | None = None, concept: str | None = None,
                           exact: bool = False, name: str | None = Query(None, max_length=255)) -> dict:
        """Images like the uploaded one and its nearest captions, with the text query's filters and paging.
        Paging re-sends the image: the server keeps nothing of an upload between requests. The filters
        are checked before a byte of the upload is read. `name`: a raw body's file name (its suffix
        tells a NIfTI volume or a DICOM file without the Part 10 preamble)."""
        k, page = page_args(k, page)
        allowed = pool.allowed(split, modality, concept)
        data, name = await read_upload(request, limits.max_upload_bytes, upload_name(name))
        return await run_in_threadpool(image_answer, data, name, k, page, allowed, exact)

    @app.get("/api/image/{key}")
    def image(key: str, size: str = Query("thumb", pattern="^(thumb|full)$")) -> Response:
        row = pool.row(key)  # only pool rows map to a location; the request names none
        try:
            img = pool.open_image(row)
        except Exception as e:  # noqa: BLE001
            raise HTTPException(404, f"{key}: image not readable ({pool.unreadable(row, e)})") from None
        if size == "thumb":
            img.thumbnail((THUMBNAIL, THUMBNAIL))
        return _png(img)

    @app.get("/api/explain/{key}")
    def explain_map(key: str, q: str = Query(..., max_length=limits.max_query_chars)) -> Response:
        if not q.strip():
            raise HTTPException(400, "q: the query is empty")
        row = pool.row(key)
        try:
            img = pool.open_image(row)
        except Exception as e:  # noqa: BLE001
            raise HTTPException(404, f"{key}: image not readable ({pool.unreadable(row, e)})") from None
        try:
            e = explain(searcher.run, searcher.backbone, img, searcher.embed_text(q))
        except ValueError as err:
            raise HTTPException(400, str(err)) from None
        return _png(e.overlay())

    @app.get("/")
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def listen(host: str, port: int) -> socket.socket:
    """A socket listening on (host, port), for `serve`. `cli.py serve` opens it before loading the model,
    so a busy port is one line at once instead of an error after the loading, and no other process can
    take the port meanwhile (connections wait in the backlog until the page answers). Refusals are a
    ValueError of one line naming the flag to change."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is no conflict
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise ValueError(_listen_refusal(e, host, port)) from None
    return sock


def _listen_refusal(e: OSError, host: str, port: int) -> str:
    if e.errno == errno.EADDRINUSE:
        return f"port {port} on {host} is in use; choose another with --port"
    if e.errno == errno.EACCES:
        return f"port {port} on {host}: permission denied (ports below 1024 need privileges); choose another with --port"
    return f"cannot listen on {host} port {port}: {e.strerror or e}; choose another --host or --port"


def serve(searcher: Searcher, host: str = "127.0.0.1", port: int = 8000, limits: ServeLimits | None = None,
          sock: socket.socket | None = None) -> None:
    """Run the page until interrupted (uvicorn, one process) on `sock` from `listen`, opened here when not
    given; the socket is closed on return."""
    import uvicorn

    if sock is None:
        sock = listen(host, port)
    server = uvicorn.Server(uvicorn.Config(create_app(searcher, limits), log_level="warning"))
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
