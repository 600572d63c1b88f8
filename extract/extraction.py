"""Phase 1: run a frozen backbone once over a dataset and store its features in the HDF5 cache.

One call of `extract_split` does one split (or one shard of it) from start to finish and can be
killed and re-run at any point; `extract` is the plain loop over splits that the CLI calls.
"""
from __future__ import annotations

import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from medembed.cache import schema
from medembed.cache.lock import writer_lock
from medembed.cache.parts import PartStore
from medembed.cache.provenance import ProvenanceMismatch, differences
from medembed.cache.reader import CachedSplit, read_attrs, read_skipped
from medembed.cache.schema import PRIVATE_LOCATION
from medembed.cache.shards import merge_shards, write_done_marker
from medembed.cache.writer import write_split
from medembed.common.device import resolve_device
from medembed.common.errors import MedembedError
from medembed.common.files import relative_to, slug
from medembed.common.planning import DEFAULT_MAX_MEMORY_GB, MemoryBudgetError
from medembed.common.version import __version__
from medembed.extract.access import FOLLOW_LINKS, DataAccess
from medembed.extract.backbones import DEFAULT_BACKBONE, AugmentConfig, create_backbone, onnx_runtime
from medembed.extract.datasets import load_dataset
from medembed.extract.datasets.frames import DEFAULT_FRAMES, expand_frames, parse_frames
from medembed.extract.datasets.identity import naming_mismatch
from medembed.extract.duplicates import cross_split_copies
from medembed.extract.imaging import DecodeOptions
from medembed.extract.imaging.locations import private_location
from medembed.extract.memory import ExtractPlan, plan_extract_memory
from medembed.extract.records import ZIP_SEP, Dataset, Record
from medembed.extract.synthetic import default_dataset_dir, ensure_default_dataset, is_complete
from medembed.extract.worker import ImageItems, collate_items

DEFAULT_TEMPLATES = (
    "{name}",
    "a radiology image showing {name}",
    "a medical image of {name}",
    "an image showing {name}",
)
TEXT_BATCH = 256  # concept prompts per crash-safe part (captions go per image batch: `_text_phase`)
GRAPHS_DIR = "graphs"  # exported runtime graphs, in the cache folder beside the split files
# where caches go unless told (OUT/DATASET/BACKBONE/SPLIT.h5): extraction, and every command that encodes a
# new dataset for a run (search, serve, index, export, eval --data), so each finds the others' caches
DEFAULT_FEATURES_ROOT = "features"
FEATURE_DTYPES = ("float16", "float32")  # how features may be stored (heads train in float32 either way)


class ExtractError(MedembedError, RuntimeError):
    pass


@dataclass
class ExtractConfig:
    data: str | None = None  # None: the embedded synthetic dataset
    backbone: str = DEFAULT_BACKBONE
    splits: list[str] | None = None  # None: every split the dataset has
    batch_size: int = 64
    workers: int = 2
    device: str = "auto"
    out: str = DEFAULT_FEATURES_ROOT
    strict: bool = False
    dtype: str = "float16"
    views: int = 0  # augmented views per image stored beside the plain features
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    progress: bool = True
    shard: str | None = None  # "I/N": this process does the I-th of N contiguous blocks of each split
    allow_split_overlap: bool = False  # keep images found in several splits (with a warning) instead of refusing
    window: str = "auto"  # intensity window of DICOM / NIfTI / 16-bit images: auto, a preset, or CENTRE,WIDTH
    frames: str = "middle"  # multi-frame DICOM and NIfTI volumes: middle, all, or N evenly spaced frames
    report_sections: str | None = None  # MIMIC-CXR / OpenI captions: findings, impression, findings+impression, all
    follow_links: bool = False  # read links leading out of the data folder (recorded in the cache's provenance)
    readable_paths: bool = False  # keep image paths as ids where they would be hashed (DICOM, image-only folders)
    runtime: str = onnx_runtime.DEFAULT_RUNTIME  # image tower on the CPU: torch, onnx (ONNX Runtime), auto (onnx when installed)
    # a split of more records is written as consecutive part files joined without copying (HDF5 virtual
    # datasets), so assembling one file holds at most this many images' features (0.9 GB at 1,792-d float16)
    records_per_file: int = 262_144
    # the whole process; parts are made smaller to fit, and a split or --shard that cannot fit is refused
    max_memory_gb: float = DEFAULT_MAX_MEMORY_GB

    def decode_options(self) -> DecodeOptions:
        try:
            return DecodeOptions.from_text(self.window)
        except ValueError as e:
            raise ExtractError(f"--window {e}") from None

    def decoding(self) -> str:
        """How images are rendered, for provenance; empty for the defaults (caches made before these
        options existed keep matching)."""
        parts = [self.decode_options().describe()]
        if str(self.frames).strip().lower() != DEFAULT_FRAMES:
            parts.append(f"frames={parse_frames(self.frames)}")
        return "; ".join(p for p in parts if p)


