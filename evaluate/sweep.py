"""`cli.py sweep`: a grid of adapter settings over one cache, several seeds per cell, and a leaderboard.

What the cached-feature design is for: many heads trained on the same features in minutes on a
CPU. Every (cell, seed) is an ordinary run folder (`OUT/CELL/seed-S`), so `eval`, `search` and
`runs` take any of them; a cell already finished with the same settings is reused, not retrained,
so an interrupted sweep continues where it stopped. Cells are ranked by their mean valid recall
(what selection may look at) as eval ranks each run: with the query bank it chose on valid, or by
plain cosine for runs without one (`querybank=false`); the plain-cosine valid recall is shown beside
it. Test Recall@10 (ranked the same way) is reported, never used to rank. Each row says which heads
its valid numbers come from (`adapt.valid_heads`: "best", or "selection" for refit runs); a cell
whose valid numbers are not held out (heads that trained on valid) is shown in parentheses and
placed after every cell whose numbers are, unranked.
"""
from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from medembed.adapt import run_files
from medembed.adapt.config import AdaptConfig
from medembed.adapt.run import load_adapter_run
from medembed.adapt.trainer import train
from medembed.cache.reader import load_split
from medembed.common.errors import AlreadyExists, BadInput, BadOption, MedembedError
from medembed.common.files import read_json, slug, write_json
from medembed.common.locks import exclusive
from medembed.common.querybank import BANK_SCORE, COSINE
from medembed.common.ranking import ranks, summarize
from medembed.common.recall_keys import DEFAULT_KS, DIRECTIONS, MEAN_RECALL, recall_key, recall_prefix
from medembed.evaluate.listing import NOT_HELD_OUT, RANKED_AS_EVAL, valid_recall
from medembed.model.embedding import model_from_run

LEADERBOARD = "leaderboard.json"
SWEEP_FIELDS = {f.name: f for f in fields(AdaptConfig)}
NOT_SWEPT = {"features_dir", "out", "seed", "device", "threads"}
# a sweep's runs, unless --set or --fixed says otherwise: a sweep compares settings by valid recall, which a
# refit (heads trained again on train + valid) leaves as it was at twice the time; refit the chosen setting
# with `cli.py adapt`
SWEEP_DEFAULTS = {"refit": False}


@dataclass(frozen=True)
class SweepOptions:
    """What `cli.py sweep` takes unless told."""

    seeds: int = 3  # runs per cell (seeds 0..N-1): enough for a spread beside each mean


TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _kind(name: str) -> str:
    """The type a setting takes: "int", "float", "bool" or "str" (AdaptConfig's annotation)."""
    spec = SWEEP_FIELDS[name]
    kind = spec.type if isinstance(spec.type, str) else getattr(spec.type, "__name__", "str")
    for simple in ("bool", "float", "int"):
        if simple in kind:
            return simple
    return "str"


def _cast(where: str, name: str, value):
    """One value of setting `name` (text from the command line, or as a YAML/JSON file holds it) as
    AdaptConfig takes it; a one-line error naming `where` (e.g. "--set lr") and the value otherwise."""
    kind = _kind(name)
    if kind == "str":
        return value if value is None or isinstance(value, str) else str(value)
    if isinstance(value, str):
        parsed = _parse(kind, value.strip().lower())
        if parsed is not None:
            return parsed
    elif kind == "bool" and isinstance(value, bool):
        return value
    elif kind == "float" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    elif kind == "int" and isinstance(value, int) and not isinstance(value, bool):
        return value
    wanted = {"int": "a whole number", "float": "a number", "bool": f"one of {', '.join(TRUE + FALSE)}"}[kind]
    raise BadOption(f"{where}: {value!r} is not {wanted} ({name} takes {kind} values)")


def _parse(kind: str, text: str) -> int | float | bool | None:
    """Text as an int, float or bool setting; None when it is not one."""
    if kind == "bool":
        return (text in TRUE) if text in TRUE + FALSE else None
    try:
        return int(text) if kind == "int" else float(text)
    except ValueError:
        return None


