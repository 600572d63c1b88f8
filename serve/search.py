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

from medembed.adapt.tuning.runs import run_backbone
from medembed.cache.reader import CachedSplit, load_split
from medembed.evaluate.examples import load_pool_image
from medembed.evaluate.listing import BANK_SCORE, COSINE, one_line
from medembed.evaluate.models import EmbeddingModel, model_from_run
from medembed.evaluate.new_data import open_runs
from medembed.evaluate.plots import Tile, image_query_grid, text_query_grid
from medembed.evaluate.retrieval import top_k
from medembed.extract.backbones import onnx_runtime
from medembed.extract.backbones.core import Backbone
from medembed.extract.extraction import GRAPHS_DIR
from medembed.extract.imaging import DEFAULT_DECODE, DecodeOptions, open_image
from medembed.extract.worker import describe_failure
from medembed.serve.explain import explain

EXACT = "exact scan"


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


@dataclass
class SearchPool:
    """The splits searched, concatenated: pool row r of images is (split, row) via `image_of`."""

    splits: list[CachedSplit]
    image_of: list[tuple[int, int]]  # pool image row -> (split index, image row in that split)
    caption_of: list[tuple[int, int]]  # pool caption row -> (split index, caption row)

    @classmethod
    def of(cls, splits: list[CachedSplit]) -> SearchPool:
        images = [(i, r) for i, s in enumerate(splits) for r in range(s.n_images)]
        captions = [(i, c) for i, s in enumerate(splits) for c in range(s.n_captions)]
        return cls(splits, images, captions)

    @property
    def decode(self) -> DecodeOptions:
        """How the pool's images were rendered at extraction (window), for showing them and for
        decoding query images the same way."""
        return DecodeOptions.from_provenance(self.splits[0].attrs.get("image_decoding") if self.splits else None)


def read_query_image(image, options: DecodeOptions = DEFAULT_DECODE):
    """A PIL image from a path or an already opened image; a one-line reason when it is not one."""
    if not isinstance(image, (str, Path)):
        return image
    try:
        return open_image(str(image), options)
    except Exception as e:  # noqa: BLE001 - every decode failure becomes the same one-line message
        raise ValueError(f"{image}: cannot use as a query image: {describe_failure(str(image), e)}") from None


def encode_query(backbone, text: str | None = None, image=None,
                 options: DecodeOptions = DEFAULT_DECODE) -> torch.Tensor:
    """Raw backbone features [1, D] of one caption, or of one image (a path or a PIL image)."""
    if text is not None:
        if not text.strip():
            raise ValueError("--text: the query is empty")
        return backbone.encode_texts([text]).float().cpu()
    pil = read_query_image(image, options)
    return backbone.encode_images(backbone.preprocess(pil)[None]).float().cpu()


