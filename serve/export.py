"""`cli.py export`: a run's embeddings in the folder layout of clip-retrieval, autofaiss and
embedding-reader, so the tools built around that layout (index building, a search back end,
streaming readers) take a medembed run without conversion.

    OUT/img_emb/img_emb_{i}.npy          [n_i, D] image embeddings          (--format npy)
    OUT/text_emb/text_emb_{i}.npy        [n_i, D] caption embeddings
    OUT/img_emb/img_emb_{i}.parquet      metadata columns + `embedding`     (--format parquet)
    OUT/text_emb/text_emb_{i}.parquet
    OUT/metadata/metadata_{i}.parquet    image_path, caption, id, split, image_row, caption_row, concepts
                                         (+ image_offset, caption_offset: the run's query bank, if any)
    OUT/export.json                      provenance: run, heads, cache files, dims, row counts

Row r of partition i is the same sample in every file, as those tools assume. A row is one image
(its first caption beside it; `rows="captions"` gives one row per caption instead, repeating the
image's embedding), partitions are numbered like clip-retrieval's (zero-padded to the partition
count) and never span two splits. The export is built in a sibling folder and swapped in at the
end, so OUT is either the previous export or the new one, never half of each. Each partition is read
from the cache, embedded and written `EXPORT_CHUNK` rows at a time (npy files filled in place,
parquet files a row group per chunk), so an export holds one chunk whatever the split's size.
"""
from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from medembed.adapt.run_querybank import bank_offsets
from medembed.cache import schema
from medembed.cache.reader import (
    CachedSplit,
    check_caption_order,
    load_split_rows,
    open_cache,
    read_attrs,
    read_dataset,
)
from medembed.common.errors import BadOption, NotFound, ToolError
from medembed.common.files import check_out_folder, folder_state, replace_folder, staging_folder
from medembed.common.locks import exclusive
from medembed.extract.datasets import load_dataset
from medembed.extract.extraction import DEFAULT_FEATURES_ROOT
from medembed.model.runs import open_run
from medembed.serve.index import ALL_SPLITS, heads_sha256, pool_name, pool_run

__all__ = ["EXPORT_FORMATS", "ExportOptions", "ExportSummary", "export_embeddings", "format_export_summary"]

EXPORT_FORMATS = ("npy", "parquet")
ROW_KINDS = ("images", "captions")
EXPORT_DTYPES = ("float16", "float32")  # of the npy embeddings
MANIFEST = "export.json"
EMBEDDING_COLUMN = "embedding"
EXPORT_CHUNK = 65536  # output rows read, embedded and written at a time
DEFAULT_SPLIT = "test"


@dataclass
class ExportOptions:
    format: str = "npy"
    split: str | None = None  # a split of the pool, or "all"; None: its only split, else test (`default_split`)
    out: str | None = None  # default: RUN/export/{split}-{format}
    dtype: str = "float16"  # npy files; parquet `embedding` lists are float32 (embedding-reader reads 4-byte floats)
    rows: str = "images"  # one row per image, or one per caption
    rows_per_file: int = 1_000_000
    overwrite: bool = False  # replace an earlier export in `out`
    data: str | None = None  # export this dataset, encoded by the run's backbone, instead of the run's cache
    features_root: str = DEFAULT_FEATURES_ROOT  # where `data`'s encoding is cached
    follow_links: bool = False  # `data`: read links leading out of its folder
    readable_paths: bool = False  # `data`: keep image paths as ids where they would be hashed

    def __post_init__(self) -> None:
        if self.format not in EXPORT_FORMATS:
            raise BadOption(f"format must be one of {', '.join(EXPORT_FORMATS)}, got {self.format!r}")
        if self.dtype not in EXPORT_DTYPES:
            raise BadOption(f"dtype must be {' or '.join(EXPORT_DTYPES)}, got {self.dtype!r}")
        if self.rows not in ROW_KINDS:
            raise BadOption(f"rows must be one of {', '.join(ROW_KINDS)}, got {self.rows!r}")
        if self.rows_per_file < 1:
            raise BadOption(f"rows_per_file must be >= 1, got {self.rows_per_file}")


@dataclass
class ExportSummary:
    out: str
    format: str
    rows: int
    dim: int
    partitions: int
    files: list[str]


def _check_parquet_engine() -> None:
    try:
        import pyarrow  # noqa: F401
    except ImportError as e:
        raise ToolError("writing parquet needs pyarrow, which is not installed: pip install pyarrow") from e


def _concept_labels(split: CachedSplit) -> list[str]:
    if split.concepts is None or not split.concept_ids:
        return [""] * split.n_images
    ind, ptr = split.concepts.indices, split.concepts.indptr
    return [";".join(split.concept_ids[c] for c in ind[ptr[r] : ptr[r + 1]]) for r in range(split.n_images)]


def _sample_rows(n_images: int, cap_img: np.ndarray, rows: str) -> tuple[np.ndarray, np.ndarray]:
    """(image row, caption row or -1) of every output row of one split, in cache order."""
    if rows == "captions":
        return cap_img.astype(np.int64), np.arange(cap_img.size, dtype=np.int64)
    first = np.full(n_images, -1, dtype=np.int64)
    images, first_row = np.unique(cap_img, return_index=True)
    first[images] = first_row
    return np.arange(n_images, dtype=np.int64), first