def _check_keys(grid: dict, option: str) -> None:
    unknown = [k for k in grid if k not in SWEEP_FIELDS or k in NOT_SWEPT]
    if unknown:
        raise BadOption(f"{option}: {', '.join(unknown)} cannot be swept (settings: "
                        f"{', '.join(sorted(set(SWEEP_FIELDS) - NOT_SWEPT))})")


def _load_grid(grid_file: Path) -> object:
    """A .json grid needs nothing more; YAML needs PyYAML (the `yaml` extra), named when missing."""
    text = grid_file.read_text()
    if grid_file.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise BadInput(f"--grid {grid_file}: not JSON ({e})") from None
    try:
        import yaml
    except ImportError:
        raise BadInput(f"--grid {grid_file}: YAML grids need PyYAML (pip install 'medembed[yaml]'), or write "
                       "the grid as a .json file") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise BadInput(f"--grid {grid_file}: not YAML or JSON ({' '.join(str(e).split())})") from None


def _grid_file(grid_file: str | Path) -> dict[str, list]:
    loaded = _load_grid(Path(grid_file))
    if not isinstance(loaded, dict) or not all(isinstance(v, list) for v in loaded.values()):
        raise BadInput(f"--grid {grid_file}: expected a mapping of setting -> list of values")
    grid = {str(k).replace("-", "_"): list(v) for k, v in loaded.items()}
    _check_keys(grid, f"--grid {grid_file}")
    return {k: [_cast(f"--grid {grid_file}: {k}", k, v) for v in values] for k, values in grid.items()}


def _assignments(items: list[str], option: str) -> dict[str, list]:
    """`KEY=V1,V2` options -> {key: [values]}, each value cast as the setting takes it."""
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not values.strip():
            raise BadOption(f"{option} {item!r}: expected KEY=V1,V2,...")
        grid[key] = [v.strip() for v in values.split(",") if v.strip()]
    _check_keys(grid, option)
    return {k: [_cast(f"{option} {k}", k, v) for v in values] for k, values in grid.items()}


def parse_grid(sets: list[str], grid_file: str | Path | None = None) -> dict[str, list]:
    """`--set key=v1,v2` options and/or a JSON or YAML file {"key": [v1, v2], ...} -> the grid.
    A value of the wrong type is refused in one line naming the option, the setting and the value."""
    grid = _grid_file(grid_file) if grid_file is not None else {}
    grid.update(_assignments(sets, "--set"))
    if not grid:
        raise BadOption("sweep needs at least one --set KEY=V1,V2 (or --grid FILE)")
    return grid


def parse_fixed(items: list[str]) -> dict:
    """`--fixed key=v` options -> {key: value}; one value each (a list belongs in --set)."""
    fixed = {}
    for key, values in _assignments(items, "--fixed").items():
        if len(values) != 1:
            raise BadOption(f"--fixed {key}: one value, got {len(values)}; sweep several with --set {key}=...")
        fixed[key] = values[0]
    return fixed


def cells(grid: dict[str, list]) -> list[dict]:
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def cell_name(cell: dict) -> str:
    return slug("-".join(f"{k}={v}" for k, v in cell.items()).replace("=", "_"))


