"""Re-point a run at its features folder after the folder moved.

A run records where its cache was (absolute, and relative to the run folder), so a run moved
together with its features still finds them. When only the features moved, `cli.py relink` points
the run at the new folder, after checking by provenance (backbone, weights, preprocessing, layers,
dataset and its fingerprint, as `config.json` recorded them) that it holds the very features the
run was trained on, and by reading every file through its checksums and NaN/Inf checks that they
are intact: a path alone proves nothing, and a damaged copy accepted here would surface later as
something else (a stale index).
"""
from __future__ import annotations

from pathlib import Path

from medembed.adapt import checkpoint as ckpt
from medembed.adapt.run import QUERYBANK, portable_features
from medembed.cache.provenance import feature_differences
from medembed.cache.reader import feature_widths, find_splits, read_attrs, verify_cache
from medembed.common.errors import BadRun, Incompatible, NotFound
from medembed.common.files import read_json, write_json
from medembed.common.locks import exclusive


def relink(run_dir: str | Path, features_dir: str | Path) -> dict:
    """Point the run in `run_dir` at `features_dir` once its caches match the run's recorded
    provenance; rewrites config.json (and the query bank's reference to the training cache).
    Returns {"run_dir", "old", "new", "splits"}."""
    run_dir, new = Path(run_dir), Path(features_dir).resolve()
    config_path = run_dir / ckpt.CONFIG
    if not config_path.exists():
        raise NotFound(f"{config_path}: no config.json, not an adapter run folder")
    files = find_splits(new)
    with exclusive(run_dir, "command", "wait for it to finish"):
        config = read_json(config_path)
        recorded = config.get("cache") or {}
        if not recorded:
            raise BadRun(f"{config_path}: records no provenance of its cache, so a new folder cannot be checked")
        for path in files.values():
            widths = feature_widths(path)
            if widths != (config.get("image_dim"), config.get("text_dim")):
                raise Incompatible(f"{path}: not the features this run was trained on (feature widths {widths[0]} / "
                                   f"{widths[1]}, the run takes {config.get('image_dim')} / {config.get('text_dim')})")
            diffs = feature_differences(read_attrs(path), recorded)
            if diffs:
                raise Incompatible(f"{path}: not the features this run was trained on ({diffs[0]})")
            verify_cache(path)  # the right features, but intact? (checksums, NaN/Inf): a CacheError naming the dataset
        old = config["features_dir"]
        write_json(config_path, portable_features({**config, "features_dir": str(new)}, run_dir))
        bank_path = run_dir / QUERYBANK
        if bank_path.exists():
            record = read_json(bank_path)
            if record.get("setting", {}).get("bank_features") == old:
                record["setting"]["bank_features"] = str(new)
                write_json(bank_path, record)
    return {"run_dir": str(run_dir), "old": old, "new": str(new), "splits": list(files)}