def _metadata(split: CachedSplit, img_rows: np.ndarray, cap_rows: np.ndarray, concepts: list[str]) -> pd.DataFrame:
    """Metadata of rows of `split` (a slice of its file: rows local to it, written as the file's rows)."""
    return pd.DataFrame({
        "image_path": [split.image_path(int(r)) for r in img_rows],
        "caption": [split.captions[int(c)] if c >= 0 else "" for c in cap_rows],
        "id": [split.image_ids[int(r)] for r in img_rows],
        "split": split.split,
        "image_row": img_rows + split.first_image,
        "caption_row": np.where(cap_rows >= 0, cap_rows + split.first_caption, -1),
        "concepts": [concepts[int(r)] for r in img_rows],
    })


def _embed_rows(embed, feats: torch.Tensor, rows: np.ndarray, dim: int) -> np.ndarray:
    """Embeddings of feats[rows]; rows of -1 (an image without a caption) stay zero vectors."""
    out = np.zeros((rows.size, dim), dtype=np.float32)
    have = rows >= 0
    if have.any():
        out[have] = embed(feats[torch.from_numpy(rows[have])]).float().numpy()
    return out


def _embedding_table(meta: pd.DataFrame, emb: np.ndarray):
    import pyarrow as pa

    table = pa.Table.from_pandas(meta, preserve_index=False)
    flat = pa.array(np.ascontiguousarray(emb, dtype=np.float32).reshape(-1))
    offsets = pa.array(np.arange(0, emb.size + 1, emb.shape[1], dtype=np.int32))
    return table.append_column(EMBEDDING_COLUMN, pa.ListArray.from_arrays(offsets, flat))


class _Partition:
    """One partition's files, written chunk by chunk: npy arrays filled in place (memory-mapped),
    parquet files one row group per chunk."""

    def __init__(self, work: Path, name: str, fmt: str, dtype: str, rows: int, dim: int):
        self.fmt, self.at = fmt, 0
        self.paths = [work / f / f"{f}_{name}.{fmt}" for f in ("img_emb", "text_emb")] + \
            [work / "metadata" / f"metadata_{name}.parquet"]
        self.arrays = [np.lib.format.open_memmap(p, mode="w+", dtype=dtype, shape=(rows, dim))
                       for p in self.paths[:2]] if fmt == "npy" else []
        self.writers: list = [None, None, None]

    def _table(self, i: int, table) -> None:
        import pyarrow.parquet as pq

        if self.writers[i] is None:
            self.writers[i] = pq.ParquetWriter(str(self.paths[i]), table.schema)
        self.writers[i].write_table(table)

    def write(self, meta: pd.DataFrame, img: np.ndarray, txt: np.ndarray) -> None:
        import pyarrow as pa

        for i, emb in enumerate((img, txt)):
            if self.fmt == "npy":
                self.arrays[i][self.at : self.at + len(emb)] = emb
            else:
                self._table(i, _embedding_table(meta, emb))
        self._table(2, pa.Table.from_pandas(meta, preserve_index=False))
        self.at += len(meta)

    def close(self) -> list[Path]:
        for a in self.arrays:
            a.flush()
        self.arrays = []
        for w in self.writers:
            if w is not None:
                w.close()
        return self.paths


def default_split(names: list[str], where: str | Path) -> str:
    """The split exported when none is named: the pool's only one (an image-only folder has just
    `all`), else test; a pool with several and no test is refused naming them."""
    if len(names) == 1:
        return names[0]
    if DEFAULT_SPLIT in names:
        return DEFAULT_SPLIT
    raise NotFound(f"{where}: no {DEFAULT_SPLIT} split to export by default (splits: {', '.join(names)}); "
                   "name one with --split, or --split all")


def export_embeddings(run_dir: str | Path, options: ExportOptions | None = None, run=None) -> ExportSummary:
    """Write the run's image and caption embeddings of a split, with metadata, under `options.out`.

    `run` may be an already loaded run (anything with `embed_images`, `embed_texts`, `dim`,
    `features_dir`, `config`)."""
    options = options or ExportOptions()
    run_dir = Path(run_dir)
    _check_parquet_engine()  # metadata is parquet in both layouts
    split = options.split
    if run is None and options.data is not None:
        data = options.data
        if split is None:  # the dataset's splits, read before any is encoded (and handed on, not read again)
            data = load_dataset(options.data, follow_links=options.follow_links, readable_paths=options.readable_paths)
            split = default_split(data.splits, options.data)
        run = pool_run(run_dir, data, split, options.features_root, options.follow_links, options.readable_paths)
    if run is None:
        run = open_run(run_dir)
    files = run.split_files()
    options = replace(options, split=split or default_split(list(files), run.features_dir))
    if options.split != ALL_SPLITS and options.split not in files:
        raise NotFound(f"{run.features_dir}: no {schema.split_file(options.split)} (found: {', '.join(files)})")
    chosen = {k: v for k, v in files.items() if options.split in (ALL_SPLITS, k)}
    pool = f"{pool_name(options.data)}-" if options.data is not None else ""  # named as its index is
    out = Path(options.out) if options.out else run_dir / "export" / f"{pool}{options.split}-{options.format}"
    check_out_folder(out, options.overwrite, MANIFEST, "export")
    with exclusive(out, "export"):
        check_out_folder(out, options.overwrite, MANIFEST, "export")  # again: another export may have finished in between
        return _export(run, run_dir, options, chosen, out, folder_state(out))


