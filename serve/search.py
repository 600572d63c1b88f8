"""`cli.py search` and the search page: new captions or images against a run's pool.

The query is encoded on the fly with the run's own backbone (the one its cache was extracted
with; for a fine-tuned checkpoint, the checkpoint's towers), so it lands in the same raw feature
space the heads were trained on; the pool is never re-encoded, only projected from the cache,
once per `Searcher`. With `data`, the pool is a dataset of new raw images and captions, encoded
once by that same backbone. A text query ranks images; an image query ranks captions or, for
"more like this", images.

A `Searcher` is built once (run, pool, backbone, FAISS index) and answers many queries: the command
line asks one, the web page many. Every answer says how it was found (exact scan or which index),
and anything it could not give: k above the pool is capped, an approximate index that returns
fewer than k hits says so and how to get all of them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from medembed.cache.schema import split_file
from medembed.common.errors import BadInput, BadOption, Incompatible, NotFound
from medembed.common.planning import DEFAULT_MAX_MEMORY_GB
from medembed.common.querybank import BANK_SCORE, COSINE
from medembed.common.ranking import top_k
from medembed.common.text import one_line
from medembed.extract.backbones import onnx_runtime
from medembed.extract.backbones.core import Backbone
from medembed.extract.extraction import DEFAULT_FEATURES_ROOT, GRAPHS_DIR
from medembed.extract.imaging import DEFAULT_DECODE, DecodeOptions, open_image
from medembed.extract.worker import describe_failure
from medembed.model.embedding import EmbeddingModel, model_from_run
from medembed.model.grids import Tile, image_query_grid, similar_images_grid, text_query_grid
from medembed.model.runs import open_runs, run_backbone
from medembed.model.thumbnails import THUMBNAIL, load_image_thumbnail
from medembed.serve.explain import explain
from medembed.serve.pool import SearchPool
from medembed.serve.search_memory import (
    MAX_CHUNK_ROWS,
    SearchMemoryPlan,
    plan_search_memory,
)

EXACT = "exact scan"
NO_CAPTIONS = "the pool has no captions (an image-only collection)"
QUERY_LABEL = "query image"  # what a grid calls an image query: its file name may name a patient


@dataclass(frozen=True)
class SearchOptions:
    """What `cli.py search` and `serve` take unless told, and the defaults of `Searcher`, `search`, the
    notebook API's search and the page: one place, so the command line, Python and the page agree."""

    k: int = 9  # hits per query: the 3x3 grid `search --out` draws, and one page of the search page
    features_root: str = DEFAULT_FEATURES_ROOT  # where a `data` pool's encoding is cached
    runtime: str = onnx_runtime.DEFAULT_RUNTIME  # the queries' encoders: torch, onnx or auto
    max_memory_gb: float = DEFAULT_MAX_MEMORY_GB  # the whole process: the pool held when it fits, else streamed
    use_index: bool = True  # answer text queries through the run's FAISS index when one was built


@dataclass
class Hit:
    """One result. `score` is what the ranking sorted by: cosine − β·hubness where the run ranks with
    its query bank, else the cosine itself; `cosine` is always the plain cosine of the query and item
    embeddings, so a reader never takes one for the other (see `SearchResult.ranking`)."""

    rank: int
    score: float
    cosine: float
    image_id: str
    caption: str
    split: str
    image_row: int
    location: str

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class SearchResult:
    hits: list[Hit]
    target: str  # "images" or "captions"
    via: str  # "exact scan" or "<kind> index"
    pool: int  # candidates searched
    notes: list[str] = field(default_factory=list)
    ranking: str = COSINE  # what `Hit.score` is: COSINE, or BANK_SCORE (cos − β·hub) with the run's query bank
    bank: str | None = None  # the query-bank setting ranked with (its description), None for plain cosine

    @property
    def with_bank(self) -> bool:
        return self.ranking == BANK_SCORE


def read_query_image(image, options: DecodeOptions = DEFAULT_DECODE):
    """A PIL image from a path or an already opened image; a one-line reason when it is not one."""
    if not isinstance(image, (str, Path)):
        return image
    try:
        return open_image(str(image), options)
    except Exception as e:  # noqa: BLE001 - every decode failure becomes the same one-line message
        raise BadInput(f"{image}: cannot use as a query image: {describe_failure(str(image), e)}") from None


