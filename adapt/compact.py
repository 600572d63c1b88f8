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

from medembed.adapt import checkpoint as ckpt
from medembed.adapt.run import AdaptedRun, load_adapter_run, portable_features
from medembed.adapt.run_files import COMPACT, FINETUNED, QUERYBANK, SELECTION
from medembed.adapt.run_querybank import calibrate
from medembed.cache import schema
from medembed.cache.reader import feature_chunks, load_split
from medembed.common.errors import MedembedError
from medembed.common.files import check_out_folder, folder_state, replace_folder, staging_folder
from medembed.common.ranking import recall_summary

__all__ = ["COMPACT_KEY", "CompactError", "CompactSummary", "fit_projection", "make_compact"]

COMPACT_KEY = "compact"  # config.json of a compact run: {"dims", "from"}
COMPACT_FORMAT = "medembed-compact/1"


class CompactError(MedembedError, ValueError):
    """A compact run that cannot be made as asked."""


@dataclass
class CompactSummary:
    run_dir: str
    source: str
    dims: int
    source_dims: int
    variance_kept: float  # share of the train embeddings' second moment the kept directions hold
    querybank: dict | None


@torch.no_grad()
def fit_projection(run: AdaptedRun, dims: int, chunk_rows: int = 65536) -> tuple[torch.Tensor, float]:
    """([D, dims] map with orthonormal columns, largest direction first; the share of the train
    embeddings' second moment it keeps), from one pass over the run's train split in chunks."""
    files = run.split_files()
    if "train" not in files:
        raise CompactError(f"{run.features_dir}: no train split to fit the compact map on")
    moment = None
    for name, embed in ((schema.IMAGE_FEATURES, run.embed_images), (schema.CAPTION_FEATURES, run.embed_texts)):
        for chunk in feature_chunks(files["train"], name, chunk_rows):
            e = embed(torch.from_numpy(chunk)).double()
            moment = e.T @ e if moment is None else moment + e.T @ e
    if moment is None:
        raise CompactError(f"{files['train']}: the train split is empty")
    values, vectors = torch.linalg.eigh(moment)
    kept = float(values[-dims:].sum() / values.sum())
    return vectors[:, -dims:].flip(1).float().contiguous(), kept


def make_compact(run_dir: str | Path, dims: int, out: str | Path, overwrite: bool = False) -> CompactSummary:
    """A compact copy of the adapter run in `run_dir`, written whole into `out` (a new folder, or an
    earlier compact run with `overwrite`)."""
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
    projection, kept = fit_projection(run, dims)
    work = staging_folder(out)
    try:
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
        chooser = small.selection() or small
        files = small.split_files()
        valid = load_split(files["valid"], with_views=False)
        # the source's bank setting was chosen for its own embeddings: choose again for these, on valid
        bank = calibrate(work, run=chooser, splits=(files["train"], valid)) if (run_dir / QUERYBANK).exists() else None
        # its own valid recall with plain cosine (what a run's summary keeps as `valid`), not the source's
        with torch.no_grad():
            own = recall_summary(chooser.embed_images(valid.image_features), chooser.embed_texts(valid.caption_features),
                                 valid.caption_image)
        ckpt.write_derived_summary(run_dir, work, ("dim",), {"run_dir": str(out), "dim": dims, "valid": own,
                                                            COMPACT_KEY: config[COMPACT_KEY]}, bank)
        replace_folder(work, out, expected=checked)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return CompactSummary(str(out), str(run_dir), dims, run.dim, kept, bank)