def _export(run, run_dir: Path, options: ExportOptions, chosen: dict[str, Path], out: Path,
            expected: tuple[int, int] | None) -> ExportSummary:
    work = staging_folder(out)
    try:
        files_out, part, manifest = _write_export(run, run_dir, options, chosen, work)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)  # a failed export leaves nothing half-written behind
        raise
    replace_folder(work, out, expected)  # only the earlier export checked under the lock is ever replaced
    return ExportSummary(out=str(out), format=options.format, rows=manifest["n_rows"], dim=run.dim, partitions=part,
                         files=[str(out / p.relative_to(work)) for p in files_out])


def _write_export(run, run_dir: Path, options: ExportOptions, chosen: dict[str, Path],
                  work: Path) -> tuple[list[Path], int, dict]:
    for folder in ("img_emb", "text_emb", "metadata"):
        (work / folder).mkdir(parents=True)

    heads = {}  # per split: its image count and caption -> image rows (8 bytes a caption), nothing more
    for name, path in chosen.items():
        with open_cache(path) as f:
            heads[name] = (int(f[schema.IMAGE_FEATURES].shape[0]),
                           check_caption_order(read_dataset(f, schema.CAPTION_IMAGE_ROW).astype(np.int64), path))
    counts = {name: (n if options.rows == "images" else cap.size) for name, (n, cap) in heads.items()}
    n_parts = sum(math.ceil(c / options.rows_per_file) for c in counts.values())
    width = int(math.log10(max(n_parts, 1))) + 1
    files_out: list[Path] = []
    part = 0
    offsets = bank_offsets(run)
    for name, path in chosen.items():
        n_images, cap_img = heads[name]
        img_rows, cap_rows = _sample_rows(n_images, cap_img, options.rows)
        for s in range(0, img_rows.size, options.rows_per_file):
            ir, cr = img_rows[s : s + options.rows_per_file], cap_rows[s : s + options.rows_per_file]
            out = _Partition(work, str(part).zfill(width), options.format, options.dtype, ir.size, run.dim)
            try:
                for c in range(0, ir.size, EXPORT_CHUNK):
                    _write_chunk(run, path, cap_img, ir[c : c + EXPORT_CHUNK], cr[c : c + EXPORT_CHUNK], offsets, out)
            finally:  # files closed whatever happens; a failed export's folder is removed by the caller
                files_out += out.close()
            part += 1

    manifest = {
        "format": options.format, "rows": options.rows, "dtype": options.dtype if options.format == "npy" else "float32",
        "dim": run.dim, "n_rows": sum(counts.values()), "partitions": part, "embedding_column": EMBEDDING_COLUMN,
        "run_dir": str(run_dir), "heads_sha256": heads_sha256(run_dir), "backbone": run.config.get("backbone", ""),
        "split": options.split, "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "querybank": offsets.setting.to_dict() if offsets is not None else None,
        "sources": [{"split": k, "path": str(chosen[k]), "rows": counts[k],
                     "dataset_fingerprint": str(read_attrs(chosen[k]).get(schema.DATASET_FINGERPRINT, ""))} for k in chosen],
    }
    (work / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return files_out, part, manifest


def _write_chunk(run, path: Path, cap_img: np.ndarray, ir: np.ndarray, cr: np.ndarray, offsets,
                 out: _Partition) -> None:
    """Rows (image row, caption row or -1) of one cache file: the images they cover read as one slice,
    embedded, and appended to the partition."""
    if ir.size == 0:
        return
    lo = int(ir.min())
    part = load_split_rows(path, lo, int(ir.max()) + 1, cap_img)
    li, lc = ir - lo, np.where(cr >= 0, cr - part.first_caption, -1)
    img = _embed_rows(run.embed_images, part.image_features, li, run.dim)
    txt = _embed_rows(run.embed_texts, part.caption_features, lc, run.dim)
    meta = _metadata(part, li, lc, _concept_labels(part))
    if offsets is not None:  # what the run's query bank adds to each row's cosines, for tools that rank
        for column, emb, fn, have in (("image_offset", img, offsets.images, ir >= 0),
                                      ("caption_offset", txt, offsets.captions, cr >= 0)):
            got = fn(torch.from_numpy(emb))
            meta[column] = np.where(have, 0.0 if got is None else got.numpy(), 0.0).astype(np.float32)
    out.write(meta, img, txt)


def format_export_summary(summary: ExportSummary) -> str:
    return (f"exported {summary.rows} rows x {summary.dim} dims in {summary.partitions} partition(s) "
            f"as {summary.format} to {summary.out}\n" + "\n".join(f"  {f}" for f in summary.files))