def encode_query(backbone, text: str | None = None, image=None,
                 options: DecodeOptions = DEFAULT_DECODE) -> torch.Tensor:
    """Raw backbone features [1, D] of one caption, or of one image (a path or a PIL image)."""
    if text is not None:
        if not text.strip():
            raise BadOption("--text: the query is empty")
        return backbone.encode_texts([text]).float().cpu()
    pil = read_query_image(image, options)
    return backbone.encode_images(backbone.preprocess(pil)[None]).float().cpu()


class Searcher:
    """One run's pool, ready for queries: the backbone loaded once, the pool's embeddings projected once
    and held when they fit `max_memory_gb`, else streamed from its cache files for every exact scan
    (`serve.search_memory`)."""

    def __init__(self, run_ref, split: str | None = None, data: str | Path | None = None,
                 features_root: str | Path = SearchOptions.features_root, backbone=None,
                 use_index: bool = SearchOptions.use_index, runtime: str = SearchOptions.runtime,
                 max_memory_gb: float = SearchOptions.max_memory_gb, follow_links: bool = False,
                 readable_paths: bool = False):
        (self.run,) = open_runs([run_ref], data, [split] if split else None, features_root,
                                follow_links=follow_links, readable_paths=readable_paths)
        self._own_run = isinstance(run_ref, (str, Path))  # opened here, not handed in
        files = self.run.split_files()
        if split is not None and split not in files:
            raise NotFound(f"{self.run.features_dir}: no {split_file(split)} (found: {', '.join(files)})")
        self.pool = SearchPool.open([p for name, p in files.items() if split in (None, name)])
        self.split = split
        self.model: EmbeddingModel = model_from_run(self.run)
        self._backbone = backbone
        self.runtime = runtime  # queries' encoders: torch, onnx or auto (ONNX Runtime on the CPU)
        self.notes: list[str] = []  # one line each where a query encoder could not take the runtime asked for
        self._images: torch.Tensor | None = None
        self._captions: torch.Tensor | None = None
        self._image_offsets: torch.Tensor | None = None
        self._caption_offsets: torch.Tensor | None = None
        # an index covers the run's heads over its own cache or over a `--data` pool indexed with
        # `index --data`; never a fine-tuned checkpoint
        self.index = None
        if use_index and self.run.checkpoint is None:
            from medembed.serve.index import load_index, pool_name

            # checked against the bank this pool is ranked with: another dataset's pool has its own, or none
            bank = getattr(self.model.gallery_offsets, "setting", None)
            self.index = load_index(self.run.run_dir, split, pool=pool_name(data) if data is not None else None,
                                    bank=bank)
        self.memory = self._plan(max_memory_gb)

    def _plan(self, max_memory_gb: float) -> SearchMemoryPlan:
        first = self.pool.splits[0]
        dim = int(self.model.images(torch.zeros(1, first.image_dim)).shape[1])
        index_bytes = index_rows = 0
        if self.index is not None:
            meta = self.index[1]
            index_bytes = 0 if meta.kind == "ivf" else int(meta.index_bytes)  # ivf is memory-mapped
            index_rows = int(meta.ntotal)
        return plan_search_memory(max_memory_gb, self.pool.n_images, self.pool.n_captions,
                                  max(first.image_dim, first.text_dim), first.itemsize, dim,
                                  self.pool.metadata_bytes,
                                  first.image_dim + first.text_dim if self.model.gallery_offsets is not None else 0,
                                  index_bytes, index_rows)

    # -- embeddings ---------------------------------------------------------------------------
    @property
    def backbone(self):
        """The run's backbone with its towers on the query runtime (graphs cached in the pool's features
        folder, graphs/, made on first use). A backbone passed in, or the fine-tuned towers of a run
        handed in already loaded, is the caller's object and stays on its runtime."""
        if self._backbone is None:  # one passed in is the caller's and is left on its runtime
            backbone = run_backbone(self.run)
            # a loaded run's fine-tuned towers are its owner's; a stand-in object has no towers to export
            if isinstance(backbone, Backbone) and (self.run.backbone is None or self._own_run):
                onnx_runtime.attach(backbone, self.runtime, backbone.device.type, self.run.features_dir / GRAPHS_DIR,
                                    self.notes, texts=True)
            self._backbone = backbone
        return self._backbone

    def warm(self) -> None:
        """Load the query encoders and, when the pool is held, project it: before the first query."""
        _ = self.backbone
        if self.memory.hold:
            _ = self.image_embeddings, self.image_offsets

    def _held(self, side: str) -> torch.Tensor:
        if not self.memory.hold:
            raise RuntimeError(f"the pool's {side} are streamed ({self.memory.describe()}): not held in memory")
        embed = self.model.images if side == "images" else self.model.texts
        width = self.pool.splits[0].image_dim if side == "images" else self.pool.splits[0].text_dim
        n = self.pool.n_images if side == "images" else self.pool.n_captions
        out = embed(torch.zeros(0, width)).new_empty(n, self.memory.dim)  # filled in place: never held twice
        for start, raw in self.pool.chunks(side, MAX_CHUNK_ROWS):
            out[start : start + raw.shape[0]] = embed(raw)
        return out

    @property
    def image_embeddings(self) -> torch.Tensor:
        """Every pool image's embedding, projected once (a held pool only)."""
        if self._images is None:
            self._images = self._held("images")
        return self._images

    @property
    def caption_embeddings(self) -> torch.Tensor:
        if self._captions is None:
            self._captions = self._held("captions")
        return self._captions

    @property
    def image_offsets(self) -> torch.Tensor | None:
        """What the run's query bank adds to each pool image's cosine (None: plain cosine), as eval ranks."""
        if self._image_offsets is None and self.model.gallery_offsets is not None:
            self._image_offsets = self.model.gallery_offsets(self.image_embeddings, None)[0]
        return self._image_offsets

    @property
    def caption_offsets(self) -> torch.Tensor | None:
        if self._caption_offsets is None and self.model.gallery_offsets is not None:
            self._caption_offsets = self.model.gallery_offsets(None, self.caption_embeddings)[1]
        return self._caption_offsets

    def image_embedding(self, pool_row: int) -> torch.Tensor:
        """One pool image's embedding [1, D] (a "more like this" query)."""
        if self._images is not None:
            return self._images[pool_row][None]
        return self.model.images(self.pool.image_features([pool_row]))

    def embed_text(self, text: str) -> torch.Tensor:
        return self.model.texts(encode_query(self.backbone, text=text))

    def embed_image(self, image) -> torch.Tensor:
        return self.model.images(encode_query(self.backbone, image=image, options=self.pool.decode))

    # -- queries ------------------------------------------------------------------------------
    def images(self, query: torch.Tensor, k: int, exact: bool = False, allowed: np.ndarray | None = None,
               by: str = "text") -> SearchResult:
        """Top-k pool images for a unit query [1, D]; `allowed` (bool per pool image) filters. A text
        query (`by="text"`) ranks with the run's query bank, as eval does; an image query
        (`by="image"`: similar images) by plain cosine, since the bank measures nearness to captions."""
        if by not in ("text", "image"):
            raise BadOption(f"by: 'text' or 'image', not {by!r}")
        bank = by == "text"
        n = self.pool.n_images if allowed is None else int(allowed.sum())
        k_used, notes = _cap(k, n, "images")
        cosines = None
        if self.index is not None and not exact:
            scores, rows, via, cosines = self._index_search(query, k_used, allowed, bank)
            with_bank = bank and self.index[1].querybank is not None
            if len(rows) < k_used:
                notes.append(f"the {via} returned {len(rows)} of the {k_used} images asked for (approximate search "
                             "stops early); search again with --exact to scan the whole pool")
        else:
            with_bank = bank and self.model.gallery_offsets is not None
            (scores, rows), via = self._scan(query, "images", k_used, allowed, with_bank), EXACT
        if cosines is None:
            cosines = self._image_cosines(query, rows)
        hits = [Hit(i + 1, float(s), float(c), info.image_id, info.caption, info.split, info.row, info.location)
                for i, (s, c, info) in enumerate(zip(scores, cosines, self.pool.images(rows)))]
        return SearchResult(hits, "images", via, n, notes, *self._ranking(with_bank))

    def captions(self, query: torch.Tensor, k: int) -> SearchResult:
        """Top-k pool captions for a unit query [1, D] (exact scan: captions are not indexed). A pool
        without captions (an image-only collection) answers with none and a note saying why: the
        page asks every pool for an upload's captions, and an empty answer is the true one."""
        n = self.pool.n_captions
        if n == 0:
            return SearchResult([], "captions", EXACT, 0, [NO_CAPTIONS])
        k_used, notes = _cap(k, n, "captions")
        with_bank = self.model.gallery_offsets is not None
        scores, rows = self._scan(query, "captions", k_used, None, with_bank)
        if not rows:
            cosines = []
        elif self._captions is not None:
            cosines = _cosines(query, self._captions[rows])
        else:
            cosines = _cosines(query, self.model.texts(self.pool.caption_features(rows)))
        hits = [Hit(i + 1, s, cos, info.image_id, info.caption, info.split, info.image_row, info.location)
                for i, (s, cos, info) in enumerate(zip(scores, cosines, self.pool.captions(rows)))]
        return SearchResult(hits, "captions", EXACT, n, notes, *self._ranking(with_bank))

    def _ranking(self, with_bank: bool) -> tuple[str, str | None]:
        """(what the scores are, the bank setting ranked with) for a result."""
        return (BANK_SCORE, self.model.ranking) if with_bank else (COSINE, None)

    def _image_cosines(self, query: torch.Tensor, pool_rows: list[int]) -> list[float]:
        """Plain cosines of the query with these pool images: from the projected pool when it is held,
        else only these rows are read and projected (an index search never needs the rest)."""
        if not pool_rows:
            return []
        if self._images is not None:
            return _cosines(query, self._images[pool_rows])
        return _cosines(query, self.model.images(self.pool.image_features(pool_rows)))

    def _scan(self, query: torch.Tensor, side: str, k: int, allowed: np.ndarray | None,
              bank: bool) -> tuple[list[float], list[int]]:
        """Exact top k of one side of the pool: over the held embeddings, or streamed chunk by chunk
        from the cache files (the same scores, a running top k)."""
        if self.memory.hold:
            pool = self.image_embeddings if side == "images" else self.caption_embeddings
            offset = (self.image_offsets if side == "images" else self.caption_offsets) if bank else None
            return _top(query, pool, k, allowed, offset, 0)
        embed = self.model.images if side == "images" else self.model.texts
        best_s: list[float] = []
        best_r: list[int] = []
        for start, raw in self.pool.chunks(side, self.memory.chunk_rows):
            keep = None if allowed is None else allowed[start : start + raw.shape[0]]
            if keep is not None:
                if not keep.any():
                    continue
                raw = raw[torch.from_numpy(keep)]
            emb = embed(raw)
            offset = None
            if bank:
                offset = self.model.gallery_offsets(*((emb, None) if side == "images" else (None, emb)))
                offset = offset[0] if side == "images" else offset[1]
            rows_of = None if keep is None else start + np.flatnonzero(keep)
            s, r = _top(query, emb, k, None, offset, start, rows_of)
            merged = sorted(zip(best_s + s, best_r + r), key=lambda t: (-t[0], t[1]))[:k]
            best_s, best_r = [m[0] for m in merged], [m[1] for m in merged]
        return best_s, best_r

    def _index_search(self, query, k, allowed, bank: bool = True):
        from medembed.serve.index import index_paths, read_vectors, search_index

        index, meta = self.index
        plain = query
        if meta.querybank:  # each image's query-bank offset is the last coordinate: weight 1 applies it, 0 not
            query = torch.cat([query, torch.full((query.shape[0], 1), float(bank))], 1)
        rerank = int(meta.params.get("rerank", 0))  # compressed codes: fetch more, re-score them exactly
        scores, rows = search_index(index, query, max(k, rerank), allowed=allowed)
        keep = rows[0] >= 0  # approximate kinds pad missing hits with -1
        index_rows = rows[0][keep].tolist()
        pool_rows = []
        for row in index_rows:
            name, image_row = meta.locate(row)
            pool_rows.append(self.pool.pool_row(name, image_row))
        if not rerank:
            return scores[0][keep].tolist(), pool_rows, f"{meta.kind} index", None
        cosines = None
        if meta.vectors and not self.memory.hold:  # the index's own full vectors: a few KB per candidate
            kept = index_paths(self.run.run_dir, meta.split, meta.kind, meta.pool or None)[0].with_name(meta.vectors)
            vecs = read_vectors(kept, index_rows, meta.dim)
            exact = (vecs @ query[0].numpy()).tolist()
            # each row is the unit embedding (then its bank offset): the plain cosine without a second read
            cosines = (vecs[:, : plain.shape[1]] @ plain[0].numpy()).tolist()
        else:
            exact = self._exact_scores(plain, pool_rows, bank and meta.querybank is not None)
        best = sorted(range(len(pool_rows)), key=lambda i: -exact[i])[:k]
        via = f"{meta.kind} index, {len(pool_rows)} candidates re-scored exactly"
        return ([exact[i] for i in best], [pool_rows[i] for i in best], via,
                None if cosines is None else [cosines[i] for i in best])

    def _exact_scores(self, query: torch.Tensor, pool_rows: list[int], bank: bool) -> list[float]:
        """What an exact scan scores these pool images: cosine, plus the query-bank offset when ranking with it."""
        if not pool_rows:
            return []
        if self.memory.hold:  # projected once, with their offsets
            scores = self.image_embeddings[pool_rows].float() @ query[0].float()
            if bank and self.image_offsets is not None:
                scores = scores + self.image_offsets[pool_rows]
            return scores.tolist()
        emb = self.model.images(self.pool.image_features(pool_rows))  # only these rows are read
        scores = emb.float() @ query[0].float()
        if bank and self.model.gallery_offsets is not None:
            scores = scores + self.model.gallery_offsets(emb, None)[0]
        return scores.tolist()


