"""The page's routes: the page at /, the JSON API under /api, one small handler each.

A handler takes the served run (`Page`, from the app's state) and its parameters through the shared
parsers of `page_requests`, calls its checks in the order a client should hear about them, and shapes
the answer. Handlers are plain functions, put on their routes by `add_page_routes` when an app is
built, so the app lists every route itself and nothing here changes when the module is imported.
Sync handlers run in FastAPI's thread pool, so a slow search never blocks the event loop; an upload
is read on the event loop as it streams in, then searched in the thread pool.
"""
from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, Response
from PIL import Image
from starlette.concurrency import run_in_threadpool

from medembed.cache import schema
from medembed.common.errors import MedembedError
from medembed.serve.explain import explain
from medembed.serve.page_errors import in_api_terms
from medembed.serve.page_requests import Page, PageState, Search, SearchArgs, TextQuery, require_text, within_served
from medembed.serve.page_upload import UploadName, decode_upload, read_upload
from medembed.serve.search import NO_CAPTIONS, SearchOptions, SearchResult

STATIC = Path(__file__).with_name("static")
THUMBNAIL = 256


def _hits(result: SearchResult, offset: int) -> list[dict]:
    out = []
    for h in result.hits[offset:]:
        key = f"{h.split}:{h.image_row}"
        out.append({"rank": h.rank, "score": round(h.score, 4), "cosine": round(h.cosine, 4), "id": h.image_id,
                    "caption": h.caption, "split": h.split, "key": key, "image": f"/api/image/{key}"})
    return out


def _answer(result: SearchResult, page: int, per_page: int, started: float, **extra) -> dict:
    # `score` is what the hits are ranked by: `ranked_by` says which (plain cosine, or cos − β·hub with the
    # run's query bank); `cosine` is always the plain cosine of query and hit
    return {"hits": _hits(result, page * per_page), "ranked_by": result.ranking, "via": result.via, "pool": result.pool,
            "target": result.target, "notes": [in_api_terms(n) for n in result.notes], "page": page,
            "per_page": per_page, "ms": round(1000 * (time.perf_counter() - started), 1), **extra}


def _png(image: Image.Image) -> Response:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return Response(buf.getvalue(), media_type="image/png")


def _ranked(state: PageState, query, args: SearchArgs, allowed: np.ndarray | None, by: str) -> SearchResult:
    """Pages 0..page of k images. The count asked is capped at the images searched here, so the note
    saying so speaks of k and page (the searcher's own would name `cli.py search`'s -k)."""
    searched = state.pool.n_images if allowed is None else int(allowed.sum())
    result = state.searcher.images(query, min(args.asked, searched), exact=args.exact, allowed=allowed, by=by)
    if args.asked > searched:
        result.notes.insert(0, f"k x (page + 1) = {args.asked} is more than the {searched} images searched: "
                               f"all {searched} are ranked")
    return result


def info(state: Page) -> dict:
    searcher, pool = state.searcher, state.pool
    run, first = searcher.run, searcher.pool.splits[0]
    index = searcher.index[1].kind if searcher.index is not None else None
    return {"run": str(run.checkpoint or run.run_dir), "backbone": first.attrs.get(schema.BACKBONE, ""),
            "dataset": first.attrs.get(schema.DATASET, ""), "pool_images": pool.n_images,
            "pool_captions": searcher.pool.n_captions, "splits": sorted(pool.split_names),
            "index": index, "modalities": pool.modalities, "concepts": pool.concepts[:500],
            "explain": True, "ranking": searcher.model.ranking, "max_upload_bytes": state.limits.max_upload_bytes,
            "k": SearchOptions.k}


def search_text(state: Page, q: TextQuery, args: Search) -> dict:
    started = time.perf_counter()
    require_text(q)
    within_served(args, state.limits)
    allowed = state.pool.allowed(*args.filters)
    result = _ranked(state, state.searcher.embed_text(q), args, allowed, "text")
    return _answer(result, args.page, args.k, started, query=q)


def similar(key: str, state: Page, args: Search) -> dict:
    started = time.perf_counter()
    within_served(args, state.limits)
    query = state.searcher.image_embedding(state.pool.row(key))
    result = _ranked(state, query, args, state.pool.allowed(*args.filters), "image")
    return _answer(result, args.page, args.k, started, query_key=key)


def captions(key: str, state: Page, k: int = Query(5, ge=1, le=50)) -> dict:
    started = time.perf_counter()
    result = state.searcher.captions(state.searcher.image_embedding(state.pool.row(key)), k)
    return _answer(result, 0, k, started, query_key=key)


def _image_answer(state: PageState, data: bytes, name: str, args: SearchArgs, allowed: np.ndarray | None) -> dict:
    searcher = state.searcher
    image = decode_upload(data, name, state.limits.max_upload_pixels, searcher.pool.decode)
    started = time.perf_counter()
    query = searcher.embed_image(image)
    images = _ranked(state, query, args, allowed, "image")
    caps = searcher.captions(query, min(args.k, 10))
    if not searcher.pool.n_captions:  # an image-only collection: the similar images are the whole answer
        images.notes.append(f"{NO_CAPTIONS}: these are the most similar images")
    return {**_answer(images, args.page, args.k, started), "captions": _hits(caps, 0),
            "captions_ranked_by": caps.ranking}


async def search_image(request: Request, state: Page, args: Search, name: UploadName) -> dict:
    """Images like the uploaded one and its nearest captions, with the text query's filters and paging.
    Paging re-sends the image: the server keeps nothing of an upload between requests. The filters
    are checked before a byte of the upload is read. `name`: a raw body's file name (its suffix
    tells a NIfTI volume or a DICOM file without the Part 10 preamble)."""
    within_served(args, state.limits)
    allowed = state.pool.allowed(*args.filters)
    data, name = await read_upload(request, state.limits.max_upload_bytes, name)
    return await run_in_threadpool(_image_answer, state, data, name, args, allowed)


def image(key: str, state: Page, size: str = Query("thumb", pattern="^(thumb|full)$")) -> Response:
    img = state.pool.image(key)
    if size == "thumb":
        img.thumbnail((THUMBNAIL, THUMBNAIL))
    return _png(img)


def explain_map(key: str, state: Page, q: TextQuery) -> Response:
    require_text(q)
    img = state.pool.image(key)
    try:
        e = explain(state.searcher.run, state.searcher.backbone, img, state.searcher.embed_text(q))
    except MedembedError as err:  # a tower with no map: the request's fault, not the server's
        raise HTTPException(400, str(err)) from None
    return _png(e.overlay())


def page() -> FileResponse:
    return FileResponse(STATIC / "index.html")


def add_page_routes(app: FastAPI) -> None:
    """Each handler on its route; a request is matched against them in this order."""
    app.get("/api/info")(info)
    app.get("/api/search/text")(search_text)
    app.get("/api/similar/{key}")(similar)
    app.get("/api/captions/{key}")(captions)
    app.post("/api/search/image")(search_image)
    app.get("/api/image/{key}")(image)
    app.get("/api/explain/{key}")(explain_map)
    app.get("/")(page)