def check_split_overlap(dataset: Dataset, allow: bool) -> list[str]:
    """Refuse a dataset whose splits share images by id or by file (train/test leakage, almost always a
    mistake in the split files), naming the first few; with `allow`, the warning to print instead.
    Cheap (the records alone), so it runs before the backbone is built; byte-identical copies under
    other ids and files are `copies_warning`'s, which reads images."""
    overlaps = dataset.split_overlaps()
    if not overlaps:
        return []
    shown = "; ".join(f"{key} in {'+'.join(splits)}" for key, splits in overlaps[:3])
    more = f" and {len(overlaps) - 3} more" if len(overlaps) > 3 else ""
    n = len(overlaps)
    what = f"{dataset.root}: {n} image{' is' if n == 1 else 's are'} in more than one split ({shown}{more})"
    if not allow:
        raise ExtractError(f"{what}: that leaks test into training; fix the split files, or pass "
                           "--allow-split-overlap to extract them anyway")
    return [f"{what}: kept because of --allow-split-overlap; test numbers of runs trained on this data are inflated"]


def copies_warning(dataset: Dataset) -> list[str]:
    """The warning naming images copied byte for byte into another split under another id and file
    (`extract.duplicates`); [] when there are none. A warning, never a refusal: public corpora file
    the same figure twice under two ids (roco-rad holds one such pair across train and test), and
    refusing would stop the first command a user runs on an official split they cannot change. It
    runs before any image is encoded, and only when some split will be: it reads images (every one of
    a parquet dataset), and caches already up to date were checked when they were written."""
    copies = cross_split_copies(dataset.records, dataset.access)
    if not copies:
        return []
    n = len(copies)
    shown = "; ".join(c.describe() for c in copies[:3]) + (f" and {n - 3} more" if n > 3 else "")
    return [f"{dataset.root}: {n} image{' is a copy' if n == 1 else 's are copies'} of another split's image under "
            f"another id ({shown}): a run's numbers on the later split count {'it' if n == 1 else 'them'} as unseen; "
            "drop the copies from one split's files to measure without them"]


def parse_shard(shard: str | None) -> tuple[int, int] | None:
    if not shard:
        return None
    try:
        i, n = (int(x) for x in shard.split("/"))
    except ValueError:
        raise ExtractError(f"--shard {shard!r}: expected I/N with whole numbers, e.g. 0/4") from None
    if n < 1 or not 0 <= i < n:
        raise ExtractError(f"--shard {shard!r}: I must be in 0..N-1 and N >= 1")
    return i, n


def shard_file_name(split: str, shard: tuple[int, int] | None) -> str:
    return schema.split_file(split) if shard is None else schema.shard_file(split, *shard)


