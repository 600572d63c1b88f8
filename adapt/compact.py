"""Compact runs: a trained run whose embeddings are mapped to fewer dimensions, for archives where
the index, exports and the search page's pool are sized by bytes per image.

The map is the top `dims` eigenvectors of the second-moment matrix E[x x^T] of the run's unit
train embeddings, images and captions together (one map for both sides, so captions and images stay
comparable), not centred, so inner products keep their meaning: a principal-component projection
through the origin. It is fitted in one streamed pass over the train split (D x D float64 sums:
128 MiB at 4,096-d), whatever its size, and applied inside the heads (`heads.Projected`), so eval,
search, the index, export and export-model all embed compactly with no change of their own. The
compact run is a new run folder beside the original (which is left as it is), with its own query
bank chosen on valid for the compact embeddings. What it costs in recall on roco-rad is measured
in BENCHMARKS.md (`benchmarks/compact.py`).
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from medembed.adapt import checkpoint as ckpt
from medembed.adapt.run import AdaptedRun, load_adapter_run, portable_features
from medembed.adapt.run_files import COMPACT, FINETUNED, QUERYBANK, SELECTION
from medembed.adapt.run_querybank import calibrate
from medembed.adapt.valid_heads import BEST_HEADS, SELECTION_HEADS, valid_fields, valid_source
from medembed.cache import schema
from medembed.cache.reader import feature_chunks, load_split, read_attrs
from medembed.common.errors import MedembedError
from medembed.common.files import check_out_folder, folder_state, replace_folder, staging_folder
from medembed.common.ranking import recall_summary

__all__ = ["COMPACT_KEY", "CompactError", "CompactOptions", "CompactSummary", "fit_projection", "make_compact"]

COMPACT_KEY = "compact"  # config.json of a compact run: {"dims", "from"}
COMPACT_FORMAT = "medembed-compact/1"


class CompactError(MedembedError, ValueError):
    """A compact run that cannot be made as asked."""


@dataclass(frozen=True)
class CompactOptions:
    """What `cli.py compact` takes unless told."""

    dims: int = 256  # of the default run's 4,096: 0.1 mean recall less on roco-rad (BENCHMARKS.md)


@dataclass
class CompactSummary:
    run_dir: str
    source: str
    dims: int
    source_dims: int
    variance_kept: float  # share of the train embeddings' second moment the kept directions hold
    querybank: dict | None


def _rows(path: Path) -> int:
    """Image and caption rows of a split file: the embedding pass's length, read from its header."""
    return sum(int(read_attrs(path).get(k, 0)) for k in ("n_images", "n_captions"))


@torch.no_grad()
def fit_projection(run: AdaptedRun, dims: int, chunk_rows: int = 65536, bar: tqdm | None = None) -> tuple[torch.Tensor, float]:
    """([D, dims] map with orthonormal columns, largest direction first; the share of the train
    embeddings' second moment it keeps), from one pass over the run's train split in chunks. `bar`
    counts the rows embedded and then names the eigendecomposition (a D x D one: the slow step)."""
    files = run.split_files()
    if "train" not in files:
        raise CompactError(f"{run.features_dir}: no train split to fit the compact map on")
    if bar is not None:
        bar.set_postfix_str("embedding the train split")
    moment = None
    for name, embed in ((schema.IMAGE_FEATURES, run.embed_images), (schema.CAPTION_FEATURES, run.embed_texts)):
        for chunk in feature_chunks(files["train"], name, chunk_rows):
            e = embed(torch.from_numpy(chunk)).double()
            moment = e.T @ e if moment is None else moment + e.T @ e
            if bar is not None:
                bar.update(len(chunk))
    if moment is None:
        raise CompactError(f"{files['train']}: the train split is empty")
    if bar is not None:
        bar.set_postfix_str(f"eigendecomposition of the {moment.shape[0]:,} x {moment.shape[0]:,} second moment")
    values, vectors = torch.linalg.eigh(moment)
    kept = float(values[-dims:].sum() / values.sum())
    return vectors[:, -dims:].flip(1).float().contiguous(), kept