def _top(query: torch.Tensor, pool: torch.Tensor, k: int, allowed: np.ndarray | None,
         offset: torch.Tensor | None, start: int, rows_of: np.ndarray | None = None) -> tuple[list[float], list[int]]:
    """Top k of `pool` (rows numbered from `start`, or `rows_of` each) for one query, `allowed` rows only."""
    if allowed is not None:
        rows_of = np.flatnonzero(allowed) + start
        keep = torch.from_numpy(rows_of - start)
        pool, offset = pool[keep], None if offset is None else offset[keep]
    scores, local = top_k(query, pool, min(k, pool.shape[0]), offset=offset)
    local = local[0].numpy()
    rows = (rows_of[local] if rows_of is not None else local + start).tolist()
    return scores[0].tolist(), rows


def _cosines(query: torch.Tensor, items: torch.Tensor) -> list[float]:
    """cos(query, item) per item row: both are unit embeddings of the run, so a dot product."""
    return (items.float() @ query[0].float()).tolist()


def _cap(k: int, pool: int, what: str) -> tuple[int, list[str]]:
    if k < 1:
        raise BadOption(f"-k must be >= 1, got {k}")
    if pool == 0:
        raise Incompatible(f"the pool holds no {what} to search")
    if k > pool:
        return pool, [f"-k {k} is more than the {pool} {what} in the pool: all {pool} are returned"]
    return k, []