class Searcher:
    """One run's pool, ready for queries: embeddings projected once, the backbone loaded once."""

    def __init__(self, run_ref, split: str | None = None, data: str | Path | None = None,
                 features_root: str | Path = "features", backbone=None, use_index: bool = True,
                 runtime: str = "auto"):
        (self.run,) = open_runs([run_ref], data, [split] if split else None, features_root)
        self._own_run = isinstance(run_ref, (str, Path))  # opened here, not handed in
        files = self.run.split_files()
        if split is not None and split not in files:
            raise FileNotFoundError(f"{self.run.features_dir}: no {split}.h5 (found: {', '.join(files)})")
        self.pool = SearchPool.of([load_split(p, with_views=False) for name, p in files.items() if split in (None, name)])
        self.split = split
        self.model: EmbeddingModel = model_from_run(self.run)
        self._backbone = backbone
        self.runtime = runtime  # queries' encoders: torch, onnx or auto (ONNX Runtime on the CPU)
        self.notes: list[str] = []  # one line each where a query encoder could not take the runtime asked for
        self._images: torch.Tensor | None = None
        self._captions: torch.Tensor | None = None
        self._image_offsets: torch.Tensor | None = None
        self._caption_offsets: torch.Tensor | None = None
        self._firsts: dict[int, dict[int, str]] = {}
        # an index covers the run's heads over its own cache or over a `--data` pool indexed with
        # `index --data`; never a fine-tuned checkpoint
        self.index = None
        if use_index and self.run.checkpoint is None:
            from medembed.serve.index import load_index, pool_name

            self.index = load_index(self.run.run_dir, split, pool=pool_name(data) if data is not None else None)

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

    @property
    def image_embeddings(self) -> torch.Tensor:
        if self._images is None:
            self._images = torch.cat([self.model.images(s.image_features) for s in self.pool.splits])
        return self._images

    @property
    def caption_embeddings(self) -> torch.Tensor:
        if self._captions is None:
            self._captions = torch.cat([self.model.texts(s.caption_features) for s in self.pool.splits])
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
            raise ValueError(f"by: 'text' or 'image', not {by!r}")
        bank = by == "text"
        n = len(self.pool.image_of) if allowed is None else int(allowed.sum())
        k_used, notes = _cap(k, n, "images")
        if self.index is not None and not exact:
            scores, rows, via = self._index_search(query, k_used, allowed, bank)
            with_bank = bank and self.index[1].querybank is not None
            if len(rows) < k_used:
                notes.append(f"the {via} returned {len(rows)} of the {k_used} images asked for (approximate search "
                             "stops early); search again with --exact to scan the whole pool")
        else:
            offset = self.image_offsets if bank else None
            (scores, rows), via = self._scan(query, self.image_embeddings, k_used, allowed, offset), EXACT
            with_bank = offset is not None
        cosines = self._image_cosines(query, rows)
        hits = [self._image_hit(i + 1, s, c, r) for i, (s, c, r) in enumerate(zip(scores, cosines, rows))]
        return SearchResult(hits, "images", via, n, notes, *self._ranking(with_bank))

    def captions(self, query: torch.Tensor, k: int) -> SearchResult:
        """Top-k pool captions for a unit query [1, D] (exact scan: captions are not indexed)."""
        n = len(self.pool.caption_of)
        k_used, notes = _cap(k, n, "captions")
        offset = self.caption_offsets
        scores, rows = self._scan(query, self.caption_embeddings, k_used, None, offset)
        cosines = _cosines(query, self.caption_embeddings[rows]) if rows else []
        hits = []
        for i, (s, cos, r) in enumerate(zip(scores, cosines, rows)):
            si, c = self.pool.caption_of[r]
            split = self.pool.splits[si]
            row = int(split.caption_image[c])
            hits.append(Hit(i + 1, s, cos, split.image_ids[row], split.captions[c], split.split, row,
                            split.image_path(row)))
        return SearchResult(hits, "captions", EXACT, n, notes, *self._ranking(offset is not None))

    def _ranking(self, with_bank: bool) -> tuple[str, str | None]:
        """(what the scores are, the bank setting ranked with) for a result."""
        return (BANK_SCORE, self.model.ranking) if with_bank else (COSINE, None)

    def _image_cosines(self, query: torch.Tensor, pool_rows: list[int]) -> list[float]:
        """Plain cosines of the query with these pool images: from the projected pool when an exact
        scan already made it, else only these rows are projected (an index search never needs the rest)."""
        if not pool_rows:
            return []
        if self._images is not None:
            return _cosines(query, self._images[pool_rows])
        located = [self.pool.image_of[r] for r in pool_rows]
        raw = torch.stack([self.pool.splits[si].image_features[row] for si, row in located])
        return _cosines(query, self.model.images(raw))

    def _scan(self, query, pool, k, allowed, offset=None):
        if allowed is not None:
            rows = np.flatnonzero(allowed)
            keep = torch.from_numpy(rows)
            scores, local = top_k(query, pool[keep], k, offset=None if offset is None else offset[keep])
            return scores[0].tolist(), rows[local[0].numpy()].tolist()
        scores, rows = top_k(query, pool, k, offset=offset)
        return scores[0].tolist(), rows[0].tolist()

    def _index_search(self, query, k, allowed, bank: bool = True):
        from medembed.serve.index import search_index

        index, meta = self.index
        order = {s.split: i for i, s in enumerate(self.pool.splits)}
        plain = query
        if meta.querybank:  # each image's query-bank offset is the last coordinate: weight 1 applies it, 0 not
            query = torch.cat([query, torch.full((query.shape[0], 1), float(bank))], 1)
        rerank = int(meta.params.get("rerank", 0))  # compressed codes: fetch more, re-score them exactly
        scores, rows = search_index(index, query, max(k, rerank), allowed=allowed)
        keep = rows[0] >= 0  # approximate kinds pad missing hits with -1
        pool_rows = []
        for row in rows[0][keep].tolist():
            name, image_row = meta.locate(row)
            pool_rows.append(self._pool_row(order[name], image_row))
        if not rerank:
            return scores[0][keep].tolist(), pool_rows, f"{meta.kind} index"
        exact = self._exact_scores(plain, pool_rows, bank and meta.querybank is not None)
        best = sorted(range(len(pool_rows)), key=lambda i: -exact[i])[:k]
        via = f"{meta.kind} index, {len(pool_rows)} candidates re-scored exactly"
        return [exact[i] for i in best], [pool_rows[i] for i in best], via

    def _exact_scores(self, query: torch.Tensor, pool_rows: list[int], bank: bool) -> list[float]:
        """What an exact scan scores these pool images: cosine, plus the query-bank offset when ranking with it."""
        if not pool_rows:
            return []
        located = [self.pool.image_of[r] for r in pool_rows]
        emb = self.model.images(torch.stack([self.pool.splits[si].image_features[row] for si, row in located]))
        scores = emb.float() @ query[0].float()
        if bank and self.model.gallery_offsets is not None:
            scores = scores + self.model.gallery_offsets(emb, None)[0]
        return scores.tolist()

    def _pool_row(self, split_index: int, image_row: int) -> int:
        return sum(s.n_images for s in self.pool.splits[:split_index]) + image_row

    def _image_hit(self, rank: int, score: float, cosine: float, pool_row: int) -> Hit:
        si, row = self.pool.image_of[pool_row]
        split = self.pool.splits[si]
        if si not in self._firsts:  # built once per split: a pass over every caption of the pool
            self._firsts[si] = split.first_captions()
        caption = self._firsts[si].get(row, "")
        return Hit(rank, float(score), float(cosine), split.image_ids[row], caption, split.split, row,
                   split.image_path(row))


