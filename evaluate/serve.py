"""`cli.py serve`: a local search page and JSON API over one run's pool.

One `Searcher` (run, pool, backbone, index) answers every request: text -> images, image ->
captions and image -> similar images, filtered by split, modality and named concept, paged. New
text and uploaded images are encoded with the run's own backbone, exactly as `cli.py search` does.

What a request can reach is bounded by construction: an image is addressed by its position in the
pool (`split:row`) and its bytes are read from the location the cache recorded for that row, so no
path from a request ever reaches the file system; uploads are capped in bytes and pixels (the
extractor's decompression-bomb check); every refusal is a 4xx with a one-line reason.
"""
from __future__ import annotations

import io
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from starlette.exceptions import HTTPException as StarletteHTTPException

from medembed.evaluate.examples import image_path
from medembed.evaluate.explain import explain
from medembed.evaluate.search import Searcher, SearchResult
from medembed.evaluate.zeroshot import DEFAULT_MODALITIES
from medembed.extract.records import decode_image, open_image
from medembed.extract.worker import describe_error

STATIC = Path(__file__).with_name("static")
THUMBNAIL = 256


@dataclass
class ServeLimits:
    max_upload_bytes: int = 10 * 2**20
    max_upload_pixels: int = 40_000_000
    max_k: int = 200
    max_query_chars: int = 2000


class Pool:
    """The searcher's pool images as request keys (`split:row`), their filters and concept names."""

    def __init__(self, searcher: Searcher):
        self.searcher = searcher
        splits = searcher.pool.splits
        self.keys = [f"{splits[si].split}:{row}" for si, row in searcher.pool.image_of]
        self.index = {k: i for i, k in enumerate(self.keys)}
        self.split_of = np.array([splits[si].split for si, _ in searcher.pool.image_of])
        first = splits[0]
        self.concept_ids = list(first.concept_ids)
        named = [i for i, n in enumerate(first.concept_names) if n]
        self.labels = None
        if first.concepts is not None and first.concepts.shape[1]:
            import scipy.sparse as sp

            self.labels = sp.vstack([s.concepts for s in splits], format="csc")
        counts = np.asarray(self.labels.sum(0)).ravel() if self.labels is not None else np.zeros(len(self.concept_ids))
        self.concepts = [{"id": first.concept_ids[i], "name": first.concept_names[i], "images": int(counts[i])}
                         for i in sorted(named, key=lambda i: -counts[i]) if counts[i] > 0]
        col = {c: i for i, c in enumerate(self.concept_ids)}
        self.modalities = [{"label": m.label, "id": m.concept_id, "images": int(counts[col[m.concept_id]])}
                           for m in DEFAULT_MODALITIES if m.concept_id in col and counts[col[m.concept_id]] > 0]

    def row(self, key: str) -> int:
        if key not in self.index:
            raise HTTPException(404, f"no image {key!r} in this run's pool")
        return self.index[key]

    def location(self, key: str) -> str:
        si, row = self.searcher.pool.image_of[self.row(key)]
        return image_path(self.searcher.pool.splits[si], row)

    def allowed(self, split: str | None, modality: str | None, concept: str | None) -> np.ndarray | None:
        """Which pool images pass the filters (None: all)."""
        mask = np.ones(len(self.keys), dtype=bool)
        if split:
            if split not in set(self.split_of):
                raise HTTPException(400, f"split {split!r} is not in the pool (splits: {', '.join(sorted(set(self.split_of)))})")
            mask &= self.split_of == split
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


def _hits(result: SearchResult, pool: Pool, offset: int) -> list[dict]:
    out = []
    for h in result.hits[offset:]:
        key = f"{h.split}:{h.image_row}"
        out.append({"rank": h.rank, "score": round(h.score, 4), "id": h.image_id, "caption": h.caption,
                    "split": h.split, "key": key, "image": f"/api/image/{key}"})
    return out


def _answer(result: SearchResult, pool: Pool, page: int, per_page: int, started: float, **extra) -> dict:
    return {"hits": _hits(result, pool, page * per_page), "via": result.via, "pool": result.pool,
            "target": result.target, "notes": result.notes, "page": page, "per_page": per_page,
            "ms": round(1000 * (time.perf_counter() - started), 1), **extra}


def _png(image: Image.Image) -> Response:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return Response(buf.getvalue(), media_type="image/png")