def search(
    run_dir: str | Path,
    text: str | None = None,
    image: str | Path | None = None,
    k: int = SearchOptions.k,
    out: str | Path | None = None,
    split: str | None = None,
    backbone=None,
    use_index: bool = SearchOptions.use_index,
    data: str | Path | None = None,
    features_root: str | Path = SearchOptions.features_root,
    explain_maps: bool = False,
    runtime: str = SearchOptions.runtime,
    max_memory_gb: float = SearchOptions.max_memory_gb,
    follow_links: bool = False,
    readable_paths: bool = False,
) -> SearchResult:
    """Top-k for a caption (-> images) or an image file (-> captions; -> similar images in a pool
    without captions) over the run's cached pool.

    The pool is every split of the run's features folder, or only `split`. A caption query goes
    through the run's FAISS index over that pool when `cli.py index` built one (a stale index is
    an error saying how to rebuild it), else (or with use_index=False) through an exact scan.
    `out` draws the result as a grid PNG (with `explain_maps`, each image under the heat map of what
    drives its score against the query). `backbone` may be passed in to reuse a loaded one.
    `run_dir` may also be an unfreezing run folder or its `finetuned.safetensors`; `data` searches
    that dataset's raw images and captions (encoded by the run's backbone, cached under
    `features_root`) instead of the run's own cache. `runtime` runs the query's encoder (torch, onnx,
    or auto: ONNX Runtime on the CPU); where it could not be used, the result's notes say so.
    `max_memory_gb` bounds the whole process: a pool whose embeddings do not fit is streamed from
    its cache files (see `serve.search_memory`). `follow_links` and `readable_paths` say how `data`
    is read (see `extract.access`, `extract.datasets.identity`).
    """
    if (text is None) == (image is None):
        raise BadOption("give exactly one of --text or --image")
    if text is not None and not text.strip():
        raise BadOption("--text: the query is empty")
    if image is not None:
        read_query_image(image)  # a bad file is refused before anything is loaded
    searcher = Searcher(run_dir, split, data, features_root, backbone, use_index=use_index, runtime=runtime,
                        max_memory_gb=max_memory_gb, follow_links=follow_links, readable_paths=readable_paths)
    if explain_maps and (text is None or out is None):
        raise BadOption("--explain draws heat maps over the images a --text query retrieves: it needs --text and --out")
    if text is not None:
        query = searcher.embed_text(text)
        result = searcher.images(query, k)
    else:
        query = searcher.embed_image(image)
        if searcher.pool.n_captions:
            result = searcher.captions(query, k)
        else:  # an image-only collection: the nearest images instead of captions
            result = searcher.images(query, k, by="image")
            result.notes.append(f"{NO_CAPTIONS}: these are the most similar images")
    result.notes.extend(searcher.notes)
    if out is not None:
        draw(result, searcher, out, text=text, image=image, query=query if explain_maps else None)
    return result