def make_compact(run_dir: str | Path, dims: int, out: str | Path, overwrite: bool = False,
                 progress: bool = True) -> CompactSummary:
    """A compact copy of the adapter run in `run_dir`, written whole into `out` (a new folder, or an
    earlier compact run with `overwrite`). `progress`: a bar on stderr over the train rows embedded,
    then naming each later step (the eigendecomposition, the query bank, valid recall)."""
    run_dir, out = Path(run_dir), Path(out)
    if (run_dir / FINETUNED).exists():
        raise CompactError(f"{run_dir}: carries fine-tuned towers ({FINETUNED}), which a compact run would not keep; "
                           "compact an adapter run (heads on cached features)")
    run = load_adapter_run(run_dir)
    if COMPACT_KEY in run.config:
        raise CompactError(f"{run_dir}: already a compact run ({run.dim} dims); compact its source run "
                           f"{run.config[COMPACT_KEY]['from']} instead")
    if not 1 <= dims < run.dim:
        raise CompactError(f"--dims {dims}: must be between 1 and the run's {run.dim} dimensions")
    if out.resolve() == run_dir.resolve():
        raise CompactError(f"--out {out}: is the source run; a compact run is written beside it")
    check_out_folder(out, overwrite, COMPACT, "compact run")
    checked = folder_state(out)
    train_file = run.split_files().get("train")
    with tqdm(total=_rows(train_file) if train_file else None, desc="compact", unit="row",
              unit_scale=True, disable=not progress, dynamic_ncols=True) as bar:
        projection, kept = fit_projection(run, dims, bar=bar)
        work = staging_folder(out)
        try:
            bank = _write(run, run_dir, work, out, dims, projection, kept, bar)
            replace_folder(work, out, expected=checked)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
    return CompactSummary(str(out), str(run_dir), dims, run.dim, kept, bank)


def _write(run: AdaptedRun, run_dir: Path, work: Path, out: Path, dims: int, projection: torch.Tensor, kept: float,
           bar: tqdm) -> dict | None:
    """The compact run's files in `work`: config, heads (with a refit source's selection heads) and
    projection, then its query bank and valid recall, chosen and measured as the source's were
    (summary.json last); returns the bank's record (None: the source ranks by plain cosine)."""
    config = {**run.config, "features_dir": str(run.features_dir),
              COMPACT_KEY: {"dims": dims, "from": str(run_dir.resolve()), "variance_kept": round(kept, 6)}}
    ckpt.write_json(work / ckpt.CONFIG, portable_features(config, out))
    for name in (ckpt.BEST, ckpt.METRICS, SELECTION):
        if (run_dir / name).exists():
            shutil.copy2(run_dir / name, work / name)
    ckpt.save_verified(work / COMPACT, {"projection": projection}, {"format": COMPACT_FORMAT})
    small = load_adapter_run(work)
    # a refit source's heads trained on valid: valid chooses and measures through its selection heads,
    # projected the same way, as the source's own bank was chosen
    selection = small.selection()
    chooser = selection or small
    files = small.split_files()
    valid = load_split(files["valid"], with_views=False)
    bank = None
    if (run_dir / QUERYBANK).exists():
        # the source's bank setting was chosen for its own embeddings: choose again for these, on valid
        bar.set_postfix_str("choosing the query bank on valid")
        bank = calibrate(work, run=chooser, splits=(files["train"], valid))
    # its own valid recall with plain cosine (what a run's summary keeps as `valid`), not the source's
    bar.set_postfix_str("valid recall")
    with torch.no_grad():
        own = recall_summary(chooser.embed_images(valid.image_features), chooser.embed_texts(valid.caption_features),
                             valid.caption_image)
    # measured through the same kind of heads as the source's valid numbers: held out when the source's are
    # (a refit source's selection heads came along), not when the source's own were not
    source = valid_source(run_dir)
    where = (valid_fields(SELECTION_HEADS) if selection is not None
             else valid_fields(BEST_HEADS, source.held_out, source.why))
    ckpt.write_derived_summary(run_dir, work, ("dim",), {"run_dir": str(out), "dim": dims, "valid": own, **where,
                                                        COMPACT_KEY: config[COMPACT_KEY]}, bank)
    bar.set_postfix_str("done")
    return bank