def shard_rows(n_records: int, shard: tuple[int, int] | None, batch_size: int = 1) -> tuple[int, int]:
    """[lo, hi) of the records shard I/N does: contiguous blocks of whole batches, so every batch of a
    shard is the batch the unsharded loop would run and the joined shards equal its cache bit for bit.
    A split of fewer batches than shards leaves some shards empty (`empty_shards_note` says so)."""
    if shard is None:
        return 0, n_records
    i, n = shard
    n_batches = -(-n_records // max(1, batch_size))
    return (min(n_records, i * n_batches // n * batch_size),
            min(n_records, (i + 1) * n_batches // n * batch_size))


def shard_records(records: list, shard: tuple[int, int] | None, batch_size: int = 1) -> list:
    lo, hi = shard_rows(len(records), shard, batch_size)
    return records[lo:hi]


def empty_shards_note(split: str, n_records: int, batch_size: int, n_shards: int, empty: list[int]) -> str:
    """Why shards of a split hold no record, in a line. A split of fewer batches than shards leaves
    some empty: splitting a batch between shards would change the features' float rounding (a
    backbone's output depends on what else is in its batch), and the joined shards would no longer
    equal an unsharded extraction."""
    n_batches = -(-n_records // max(1, batch_size))
    which = f"shard {empty[0]}/{n_shards} has" if len(empty) == 1 else f"{len(empty)} of its {n_shards} shards have"
    fix = (f"--batch-size {n_records // n_shards} or less gives every shard some" if n_records >= n_shards else
           "it has fewer records than shards")
    return (f"split {split}: {which} no records: its {n_records} record{'s are' if n_records != 1 else ' is'} {n_batches} "
            f"batch{'' if n_batches == 1 else 'es'} of --batch-size {batch_size} and a shard takes whole batches, so that "
            f"the joined shards equal an unsharded extraction bit for bit; {fix}")


@dataclass
class SplitSummary:
    split: str
    path: str
    records: int = 0
    images: int = 0
    captions: int = 0
    skipped: list[tuple[str, str, str]] = field(default_factory=list)  # (id, location, reason)
    seconds: float = 0.0
    images_per_s: float = 0.0
    status: str = "written"  # written | resumed | up to date
    note: str = ""  # why this shard holds no record, when it holds none (`empty_shards_note`)


@dataclass
class ExtractSummary:
    dataset: str
    synthetic: bool
    backbone: str
    device: str
    out_dir: str
    splits: list[SplitSummary]
    warnings: list[str] = field(default_factory=list)  # what the dataset reader dropped, with file and line
    layout: str = ""  # the dataset layout detected (imageclef2023, imageclef2022, generic)
    found: str = ""  # what the reader found, in a line
    runtime: str = ""  # what ran the image tower
    memory: list[str] = field(default_factory=list)  # each split's memory plan, in a line
    refused: list[str] = field(default_factory=list)  # what the dataset reader would not read, by reason (`Refusals`)


def cache_dir(out: str | Path, dataset: str, backbone: str) -> Path:
    return Path(out) / slug(dataset) / slug(backbone)


def _stored_location(record: Record, dataset: Dataset) -> str:
    """What the cache keeps of where an image is: its path relative to the data folder, or, when paths
    may identify patients, only its keyed id (see `imaging.locations`)."""
    if dataset.private_paths:
        return private_location(record.image_id, dataset.id_key) if dataset.id_key else \
            f"{PRIVATE_LOCATION}{record.image_id}"
    return _relative(record.image, dataset.root)


def _relative(location: str, root: str) -> str:
    path, sep, member = location.partition(ZIP_SEP)
    try:
        rel = os.path.relpath(path, root)
    except ValueError:
        rel = path
    return rel + sep + member


def split_provenance(bb, dataset: Dataset, split: str, cfg: ExtractConfig) -> dict:
    return {
        **{k: str(v) for k, v in bb.provenance.items()},
        schema.BACKBONE: bb.name,
        schema.DATASET: dataset.name,
        schema.DATASET_LAYOUT: dataset.layout,
        schema.DATASET_FINGERPRINT: dataset.fingerprint(),
        schema.SYNTHETIC: bool(dataset.synthetic),
        schema.SPLIT: split,
        schema.DTYPE: cfg.dtype,
        schema.VIEWS: int(cfg.views),
        schema.TEMPLATES: "\n".join(cfg.templates),
        schema.TOOLKIT_VERSION: __version__,
        schema.SHARD: cfg.shard or "",
        schema.IMAGE_DIM: int(bb.image_dim),
        schema.TEXT_DIM: int(bb.text_dim),
        **({schema.IMAGE_DECODING: decoding} if (decoding := cfg.decoding()) else {}),
        # what was read and how records are named, when not the defaults (older caches keep matching)
        **({schema.DATA_ACCESS: FOLLOW_LINKS} if dataset.follow_links else {}),
        **({schema.IMAGE_ID_SCHEME: f"keyed path hash, key {dataset.id_key}"} if dataset.id_key else {}),
    }


def _autocast(device: str):
    return torch.autocast("cuda", dtype=torch.float16) if device.startswith("cuda") else nullcontext()


def _image_phase(bb, records: list[Record], store: PartStore, batch_size: int, cfg: ExtractConfig, device: str, bar,
                 first: int = 0, access: DataAccess | None = None, private: bool = False):
    """Batch b always holds records [b*bs, (b+1)*bs): fixed boundaries make resumed output identical.
    `first` is the split's row of records[0], which seeds each record's augmented views."""
    n_batches = (len(records) + batch_size - 1) // batch_size
    todo = [b for b in range(n_batches) if not store.done("img", b)]
    bar.update(sum(min(batch_size, len(records) - b * batch_size) for b in range(n_batches) if store.done("img", b)))
    if not todo:
        return 0, 0.0
    items = ImageItems(records, bb.preprocess, bb.augment, cfg.views, decode=cfg.decode_options(), first=first,
                       access=access, private=private)
    batches = [list(range(b * batch_size, min((b + 1) * batch_size, len(records)))) for b in todo]
    loader = DataLoader(
        items,
        batch_sampler=batches,
        num_workers=cfg.workers,
        collate_fn=collate_items,
        pin_memory=device.startswith("cuda"),
        persistent_workers=False,
        prefetch_factor=4 if cfg.workers > 0 else None,
    )
    n_done, t0 = 0, time.perf_counter()
    for b, (idx, pixels, views, failures) in zip(todo, loader):
        if failures and cfg.strict:
            i, reason = failures[0]
            raise ExtractError(
                f"{records[i].image}: record {records[i].image_id} ({reason}); stopping because of --strict. "
                f"{store.count('img')} finished batches are kept in {store.dir} and a re-run continues from there."
            )
        feats = np.zeros((0, bb.image_dim), np.float32)
        vfeats = np.zeros((0, cfg.views, bb.image_dim), np.float32)
        if pixels is not None:
            with torch.inference_mode(), _autocast(device):
                feats = bb.encode_images(pixels.to(device, non_blocking=True)).float().cpu().numpy()
                if views is not None:
                    v = views.flatten(0, 1).to(device, non_blocking=True)
                    vfeats = bb.encode_images(v).float().cpu().numpy().reshape(len(idx), cfg.views, -1)
        store.put(
            "img",
            b,
            rows=np.asarray(idx, np.int64),
            features=feats.astype(cfg.dtype),
            views=vfeats.astype(cfg.dtype),
            fail_rows=np.asarray([f[0] for f in failures], np.int64),
            fail_reasons=np.asarray([f[1] for f in failures], dtype=str),
        )
        n_done += len(idx) + len(failures)
        bar.update(len(idx) + len(failures))
    return n_done, time.perf_counter() - t0


def _gather_images(store: PartStore, n_records: int, batch_size: int, image_dim: int, n_views: int, dtype: str):
    """(kept rows of each batch, their features, views, failures) from the image parts (a shard may
    hold no batch at all when a split has fewer batches than shards)."""
    n_batches = (n_records + batch_size - 1) // batch_size
    rows, feats, views, fails = [], [], [], []
    for b in range(n_batches):
        p = store.get("img", b)
        rows.append(p["rows"])
        feats.append(p["features"])
        views.append(p["views"])
        fails += list(zip(p["fail_rows"].tolist(), p["fail_reasons"].tolist()))
    if not rows:
        return [], np.zeros((0, image_dim), dtype), np.zeros((0, n_views, image_dim), dtype), []
    return rows, np.concatenate(feats), np.concatenate(views), fails


_TEXT_KINDS = {"capb": "captions", "con": "concept prompts"}


def _text_phase(bb, batches: list[list[str]], store: PartStore, kind: str, dtype: str, device: str,
                progress: bool = False) -> np.ndarray:
    """Texts encoded batch by batch, each batch one crash-safe part (`kind` b; an empty batch has
    none). Captions come in the batches of their images (part `capb` b: the captions of image batch
    b's kept images), so what one forward sees depends only on that batch, never on where a shard
    starts, and a sharded extraction's captions equal the unsharded loop's bit for bit."""
    todo = [b for b, texts in enumerate(batches) if texts and not store.done(kind, b)]
    total = sum(len(t) for t in batches)
    with tqdm(total=total, desc=_TEXT_KINDS.get(kind, kind), unit="text", disable=not progress or not todo,
              dynamic_ncols=True) as bar:
        bar.update(total - sum(len(batches[b]) for b in todo))
        for b in todo:
            with torch.inference_mode(), _autocast(device):
                f = bb.encode_texts(batches[b])
            store.put(kind, b, features=f.float().cpu().numpy().astype(dtype))
            bar.update(len(batches[b]))
    parts = [store.get(kind, b)["features"] for b, texts in enumerate(batches) if texts]
    return np.concatenate(parts) if parts else np.zeros((0, bb.text_dim), dtype)


def planned(bb, dataset: Dataset, split: str, cfg: ExtractConfig) -> tuple[ExtractConfig, ExtractPlan]:
    """`cfg` with its parts sized to `cfg.max_memory_gb` for this split (`extract.memory`), and the plan;
    a --shard holding more records than fit is refused, naming the shard count that would."""
    records = dataset.split(split)
    shard = parse_shard(cfg.shard)
    lo, hi = shard_rows(len(records), shard, cfg.batch_size)
    try:
        plan = plan_extract_memory(
            bb, budget_gb=cfg.max_memory_gb, n_dataset_records=len(dataset.records),
            captions_per_image=records.n_captions() / max(1, len(records)), batch_size=cfg.batch_size,
            workers=cfg.workers, views=cfg.views, dtype=cfg.dtype, records_per_file=cfg.records_per_file,
            other_runtime=cfg.runtime != "torch", split_records=max(1, hi - lo))
    except MemoryBudgetError as e:
        raise ExtractError(str(e)) from None
    if shard is not None:
        if hi - lo > plan.fits:
            raise ExtractError(
                f"--shard {cfg.shard}: {hi - lo:,} images of split {split} in one shard; --max-memory-gb "
                f"{cfg.max_memory_gb:g} assembles at most {plan.fits:,}: use {-(-len(records) // plan.fits)} or more "
                "shards, or a larger --max-memory-gb")
    return replace(cfg, records_per_file=plan.records_per_file), plan


def extract_split(bb, dataset: Dataset, split: str, cfg: ExtractConfig, device: str,
                  memo: dict | None = None) -> SplitSummary:
    """`memo` carries results shared by the splits of one run (the concept-prompt features)."""
    try:
        return _extract_split(bb, dataset, split, cfg, device, {} if memo is None else memo)
    except OSError as e:
        # a full disk or a vanished folder: say where, keep every finished batch for the re-run
        final = cache_dir(cfg.out, dataset.name, bb.name) / shard_file_name(split, parse_shard(cfg.shard))
        store = PartStore(final)
        kept = f"; {store.count('img')} finished image batches are kept in {store.dir}" if store.dir.exists() else ""
        raise ExtractError(
            f"{e.filename or final}: {e.strerror or e}{kept}. Free space (or fix the folder) and re-run the same "
            "command to continue."
        ) from e


def extract_split_in_parts(bb, dataset: Dataset, split: str, cfg: ExtractConfig, device: str,
                           memo: dict | None = None) -> SplitSummary:
    """`extract_split`, with a split of more than `cfg.records_per_file` records (and no --shard of the
    user's) written as consecutive part files, one after the other, then joined: the same cache, bit for
    bit, with every phase's memory bounded by one part. A re-run keeps finished parts and continues the
    one in flight."""
    n = len(dataset.split(split))
    final = cache_dir(cfg.out, dataset.name, bb.name) / schema.split_file(split)
    if cfg.shard is not None or n <= cfg.records_per_file or final.exists():
        return extract_split(bb, dataset, split, cfg, device, memo)
    n_batches = -(-n // cfg.batch_size)
    parts = -(-n_batches // max(1, cfg.records_per_file // cfg.batch_size))
    _check_earlier_parts(final, split, parts, cfg.batch_size)
    done = [extract_split(bb, dataset, split, replace(cfg, shard=f"{i}/{parts}"), device, memo) for i in range(parts)]
    with writer_lock(final):
        if not final.exists():
            merge_shards(final.parent, splits=[split])
    return SplitSummary(split=split, path=str(final), records=sum(d.records for d in done),
                        images=sum(d.images for d in done), captions=sum(d.captions for d in done),
                        skipped=[x for d in done for x in d.skipped], seconds=sum(d.seconds for d in done),
                        images_per_s=sum(d.images for d in done) / max(sum(d.seconds for d in done), 1e-9),
                        status=f"written in {parts} parts, joined")


def _check_earlier_parts(final: Path, split: str, parts: int, batch_size: int) -> None:
    """Finished parts of an earlier, unfinished extraction of this split must be the parts this one
    would write (their rows follow the part count and --batch-size): else say how to continue it,
    instead of mixing two layouts into one split."""
    for p in sorted(final.parent.glob(schema.shard_glob(split))):
        m = schema.SHARD_RE.match(p.name)
        if not m:
            continue
        n, size = int(m["n"]), read_attrs(p).get(schema.EXTRACT_BATCH_SIZE)
        if n != parts or (size is not None and int(size) != batch_size):
            raise ExtractError(f"{p}: an earlier extraction of split {split} in {n} parts with --batch-size {size} is "
                               f"unfinished here; re-run it with the same --batch-size and --max-memory-gb to continue, or delete its "
                               f"{split}{schema.SHARD_MARK}* files")


def _up_to_date(final: Path, prov: dict, summary: SplitSummary, cfg: ExtractConfig, shard) -> SplitSummary:
    """A finished file of the same provenance is kept; one of another provenance is never mixed. A
    file another runtime made (PyTorch vs ONNX Runtime: the same graph, features equal to float
    rounding) is kept as it is, said in its status: nothing is mixed into it."""
    attrs = read_attrs(final)
    diffs = differences(attrs, prov)
    runtime_only = [d for d in diffs if d.startswith(f"{schema.IMAGE_RUNTIME}:")]
    if len(runtime_only) < len(diffs):
        raise naming_mismatch(final, attrs, prov, diffs) or ProvenanceMismatch(final, diffs)
    PartStore(final).remove()  # left over when a run died between rename and clean-up
    if shard is not None:  # the run may have died between the rename and the marker
        write_done_marker(final, n_images=attrs[schema.N_IMAGES], n_captions=attrs[schema.N_CAPTIONS], shard=cfg.shard)
    made_by = f" (made by {attrs.get(schema.IMAGE_RUNTIME) or 'PyTorch'}, kept)" if runtime_only else ""
    summary.status, summary.images, summary.captions = f"up to date{made_by}", attrs[schema.N_IMAGES], attrs[schema.N_CAPTIONS]
    summary.skipped = read_skipped(final)
    return summary


def _concept_columns(bb, dataset: Dataset, kept: list[Record], store: PartStore, cfg: ExtractConfig,
                     device: str, memo: dict):
    """(vocabulary, names, CSR labels of the kept images, prompt features [C, T, Dt]).

    Only named concepts get prompts: an id such as C0376152 carries no meaning for a text encoder,
    and in ROCO most ids are unnamed (skipping them saves ~85% of the prompts). The prompts are the
    same for every split: `memo` encodes them once per run."""
    vocab = dataset.concept_vocab()
    col = {c: j for j, c in enumerate(vocab)}
    names = [dataset.concept_names.get(c, "") for c in vocab]
    named = [j for j, n in enumerate(names) if n]
    prompts = [t.format(name=names[j]) for j in named for t in cfg.templates]
    key = ("concepts", tuple(prompts))
    if key not in memo:
        chunks = [prompts[s : s + TEXT_BATCH] for s in range(0, len(prompts), TEXT_BATCH)]
        memo[key] = _text_phase(bb, chunks, store, "con", cfg.dtype, device, cfg.progress)
    features = np.zeros((len(vocab), len(cfg.templates), bb.text_dim), cfg.dtype)
    features[named] = memo[key].reshape(len(named), len(cfg.templates), bb.text_dim)
    indptr, indices = [0], []
    for rec in kept:
        indices += sorted({col[c] for c in rec.concepts})
        indptr.append(len(indices))
    labels = sp.csr_matrix((np.ones(len(indices), np.float32), np.asarray(indices, np.int64), np.asarray(indptr)),
                           shape=(len(kept), len(vocab)))
    return vocab, names, labels, features


def _assemble(bb, dataset: Dataset, split: str, records: list[Record], store: PartStore, batch_size: int,
              prov: dict, cfg: ExtractConfig, device: str, memo: dict, shard_attrs: dict) -> CachedSplit:
    """The finished split from its crash-safe parts: images kept, their captions, concepts, skips."""
    batch_rows, feats, views, fails = _gather_images(store, len(records), batch_size, bb.image_dim, cfg.views, cfg.dtype)
    kept = [records[i] for i in (np.concatenate(batch_rows) if batch_rows else [])]
    captions = [c for rec in kept for c in rec.captions]
    caption_image = np.asarray([r for r, rec in enumerate(kept) for _ in rec.captions], np.int64)
    cap_feats = _text_phase(bb, [[c for i in rows.tolist() for c in records[i].captions] for rows in batch_rows],
                            store, "capb", cfg.dtype, device, cfg.progress)
    vocab, names, labels, concept_feats = _concept_columns(bb, dataset, kept, store, cfg, device, memo)
    attrs = {**prov, schema.CREATED: datetime.now(UTC).isoformat(timespec="seconds"),
             schema.DATA_ROOT: str(Path(dataset.root).resolve()),
             schema.DATA_ROOT_RELATIVE: relative_to(dataset.root, store.dir.parent),
             schema.N_RECORDS: len(records), schema.EXTRACT_BATCH_SIZE: batch_size, **shard_attrs}
    return CachedSplit(
        split=split, image_ids=[r.image_id for r in kept], image_features=feats, caption_features=cap_feats,
        caption_image=caption_image, captions=captions, concept_ids=vocab, concept_names=names, concepts=labels,
        concept_text_features=concept_feats, templates=list(cfg.templates), view_features=views if cfg.views else None,
        image_locations=[_stored_location(r, dataset) for r in kept], attrs=attrs,
        skipped=[(records[i].image_id, _stored_location(records[i], dataset), why) for i, why in fails])


def _feature_attrs(bb) -> dict:
    p = bb.provenance
    return {"images": {schema.FEATURE_LAYER: p.get(schema.IMAGE_LAYER, ""), schema.FEATURE_POOLING: p.get(schema.IMAGE_POOLING, "")},
            "captions": {schema.FEATURE_LAYER: p.get(schema.TEXT_LAYER, ""), schema.FEATURE_POOLING: p.get(schema.TEXT_POOLING, "")}}


def _extract_split(bb, dataset: Dataset, split: str, cfg: ExtractConfig, device: str, memo: dict) -> SplitSummary:
    """Extract one split (or one shard of it, with cfg.shard) into `{out}/{dataset}/{backbone}/`.

    Safe to kill and re-run at any point: finished batches are kept and the run continues.
    """
    if not dataset.split(split):
        raise ExtractError(f"{dataset.root}: split '{split}' has no records (splits here: {', '.join(dataset.splits)})")
    shard = parse_shard(cfg.shard)
    every = dataset.split(split)
    final = cache_dir(cfg.out, dataset.name, bb.name) / shard_file_name(split, shard)
    summary = SplitSummary(split=split, path=str(final), records=len(shard_records(every, shard, cfg.batch_size)))
    if shard is not None and not summary.records:
        summary.note = empty_shards_note(split, len(every), cfg.batch_size, shard[1], [shard[0]])
    prov = split_provenance(bb, dataset, split, cfg)
    final.parent.mkdir(parents=True, exist_ok=True)
    with writer_lock(final):
        if final.exists():
            return _up_to_date(final, prov, summary, cfg, shard)
        store = PartStore(final)
        resumed = store.exists()
        settings = store.open(prov, {"batch_size": cfg.batch_size, "rows": list(shard_rows(len(every), shard, cfg.batch_size))})
        batch_size = int(settings["batch_size"])
        # the range recorded when this shard started (parts of an earlier version: its even split of records)
        lo, hi = settings.get("rows") or ((0, len(every)) if shard is None else
                                          (len(every) * shard[0] // shard[1], len(every) * (shard[0] + 1) // shard[1]))
        records = every[lo:hi]
        summary.records = len(records)
        summary.note = empty_shards_note(split, len(every), batch_size, shard[1], [shard[0]]) \
            if shard is not None and not records else ""
        shard_attrs = {schema.SHARD_ROWS: f"{lo}:{hi}", schema.SPLIT_RECORDS: len(every)} if shard is not None else {}
        summary.status = "resumed" if resumed else "written"
        t0 = time.perf_counter()
        with tqdm(total=len(records), desc=f"{split} images", unit="img", disable=not cfg.progress, dynamic_ncols=True) as bar:
            n_new, secs = _image_phase(bb, records, store, batch_size, cfg, device, bar, first=lo,
                                       access=dataset.access, private=dataset.private_paths)
        cached = _assemble(bb, dataset, split, records, store, batch_size, prov, cfg, device, memo, shard_attrs)
        write_split(final, cached, dtype=cfg.dtype, feature_attrs=_feature_attrs(bb))
        if shard is not None:
            write_done_marker(final, n_images=cached.n_images, n_captions=len(cached.captions), shard=cfg.shard)
        store.remove()
        summary.skipped = cached.skipped
        summary.images, summary.captions = cached.n_images, len(cached.captions)
        summary.seconds = time.perf_counter() - t0
        summary.images_per_s = n_new / secs if secs > 0 else 0.0
        return summary


def read_dataset(cfg: ExtractConfig, dataset: Dataset | None = None) -> Dataset:
    """The records `cfg` extracts: its data folder (or `dataset`) read with its report sections, and
    multi-frame files expanded per its --frames; a bad --window or --frames is refused before anything
    is read. Every distributor (the loop, each Ray task) reads through here, so all see the same records."""
    cfg.decode_options()
    frames = parse_frames(cfg.frames)
    if dataset is None:
        if not cfg.data and not is_complete(default_dataset_dir()):
            _step(cfg, "generating the synthetic phantom set (once)")
        _step(cfg, f"reading the dataset{f' {cfg.data}' if cfg.data else ''}")
        dataset = load_dataset(cfg.data if cfg.data else ensure_default_dataset(), report_sections=cfg.report_sections,
                               follow_links=cfg.follow_links, readable_paths=cfg.readable_paths)
    return expand_frames(dataset, frames)


def _step(cfg: ExtractConfig, what: str) -> None:
    """One line on stderr before a step that runs for seconds without a bar of its own (reading a
    dataset, building a backbone, exporting its graph), so a start is never silent. Only on a terminal:
    a log or a caller reading the output gets the summary and its errors alone."""
    if cfg.progress and sys.stderr.isatty():
        tqdm.write(f"extract: {what} ...", file=sys.stderr)


def attach_runtime(bb, cfg: ExtractConfig, dataset_name: str, device: str, notes: list[str]) -> None:
    """The image tower on the runtime `cfg.runtime` chooses for `device` (see `onnx_runtime.attach`);
    cached captions stay on PyTorch, which encodes batches of them as fast. Every distributor calls this."""
    try:
        onnx_runtime.attach(bb, cfg.runtime, device, cache_dir(cfg.out, dataset_name, bb.name) / GRAPHS_DIR, notes)
    except ValueError as e:
        raise ExtractError(str(e)) from None


def extract(cfg: ExtractConfig, backbone=None, dataset: Dataset | None = None) -> ExtractSummary:
    """Every split in `cfg.splits` (default: all) of the dataset. `backbone` / `dataset` may be
    passed in already built (a fine-tuned backbone exists only as an object, not as a registry
    name); else they come from `cfg.backbone` / `cfg.data`."""
    dataset = read_dataset(cfg, dataset)
    splits = cfg.splits or dataset.splits
    unknown = [s for s in splits if s not in dataset.splits]
    if unknown:
        raise ExtractError(f"{dataset.root}: no split {', '.join(unknown)} (splits here: {', '.join(dataset.splits)})")
    _step(cfg, "comparing the splits (ids and files)")
    overlap = check_split_overlap(dataset, cfg.allow_split_overlap)
    device = resolve_device(cfg.device).type
    # no flips for the stored views: radiology captions name the patient's left and right
    if backbone is None:
        _step(cfg, f"building the backbone {cfg.backbone} on {device}")
    bb = backbone or create_backbone(cfg.backbone, device=device, augment=AugmentConfig(hflip=0.0))
    plans = {s: planned(bb, dataset, s, cfg) for s in splits}  # every split planned (or refused) before any runs
    folder, shard = cache_dir(cfg.out, dataset.name, bb.name), parse_shard(cfg.shard)
    if not all((folder / shard_file_name(s, shard)).exists() for s in splits):  # else each is up to date or refused
        _step(cfg, "comparing the splits' images (the bytes of those whose size recurs)")
        overlap += copies_warning(dataset)
    notes: list[str] = []
    _step(cfg, f"preparing the image tower (--runtime {cfg.runtime})")
    attach_runtime(bb, cfg, dataset.name, device, notes)
    memo: dict = {}
    results = [extract_split_in_parts(bb, dataset, s, plans[s][0], device, memo) for s in splits]
    return ExtractSummary(
        dataset=dataset.name,
        synthetic=bool(dataset.synthetic),
        backbone=bb.name,
        device=device,
        out_dir=str(cache_dir(cfg.out, dataset.name, bb.name)),
        splits=results,
        warnings=overlap + notes + [r.note for r in results if r.note] + list(getattr(dataset, "warnings", [])),
        layout=dataset.layout,
        runtime=bb.provenance.get(schema.IMAGE_RUNTIME, f"torch {torch.__version__}"),
        found=describe_dataset(dataset),
        memory=[f"{s}: {plans[s][1].describe()}" for s in splits],
        refused=dataset.refused.lines(),
    )


LAYOUT_NAMES = {"imageclef2023": "ImageCLEFmedical 2023 / ROCOv2", "imageclef2022": "ImageCLEF 2022",
                "rocov2-parquet": "ROCOv2 (Hugging Face parquet)", "mimic-cxr": "MIMIC-CXR",
                "openi": "IU X-ray / OpenI", "webdataset": "WebDataset shards",
                "generic": "generic CSV/JSONL", "images": "image-only (no captions)"}


def describe_dataset(dataset: Dataset) -> str:
    """What a reader found, in one line: layout, folder, records per split, captions, concepts."""
    per_split = ", ".join(f"{s} {len(dataset.split(s))}" for s in dataset.splits)
    captions = dataset.records.n_captions()
    vocab = dataset.concept_vocab()
    named = sum(1 for c in vocab if dataset.concept_names.get(c))
    return (f"{LAYOUT_NAMES.get(dataset.layout, dataset.layout)} layout in {dataset.root}: {len(dataset.records)} images "
            f"({per_split}), {captions} captions, {len(vocab)} concepts ({named} named)")