def draw(result: SearchResult, searcher: Searcher, out: str | Path, text: str | None = None,
         image: str | Path | None = None, query: torch.Tensor | None = None) -> Path:
    """The result as a PNG grid; with `query`, each image under its explanation map. An image query is
    drawn beside its captions, or beside the similar images where those are the answer (a pool
    without captions); it is labelled "query image", never by its file name, which may name a patient."""
    if text is not None:
        note = "heat map: the regions that drive each image's score (red: most)" if query is not None else ""
        return text_query_grid(text, _image_tiles(result, searcher, query), Path(out), note=note)
    try:
        query_img = read_query_image(image, searcher.pool.decode)
        query_img.thumbnail((THUMBNAIL, THUMBNAIL))
    except ValueError:
        query_img = None
    if result.target == "images":
        return similar_images_grid(query_img, QUERY_LABEL, _image_tiles(result, searcher), Path(out))
    caps = [(f"[{h.image_id}] {h.caption}", h.score, False) for h in result.hits]
    return image_query_grid(query_img, QUERY_LABEL, caps, Path(out))


def _image_tiles(result: SearchResult, searcher: Searcher, query: torch.Tensor | None = None) -> list[Tile]:
    """One tile per image hit: its thumbnail (with `query`, under its explanation map), id and score."""
    tiles = []
    for h in result.hits:
        access = searcher.pool.access(h.split)  # pool images are read under their data folder's rule
        pic = load_image_thumbnail(h.location, searcher.pool.decode, access)
        if query is not None and pic is not None:
            pic = explain(searcher.run, searcher.backbone, open_image(h.location, searcher.pool.decode, access=access),
                          query).overlay()
        cos = f" (cos {h.cosine:.3f})" if result.with_bank else ""
        tiles.append(Tile(pic, f"{h.image_id}  {h.score:.3f}{cos}"))
    return tiles


