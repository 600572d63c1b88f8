"""`cli.py sweep`: a grid of adapter settings over one cache, several seeds per cell, and a leaderboard.

What the cached-feature design is for: many heads trained on the same features in minutes on a
CPU. Every (cell, seed) is an ordinary run folder (`OUT/CELL/seed-S`), so `eval`, `search` and
`runs` take any of them; a cell already finished with the same settings is reused, not retrained,
so an interrupted sweep continues where it stopped. Cells are ranked by their mean valid recall
(what selection may look at); test Recall@10 is reported beside it, never used to rank.
"""
from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from medembed.adapt.config import AdaptConfig
from medembed.adapt.run import load_run
from medembed.adapt.trainer import train
from medembed.cache.reader import find_splits, load_split
from medembed.common.files import slug, write_json
from medembed.evaluate import retrieval
from medembed.evaluate.models import model_from_run

LEADERBOARD = "leaderboard.json"
SWEEP_FIELDS = {f.name: f for f in fields(AdaptConfig)}
NOT_SWEPT = {"features_dir", "out", "seed", "device", "threads"}


def _cast(name: str, text: str):
    field = SWEEP_FIELDS[name]
    kind = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", "str")
    if "int" in kind and "float" not in kind:
        return int(text)
    if "float" in kind:
        return float(text)
    if "bool" in kind:
        return text.lower() in ("1", "true", "yes")
    return text


def parse_grid(sets: list[str], grid_file: str | Path | None = None) -> dict[str, list]:
    """`--set key=v1,v2` options and/or a JSON or YAML file {"key": [v1, v2], ...} -> the grid."""
    grid: dict[str, list] = {}
    if grid_file is not None:
        import yaml

        text = Path(grid_file).read_text()
        loaded = yaml.safe_load(text)
        if not isinstance(loaded, dict) or not all(isinstance(v, list) for v in loaded.values()):
            raise ValueError(f"{grid_file}: expected a mapping of setting -> list of values")
        grid.update({k: list(v) for k, v in loaded.items()})
    for item in sets:
        key, sep, values = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not values.strip():
            raise ValueError(f"--set {item!r}: expected KEY=V1,V2,...")
        grid[key] = [_cast(key, v.strip()) if key in SWEEP_FIELDS else v for v in values.split(",") if v.strip()]
    unknown = [k for k in grid if k not in SWEEP_FIELDS or k in NOT_SWEPT]
    if unknown:
        raise ValueError(f"--set: {', '.join(unknown)} cannot be swept (settings: "
                         f"{', '.join(sorted(set(SWEEP_FIELDS) - NOT_SWEPT))})")
    if not grid:
        raise ValueError("sweep needs at least one --set KEY=V1,V2 (or --grid FILE)")
    return grid


def cells(grid: dict[str, list]) -> list[dict]:
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def cell_name(cell: dict) -> str:
    return slug("-".join(f"{k}={v}" for k, v in cell.items()).replace("=", "_"))


@dataclass
class CellResult:
    cell: dict
    runs: list[str]
    valid: dict[str, list[float]]  # metric -> one value per seed
    test: dict[str, list[float]]
    seconds: list[float]

    def row(self) -> dict:
        def stat(values):
            return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0}

        return {"cell": self.cell, "runs": self.runs, "seeds": len(self.runs),
                "valid": {k: stat(v) for k, v in self.valid.items()},
                "test": {k: stat(v) for k, v in self.test.items()}, "seconds": stat(self.seconds)}


def _test_recall(run_dir: Path) -> dict[str, float]:
    """Test Recall@1/5/10 of a run on its cache's test split (retrieval only: seconds), ranked as
    `eval` ranks it (with the run's query bank when it has one)."""
    run = load_run(run_dir)
    files = find_splits(run.features_dir)
    if "test" not in files:
        return {}
    test = load_split(files["test"], with_views=False)
    model = model_from_run(run)
    img, txt = model.images(test.image_features), model.texts(test.caption_features)
    image_offset, caption_offset = model.offsets(img, txt)
    return retrieval.summarize(retrieval.ranks(img, txt, test.caption_image, image_offset=image_offset,
                                               caption_offset=caption_offset), (1, 5, 10))