@dataclass
class CellResult:
    cell: dict
    runs: list[str]
    valid: dict[str, list[float]]  # metric -> one value per seed, ranked as eval ranks each run
    test: dict[str, list[float]]
    seconds: list[float]
    valid_plain: dict[str, list[float]] = field(default_factory=dict)  # the same with plain cosine
    rankings: list[str] = field(default_factory=list)  # per seed: how its "valid" was ranked
    heads: list[str] = field(default_factory=list)  # per seed: which heads its "valid" comes from
    held_out: list[bool] = field(default_factory=list)  # per seed: whether those heads never trained on valid

    def add(self, run_dir: Path, seconds: float) -> None:
        """One finished seed: its valid recall as ranked and with plain cosine, its test recall."""
        self.runs.append(str(run_dir))
        self.seconds.append(seconds)
        recall = valid_recall(run_dir)
        self.rankings.append(recall.ranking)
        self.heads.append(recall.source.heads)
        self.held_out.append(recall.source.held_out)
        for into, values in ((self.valid, recall.ranked), (self.valid_plain, recall.plain)):
            for k, v in values.items():
                into.setdefault(k, []).append(v)
        for k, v in _test_recall(run_dir).items():
            if k.startswith(tuple(recall_prefix(d) for d in DIRECTIONS)) and "_ci_" not in k:
                self.test.setdefault(k, []).append(v)

    def ranking(self) -> str:
        """How the cell's seeds rank: a seed whose bank chose beta 0 on valid ranks by plain cosine."""
        banked = self.rankings.count(BANK_SCORE)
        if banked in (0, len(self.rankings)):
            return BANK_SCORE if banked else COSINE
        return f"{BANK_SCORE} ({banked}/{len(self.rankings)} seeds, else {COSINE})"

    def row(self) -> dict:
        def stat(values):
            return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0}

        return {"cell": self.cell, "runs": self.runs, "seeds": len(self.runs),
                "ranking": self.ranking(), "valid_heads": ", ".join(sorted(set(self.heads))),
                "valid_held_out": all(self.held_out),
                "valid": {k: stat(v) for k, v in self.valid.items()},
                "valid_plain": {k: stat(v) for k, v in self.valid_plain.items()},
                "test": {k: stat(v) for k, v in self.test.items()}, "seconds": stat(self.seconds)}


def _test_recall(run_dir: Path) -> dict[str, float]:
    """Test Recall@1/5/10 of a run on its cache's test split (retrieval only: seconds), ranked as
    `eval` ranks it (with the run's query bank when it has one)."""
    run = load_adapter_run(run_dir)
    files = run.split_files()
    if "test" not in files:
        return {}
    test = load_split(files["test"], with_views=False)
    model = model_from_run(run)
    img, txt = model.images(test.image_features), model.texts(test.caption_features)
    image_offset, caption_offset = model.offsets(img, txt)
    return summarize(ranks(img, txt, test.caption_image, image_offset=image_offset, caption_offset=caption_offset),
                     DEFAULT_KS)


def _one(config: AdaptConfig) -> tuple[dict, float]:
    """The run's summary: trained now, or read back when the folder holds a finished run of the same settings."""
    out = Path(config.out)
    if (out / run_files.SUMMARY).exists():
        saved = AdaptConfig.from_run(out).to_dict()
        now = config.to_dict()
        changed = [k for k in now if k not in ("features_dir",) and saved.get(k) != now[k]]
        if changed:
            raise AlreadyExists(f"{out}: holds a run with other settings ({', '.join(changed)}); choose another --out")
        summary = read_json(out / run_files.SUMMARY)
        return summary, float(summary.get("seconds", 0.0))
    t0 = time.perf_counter()
    summary = train(config, progress=False)
    return summary, time.perf_counter() - t0


def _configs(features_dir: str | Path, out: Path, cell: dict, seeds: int, fixed: dict | None) -> list[AdaptConfig]:
    """The cell's run settings, one per seed; a value AdaptConfig refuses is named with its cell."""
    try:
        return [AdaptConfig(features_dir=str(Path(features_dir).resolve()), out=str(out / cell_name(cell) / f"seed-{seed}"),
                            seed=seed, **{**SWEEP_DEFAULTS, **(fixed or {}), **cell}) for seed in range(seeds)]
    except MedembedError as e:
        raise BadOption(f"cell {cell_name(cell)}: {e}") from None


def run_sweep(features_dir: str | Path, grid: dict[str, list], seeds: int, out: str | Path, fixed: dict | None = None,
              log: Callable[[str], None] = print) -> list[dict]:
    """Train every cell x seed, write `OUT/leaderboard.json` and `.md`; returns the leaderboard rows."""
    out = Path(out)
    todo = cells(grid)
    configs = [_configs(features_dir, out, cell, seeds, fixed) for cell in todo]  # every cell checked before any trains
    with exclusive(out, "sweep", "wait for it to finish or choose another --out"):
        return _sweep(todo, configs, features_dir, grid, seeds, out, fixed, log)