def format_results(result: SearchResult) -> str:
    """A table, one row per hit, whose header says how the pool was searched and what each score is:
    with the run's query bank the ranked score is labelled "score (cos − β·hub)" and the plain
    cosine gets its own column, so the two are never confused; then any note about what could not
    be given. Every cell is one line (newlines and tabs in captions are collapsed)."""
    head = ["rank", f"score ({result.ranking})", "image", *(["cosine"] if result.with_bank else []), "caption"]
    rows = [[str(h.rank), f"{h.score:.4f}", one_line(h.image_id), *([f"{h.cosine:.4f}"] if result.with_bank else []),
             one_line(h.caption, 100)] for h in result.hits]
    how = f"ranked by {result.ranking}: {result.bank}" if result.with_bank else "ranked by plain cosine"
    widths = [max(len(c[i]) for c in (head, *rows)) for i in range(len(head) - 1)]
    lines = []
    for cells in (head, *rows):
        padded = [cells[0].rjust(widths[0]), *(c.ljust(w) for c, w in zip(cells[1:-1], widths[1:]))]
        lines.append("  ".join([*padded, cells[-1]]))
    lines[0] += f"   ({result.via} over {result.pool} {result.target}; {how})"
    lines += [f"note: {one_line(n)}" for n in result.notes]
    return "\n".join(lines)