def _one(config: AdaptConfig) -> tuple[dict, float]:
    """The run's summary: trained now, or read back when the folder holds a finished run of the same settings."""
    out = Path(config.out)
    if (out / "summary.json").exists():
        saved = AdaptConfig.from_run(out).to_dict()
        now = config.to_dict()
        changed = [k for k in now if k not in ("features_dir",) and saved.get(k) != now[k]]
        if changed:
            raise FileExistsError(f"{out}: holds a run with other settings ({', '.join(changed)}); choose another --out")
        summary = json.loads((out / "summary.json").read_text())
        return summary, float(summary.get("seconds", 0.0))
    t0 = time.perf_counter()
    summary = train(config, progress=False)
    return summary, time.perf_counter() - t0


def run_sweep(features_dir: str | Path, grid: dict[str, list], seeds: int, out: str | Path, fixed: dict | None = None,
              log: Callable[[str], None] = print) -> list[dict]:
    """Train every cell x seed, write `OUT/leaderboard.json` and `.md`; returns the leaderboard rows."""
    out = Path(out)
    todo = cells(grid)
    results = []
    for i, cell in enumerate(todo, 1):
        res = CellResult(cell, [], {}, {}, [])
        for seed in range(seeds):
            config = AdaptConfig(features_dir=str(Path(features_dir).resolve()), out=str(out / cell_name(cell) / f"seed-{seed}"),
                                 seed=seed, **{**(fixed or {}), **cell})
            summary, seconds = _one(config)
            res.runs.append(config.out)
            res.seconds.append(seconds)
            for k, v in summary["valid"].items():
                res.valid.setdefault(k, []).append(v)
            for k, v in _test_recall(Path(config.out)).items():
                if k.startswith(("t2i_R@", "i2t_R@")) and "_ci_" not in k:
                    res.test.setdefault(k, []).append(v)
        results.append(res.row())
        log(f"cell {i}/{len(todo)} {cell_name(cell)}: valid mean recall "
            f"{results[-1]['valid']['mean_recall']['mean']:.1f} +- {results[-1]['valid']['mean_recall']['std']:.1f} "
            f"over {seeds} seed(s), {sum(res.seconds):.0f} s")
    board = sorted(results, key=lambda r: -r["valid"]["mean_recall"]["mean"])
    write_json(out / LEADERBOARD, {"features_dir": str(features_dir), "grid": grid, "seeds": seeds, "fixed": fixed or {},
                                   "rows": board})
    (out / "leaderboard.md").write_text(format_leaderboard(board, seeds) + "\n")
    return board


def _pm(stat: dict | None) -> str:
    if not stat or stat["mean"] is None or (isinstance(stat["mean"], float) and math.isnan(stat["mean"])):
        return "–"
    return f"{stat['mean']:.1f} ± {stat['std']:.1f}"


def format_leaderboard(rows: list[dict], seeds: int) -> str:
    """Markdown: one row per cell, best valid mean recall first; mean ± std over the seeds."""
    keys = list(rows[0]["cell"]) if rows else []
    head = ["#", *keys, "valid mean recall", "valid t2i R@10", "valid i2t R@10", "test t2i R@10", "test i2t R@10", "s/run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, r in enumerate(rows, 1):
        v, t = r["valid"], r["test"]
        cells_ = [str(i), *(str(r["cell"][k]) for k in keys), _pm(v.get("mean_recall")), _pm(v.get("t2i_R@10")),
                  _pm(v.get("i2t_R@10")), _pm(t.get("t2i_R@10")), _pm(t.get("i2t_R@10")), f"{r['seconds']['mean']:.0f}"]
        lines.append("| " + " | ".join(cells_) + " |")
    return "\n".join(lines) + f"\n\nmean ± std over {seeds} seed(s); ranked by valid mean recall (test is never used to rank)"