def create_app(searcher: Searcher, limits: ServeLimits | None = None) -> FastAPI:
    """The app: the page at /, the JSON API under /api. Built once per served run."""
    limits = limits or ServeLimits()
    pool = Pool(searcher)
    app = FastAPI(title="medembed search", docs_url=None, redoc_url=None)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x not in ("query", "body"))
        return JSONResponse({"error": f"{where}: {first.get('msg', 'invalid request')}"}, status_code=422)

    @app.exception_handler(StarletteHTTPException)  # also the router's own 404 / 405
    async def refused(request: Request, exc: StarletteHTTPException):
        detail = exc.detail if exc.status_code != 404 or exc.detail != "Not Found" else f"no such page: {request.url.path}"
        return JSONResponse({"error": str(detail)}, status_code=exc.status_code)

    def page_args(k: int, page: int) -> tuple[int, int]:
        if k * (page + 1) > limits.max_k:
            raise HTTPException(400, f"k x (page + 1) = {k * (page + 1)} is more than the {limits.max_k} results served")
        return k, page

    @app.get("/api/info")
    def info() -> dict:
        run, first = searcher.run, searcher.pool.splits[0]
        index = searcher.index[1].kind if searcher.index is not None else None
        return {"run": str(run.checkpoint or run.run_dir), "backbone": first.attrs.get("backbone", ""),
                "dataset": first.attrs.get("dataset", ""), "pool_images": len(pool.keys),
                "pool_captions": len(searcher.pool.caption_of), "splits": sorted(set(pool.split_of)),
                "index": index, "modalities": pool.modalities, "concepts": pool.concepts[:500],
                "explain": True, "ranking": searcher.model.ranking}

    @app.get("/api/search/text")
    def search_text(q: str = Query(..., max_length=limits.max_query_chars), k: int = Query(12, ge=1, le=100),
                    page: int = Query(0, ge=0), split: str | None = None, modality: str | None = None,
                    concept: str | None = None, exact: bool = False) -> dict:
        started = time.perf_counter()
        if not q.strip():
            raise HTTPException(400, "q: the query is empty")
        k, page = page_args(k, page)
        allowed = pool.allowed(split, modality, concept)
        result = searcher.images(searcher.embed_text(q), k * (page + 1), exact=exact, allowed=allowed)
        return _answer(result, pool, page, k, started, query=q)

    @app.get("/api/similar/{key}")
    def similar(key: str, k: int = Query(12, ge=1, le=100), page: int = Query(0, ge=0), split: str | None = None,
                modality: str | None = None, concept: str | None = None, exact: bool = False) -> dict:
        started = time.perf_counter()
        k, page = page_args(k, page)
        query = searcher.image_embeddings[pool.row(key)][None]
        result = searcher.images(query, k * (page + 1), exact=exact, allowed=pool.allowed(split, modality, concept),
                                 by="image")
        return _answer(result, pool, page, k, started, query_key=key)

    @app.get("/api/captions/{key}")
    def captions(key: str, k: int = Query(5, ge=1, le=50)) -> dict:
        started = time.perf_counter()
        result = searcher.captions(searcher.image_embeddings[pool.row(key)][None], k)
        return _answer(result, pool, 0, k, started, query_key=key)

    async def read_upload(file: UploadFile) -> Image.Image:
        data = await file.read(limits.max_upload_bytes + 1)
        if len(data) > limits.max_upload_bytes:
            raise HTTPException(413, f"upload is larger than {limits.max_upload_bytes} bytes")
        try:
            return decode_image(data, limits.max_upload_pixels)
        except Exception as e:  # noqa: BLE001 - any decode failure is one reason, never a traceback
            raise HTTPException(400, f"{file.filename or 'upload'}: {describe_error(e)}") from None

    @app.post("/api/search/image")
    async def search_image(file: UploadFile = File(...), k: int = Query(12, ge=1, le=100)) -> dict:
        image = await read_upload(file)
        started = time.perf_counter()
        query = searcher.embed_image(image)
        images = searcher.images(query, k, by="image")
        caps = searcher.captions(query, min(k, 10))
        return {**_answer(images, pool, 0, k, started), "captions": _hits(caps, pool, 0)}

    @app.get("/api/image/{key}")
    def image(key: str, size: str = Query("thumb", pattern="^(thumb|full)$")) -> Response:
        location = pool.location(key)  # only pool rows map to a location; the request names none
        try:
            img = open_image(location)
        except Exception as e:  # noqa: BLE001
            raise HTTPException(404, f"{key}: image not readable ({describe_error(e)})") from None
        if size == "thumb":
            img.thumbnail((THUMBNAIL, THUMBNAIL))
        return _png(img)

    @app.get("/api/explain/{key}")
    def explain_map(key: str, q: str = Query(..., max_length=limits.max_query_chars)) -> Response:
        if not q.strip():
            raise HTTPException(400, "q: the query is empty")
        try:
            img = open_image(pool.location(key))
        except HTTPException:
            raise
        except Exception as e:  # noqa: BLE001
            raise HTTPException(404, f"{key}: image not readable ({describe_error(e)})") from None
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


def serve(searcher: Searcher, host: str = "127.0.0.1", port: int = 8000, limits: ServeLimits | None = None) -> None:
    """Run the page until interrupted (uvicorn, one process)."""
    import uvicorn

    uvicorn.run(create_app(searcher, limits), host=host, port=port, log_level="warning")