def _cosines(query: torch.Tensor, items: torch.Tensor) -> list[float]:
    """cos(query, item) per item row: both are unit embeddings of the run, so a dot product."""
    return (items.float() @ query[0].float()).tolist()


def _cap(k: int, pool: int, what: str) -> tuple[int, list[str]]:
    if k < 1:
        raise ValueError(f"-k must be >= 1, got {k}")
    if pool == 0:
        raise ValueError(f"the pool holds no {what} to search")
    if k > pool:
        return pool, [f"-k {k} is more than the {pool} {what} in the pool: all {pool} are returned"]
    return k, []


def search(
    run_dir: str | Path,
    text: str | None = None,
    image: str | Path | None = None,
    k: int = 9,
    out: str | Path | None = None,
    split: str | None = None,
    backbone=None,
    use_index: bool = True,
    data: str | Path | None = None,
    features_root: str | Path = "features",
    explain_maps: bool = False,
    runtime: str = "auto",
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
    """
    if (text is None) == (image is None):
        raise ValueError("give exactly one of --text or --image")
    if text is not None and not text.strip():
        raise ValueError("--text: the query is empty")
    if image is not None:
        read_query_image(image)  # a bad file is refused before anything is loaded
    searcher = Searcher(run_dir, split, data, features_root, backbone, use_index=use_index, runtime=runtime)
    if explain_maps and (text is None or out is None):
        raise ValueError("--explain draws heat maps over the images a --text query retrieves: it needs --text and --out")
    if text is not None:
        query = searcher.embed_text(text)
        result = searcher.images(query, k)
    else:
        query = searcher.embed_image(image)
        if searcher.pool.caption_of:
            result = searcher.captions(query, k)
        else:  # an image-only collection: the nearest images instead of captions
            result = searcher.images(query, k, by="image")
            result.notes.append("the pool has no captions (an image-only collection): these are the most similar images")
    result.notes.extend(searcher.notes)
    if out is not None:
        draw(result, searcher, out, text=text, image=image, query=query if explain_maps else None)
    return result


def draw(result: SearchResult, searcher: Searcher, out: str | Path, text: str | None = None,
         image: str | Path | None = None, query: torch.Tensor | None = None) -> Path:
    """The result as a PNG grid; with `query`, each image under its explanation map."""
    by_name = {s.split: s for s in searcher.pool.splits}
    if text is not None:
        tiles = []
        for h in result.hits:
            pic = load_pool_image(by_name[h.split], h.image_row)
            if query is not None and pic is not None:
                pic = explain(searcher.run, searcher.backbone, open_image(h.location, searcher.pool.decode), query).overlay()
            cos = f" (cos {h.cosine:.3f})" if result.with_bank else ""
            tiles.append(Tile(pic, f"{h.image_id}  {h.score:.3f}{cos}"))
        note = "heat map: the regions that drive each image's score (red: most)" if query is not None else ""
        return text_query_grid(text, tiles, Path(out), note=note)
    try:
        query_img = read_query_image(image, searcher.pool.decode)
        query_img.thumbnail((384, 384))
    except ValueError:
        query_img = None
    caps = [(f"[{h.image_id}] {h.caption}", h.score, False) for h in result.hits]
    return image_query_grid(query_img, f"query: {Path(image).name}", caps, Path(out))


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