def _sweep(todo: list[dict], configs: list, features_dir, grid: dict, seeds: int, out: Path, fixed: dict | None,
           log: Callable[[str], None]) -> list[dict]:
    results = []
    for i, (cell, cell_configs) in enumerate(zip(todo, configs), 1):
        res = CellResult(cell, [], {}, {}, [])
        for config in cell_configs:
            _, seconds = _one(config)
            res.add(Path(config.out), seconds)
        results.append(res.row())
        held = "" if results[-1]["valid_held_out"] else " (not held out: heads that trained on valid)"
        log(f"cell {i}/{len(todo)} {cell_name(cell)}: valid mean recall "
            f"{results[-1]['valid'][MEAN_RECALL]['mean']:.1f} +- {results[-1]['valid'][MEAN_RECALL]['std']:.1f}{held} "
            f"over {seeds} seed(s), ranked by {results[-1]['ranking']}, {sum(res.seconds):.0f} s")
    board = sorted(results, key=_rank_key)
    write_json(out / LEADERBOARD, {"features_dir": str(features_dir), "grid": grid, "seeds": seeds, "fixed": fixed or {},
                                   "rows": board})
    (out / "leaderboard.md").write_text(format_leaderboard(board, seeds) + "\n")
    return board


def _rank_key(row: dict) -> tuple:
    """Best valid mean recall first among the cells whose valid numbers are held out; the others after
    them all, unranked (in grid order)."""
    if row.get("valid_held_out", True):
        return (0, -row["valid"][MEAN_RECALL]["mean"])
    return (1, 0.0)


def _pm(stat: dict | None, held_out: bool = True) -> str:
    if not stat or stat["mean"] is None or (isinstance(stat["mean"], float) and math.isnan(stat["mean"])):
        return "–"
    text = f"{stat['mean']:.1f} ± {stat['std']:.1f}"
    return text if held_out else f"({text})"


def format_leaderboard(rows: list[dict], seeds: int) -> str:
    """Markdown: one row per cell, best valid mean recall (as eval ranks the runs) first, the plain-cosine
    valid recall beside it; mean ± std over the seeds. The header says what each column is ranked by."""
    keys = list(rows[0]["cell"]) if rows else []
    head = ["#", *keys, "ranked by", "valid mean recall (ranked)", "valid mean recall (cosine)", "valid t2i R@10 (ranked)",
            "valid i2t R@10 (ranked)", "test t2i R@10 (ranked)", "test i2t R@10 (ranked)", "s/run", "valid heads"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rank = 0
    for r in rows:
        held = r.get("valid_held_out", True)
        rank += 1 if held else 0
        v, plain, t = r["valid"], r.get("valid_plain", {}), r["test"]
        cells_ = [str(rank) if held else "–", *(str(r["cell"][k]) for k in keys), r.get("ranking", "?"),
                  _pm(v.get(MEAN_RECALL), held), _pm(plain.get(MEAN_RECALL), held),
                  _pm(v.get(recall_key("t2i", 10)), held), _pm(v.get(recall_key("i2t", 10)), held),
                  _pm(t.get(recall_key("t2i", 10))), _pm(t.get(recall_key("i2t", 10))),
                  f"{r['seconds']['mean']:.0f}", r.get("valid_heads", "?") + ("" if held else ", not held out")]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells_) + " |")
    return "\n".join(lines) + (f"\n\nmean ± std over {seeds} seed(s); ranked by valid mean recall (ranked) "
                               f"(test is never used to rank). (ranked): {RANKED_AS_EVAL} (querybank.json); "
                               "(cosine): plain cosine; valid heads: the heads the valid columns come from (selection: "
                               "a refit run's heads as valid chose them, before training on valid)"
                               + (f"; {NOT_HELD_OUT}" if any(not r.get("valid_held_out", True) for r in rows) else ""))
