"""`cli.py runs`: every run under a folder at a glance, without re-running anything.

A run is any folder with a config.json written by `cli.py adapt`. Its row takes the backbone,
dataset and head from config.json, the best valid recall from summary.json, and the latest test
evaluation of it from any `metrics-RUN.json` under the folder (a run may have been evaluated alone
or inside a comparison). Sweep folders add their leaderboards.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from medembed.evaluate.report import with_interval

SORT_KEYS = ("created", "name", "valid", "test_t2i", "test_i2t")


@dataclass
class RunRow:
    name: str
    path: Path
    backbone: str
    dataset: str
    model: str
    valid: float | None  # best valid mean recall
    valid_r10: tuple[float | None, float | None]
    test: dict | None  # the latest test evaluation's metrics
    created: str


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _evaluations(folder: Path) -> dict[str, dict]:
    """The newest test evaluation of every run evaluated anywhere under `folder`, by run path."""
    latest: dict[str, dict] = {}
    for path in folder.rglob("metrics-*.json"):
        record = _read(path)
        if record.get("split") != "test" or "run_ref" not in record:
            continue
        key = str(Path(record["run_ref"]).resolve())
        if key not in latest or record.get("created", "") > latest[key].get("created", ""):
            latest[key] = {**record, "file": str(path)}
    return latest


def find_runs(folder: str | Path) -> list[RunRow]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder")
    evaluations = _evaluations(folder)
    rows = []
    for config_path in sorted(folder.rglob("config.json")):
        config = _read(config_path)
        if "head" not in config or "dim" not in config:
            continue  # not written by `cli.py adapt`
        run_dir = config_path.parent
        summary = _read(run_dir / "summary.json")
        valid = summary.get("valid", {})
        model = f"{config['head']}" + (f", {config['loss']}" if config.get("loss") else "") + \
            (f", tuned {config['tune']['unlock']}" if config.get("tune") else "")
        created = datetime.fromtimestamp(config_path.stat().st_mtime, UTC).isoformat(timespec="seconds")
        evaluation = evaluations.get(str(run_dir.resolve())) or evaluations.get(str((run_dir / "finetuned.safetensors").resolve()))
        rows.append(RunRow(str(run_dir.relative_to(folder)) or run_dir.name, run_dir, config.get("backbone", ""),
                           config.get("cache", {}).get("dataset", ""), model, valid.get("mean_recall"),
                           (valid.get("t2i_R@10"), valid.get("i2t_R@10")),
                           evaluation["metrics"] if evaluation else None, created))
    return rows


def sort_runs(rows: list[RunRow], key: str) -> list[RunRow]:
    if key not in SORT_KEYS:
        raise ValueError(f"--sort must be one of {', '.join(SORT_KEYS)}, got {key!r}")

    def value(r: RunRow):
        if key == "name":
            return r.name
        if key == "created":
            return r.created
        if key == "valid":
            return -(r.valid or -1.0)
        metric = "t2i_R@10" if key == "test_t2i" else "i2t_R@10"
        return -((r.test or {}).get(metric) or -1.0)

    return sorted(rows, key=value, reverse=key == "created")


def format_runs(rows: list[RunRow]) -> str:
    head = ["run", "backbone", "dataset", "model", "valid mean recall", "valid R@10 t2i / i2t", "test t2i R@10",
            "test i2t R@10", "made"]
    table = []
    for r in rows:
        v10 = "/".join("–" if x is None else f"{x:.1f}" for x in r.valid_r10)
        test = r.test or {}
        table.append([r.name, r.backbone, r.dataset, r.model, "–" if r.valid is None else f"{r.valid:.1f}", v10,
                      with_interval("t2i_R@10", test) if test else "not evaluated",
                      with_interval("i2t_R@10", test) if test else "", r.created.replace("T", " ")[:16]])
    widths = [max(len(h), *(len(row[i]) for row in table)) for i, h in enumerate(head)] if table else [len(h) for h in head]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), *(line(row) for row in table)])


def sweep_boards(folder: str | Path) -> list[tuple[Path, str]]:
    """(sweep folder, its leaderboard in Markdown) of every sweep under `folder`."""
    return [(p.parent, (p.parent / "leaderboard.md").read_text()) for p in sorted(Path(folder).rglob("leaderboard.json"))
            if (p.parent / "leaderboard.md").exists()]
