"""`cli.py runs`: every run under a folder at a glance, without re-running anything.

A run is any folder with a config.json written by `cli.py adapt`. Its row takes the backbone,
dataset and head from config.json, the best valid recall from summary.json and querybank.json, when
it was made from summary.json, its size from its files, and the latest test evaluation of it from
any `metrics-RUN.json` under the folder (a run may have been evaluated alone or inside a
comparison). Sweep folders add their leaderboards.

Valid recall is shown, and `--sort valid` ranks, the way eval ranks the run: with the query bank it
chose on valid (cosine − β·hubness, querybank.json) when it has one, by plain cosine when it has
none (`--no-querybank`). summary.json's own "valid" is the plain-cosine recall of the best epoch
(what early stopping saw), so ranking by it could order runs differently from every evaluation of
them; it is shown beside the ranked one.

Every valid number says which heads produced it ("valid heads": "best", or a refit run's
"selection", `adapt.valid_heads`). A run whose valid numbers come from heads that trained on valid
(a run distilled or compacted from a refit run's heads before its selection heads came along) is
shown with them in parentheses, marked "not held out", and never ranked: `--sort valid` puts it
after every run whose valid numbers are held out.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from medembed.adapt import run_files
from medembed.adapt.run import QUERYBANK, read_querybank
from medembed.adapt.valid_heads import ValidSource, valid_source
from medembed.cache import schema
from medembed.common.errors import BadOption, NotFound
from medembed.common.querybank import BANK_SCORE, COSINE
from medembed.common.recall_keys import MEAN_RECALL, recall_key
from medembed.common.text import one_line
from medembed.evaluate.report import with_interval

SORT_KEYS = ("created", "name", "valid", "test_t2i", "test_i2t")
RANKED_AS_EVAL = f"as eval ranks: {BANK_SCORE} with the run's query bank, else {COSINE}"
NOT_HELD_OUT = ("(x): valid numbers of heads that trained on valid (not held out), never ranked: sorted after "
                "every held-out one")


@dataclass(frozen=True)
class ListingOptions:
    """What `cli.py runs` lists unless told: the runs folder the examples use, newest run first."""

    folder: str = "runs"
    sort: str = "created"  # one of SORT_KEYS


@dataclass
class ValidRecall:
    """A run's best valid recall ranked as eval ranks it, and with plain cosine (equal without a bank)."""

    ranked: dict  # {"mean_recall", "t2i_R@10", ...}; empty when the run recorded none
    plain: dict
    ranking: str  # BANK_SCORE or COSINE: how `ranked` was ranked
    source: ValidSource = ValidSource("best", True)  # the heads both come from; never ranked when not held out


def valid_recall(run_dir: str | Path) -> ValidRecall:
    """What the run recorded: summary.json's valid (plain cosine) and, when the run ranks with a query
    bank, querybank.json's valid recall with it (chosen and measured with the same heads). A bank whose
    setting is off (beta 0 chosen on valid) ranks by plain cosine, and so does a run whose
    querybank.json was removed, as in eval."""
    run_dir = Path(run_dir)
    summary = _read(run_dir / run_files.SUMMARY)
    plain, source = summary.get("valid", {}), valid_source(run_dir, summary)
    record = _read(run_dir / QUERYBANK)
    if not record:
        return ValidRecall(plain, plain, COSINE, source)
    try:
        setting = read_querybank(run_dir)
    except ValueError:
        setting = None
    active = setting is not None and setting.active
    return ValidRecall(record.get("valid") or plain, record.get("valid_plain") or plain, BANK_SCORE if active else COSINE,
                       source)


def disk_bytes(folder: Path) -> int:
    """Bytes of every file under `folder` (links not followed: what deleting the folder frees)."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            path = Path(root) / name
            try:
                if not path.is_symlink():
                    total += path.stat().st_size
            except FileNotFoundError:
                pass  # a temporary file a running command just renamed or removed
    return total


def human_size(n: int) -> str:
    """Bytes for people, in powers of 1000: "812 B", "2.5 MB", "277 MB"."""
    if n < 1000:
        return f"{n} B"
    size = float(n)
    for unit in ("kB", "MB", "GB", "TB"):
        size /= 1000
        if size < 999.5 or unit == "TB":
            break
    return f"{size:.1f} {unit}" if size < 9.95 else f"{size:.0f} {unit}"


def created_at(run_dir: Path, summary: dict, config: dict) -> str:
    """When the run was made, as it records it (summary.json's "created", written as training finishes);
    for a run without one (unfinished, or older), when its config.json was last written."""
    recorded = summary.get("created") or config.get("created")
    if recorded:
        return str(recorded)
    mtime = (run_dir / run_files.CONFIG).stat().st_mtime
    return datetime.fromtimestamp(mtime, UTC).isoformat(timespec="seconds")


@dataclass
class RunRow:
    name: str
    path: Path
    backbone: str
    dataset: str
    model: str
    valid: float | None  # best valid mean recall, ranked as eval ranks the run (`ranking`)
    valid_r10: tuple[float | None, float | None]  # valid t2i / i2t R@10, ranked the same way
    test: dict | None  # the latest test evaluation's metrics
    created: str
    valid_plain: float | None = None  # the same mean recall with plain cosine
    ranking: str = COSINE  # BANK_SCORE or COSINE
    size_bytes: int = 0  # the run folder's files on disk
    valid_source: ValidSource = ValidSource("best", True)  # which heads the valid numbers come from


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _evaluations(folder: Path) -> dict[str, dict]:
    """The newest test evaluation of every run evaluated anywhere under `folder`, by run path."""
    latest: dict[str, dict] = {}
    for path in folder.rglob("metrics-*.json"):
        if any(part.startswith(".") for part in path.relative_to(folder).parts):
            continue  # staging folders and outputs a command kept aside: never swapped in
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
        raise NotFound(f"{folder}: no such folder")
    evaluations = _evaluations(folder)
    rows = []
    for config_path in sorted(folder.rglob(run_files.CONFIG)):
        config = _read(config_path)
        if "head" not in config or "dim" not in config:
            continue  # not written by `cli.py adapt`
        run_dir = config_path.parent
        summary = _read(run_dir / run_files.SUMMARY)
        valid = valid_recall(run_dir)
        model = f"{config['head']}" + (f", {config['loss']}" if config.get("loss") else "") + \
            (f", tuned {config['tune']['unlock']}" if config.get("tune") else "")
        evaluation = evaluations.get(str(run_dir.resolve())) or evaluations.get(str((run_dir / "finetuned.safetensors").resolve()))
        rows.append(RunRow(str(run_dir.relative_to(folder)) or run_dir.name, run_dir, config.get("backbone", ""),
                           config.get("cache", {}).get(schema.DATASET, ""), model, valid.ranked.get(MEAN_RECALL),
                           (valid.ranked.get(recall_key("t2i", 10)), valid.ranked.get(recall_key("i2t", 10))),
                           evaluation["metrics"] if evaluation else None, created_at(run_dir, summary, config),
                           valid.plain.get(MEAN_RECALL), valid.ranking, disk_bytes(run_dir), valid.source))
    return rows


def sort_runs(rows: list[RunRow], key: str) -> list[RunRow]:
    """Rows in `key`'s order; by valid, the runs whose valid numbers are not held out come after every
    run whose numbers are, whatever those numbers (they are not ranked among themselves either)."""
    if key not in SORT_KEYS:
        raise BadOption(f"--sort must be one of {', '.join(SORT_KEYS)}, got {key!r}")

    def value(r: RunRow):
        if key == "name":
            return r.name
        if key == "created":
            return r.created
        if key == "valid":
            return (0, -(r.valid or -1.0), "") if r.valid_source.held_out else (1, 0.0, r.name)
        metric = recall_key("t2i" if key == "test_t2i" else "i2t", 10)
        return -((r.test or {}).get(metric) or -1.0)

    return sorted(rows, key=value, reverse=key == "created")


def _pct(x: float | None, held_out: bool = True) -> str:
    """A percentage cell; in parentheses when it is not held out (valid numbers of heads valid trained)."""
    if x is None:
        return "–"
    return f"{x:.1f}" if held_out else f"({x:.1f})"


def format_runs(rows: list[RunRow]) -> str:
    """The table, then a line saying how the ranked columns were ranked. "ranked by" says per run what
    its ranked columns (and its eval's test columns) use; "(cosine)" columns are always plain cosine."""
    head = ["run", "backbone", "dataset", "model", "ranked by", "valid heads", "valid mean recall (ranked)",
            "valid mean recall (cosine)", "valid R@10 t2i / i2t (ranked)", "test t2i R@10 (ranked)",
            "test i2t R@10 (ranked)", "made", "size"]
    table = []
    for r in rows:
        held = r.valid_source.held_out
        v10 = "/".join(_pct(x, held) for x in r.valid_r10)
        test = r.test or {}
        cells = [r.name, r.backbone, r.dataset, r.model, r.ranking, r.valid_source.describe(), _pct(r.valid, held),
                 _pct(r.valid_plain, held), v10,
                 with_interval(recall_key("t2i", 10), test) if test else "not evaluated",
                 with_interval(recall_key("i2t", 10), test) if test else "", r.created.replace("T", " ")[:16],
                 human_size(r.size_bytes)]
        table.append([one_line(c) for c in cells])
    widths = [max(len(h), *(len(row[i]) for row in table)) for i, h in enumerate(head)] if table else [len(h) for h in head]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    note = f"(ranked): {RANKED_AS_EVAL} (querybank.json); (cosine): plain cosine; "
    note += "made: when training finished (summary.json), else when it started; valid heads: the heads the valid "
    note += "columns come from (selection: a refit run's heads as valid chose them, before training on valid)"
    notes = [note] + ([NOT_HELD_OUT] if any(not r.valid_source.held_out for r in rows) else [])
    return "\n".join([line(head), line(["-" * w for w in widths]), *(line(row) for row in table), *notes])


def sweep_boards(folder: str | Path) -> list[tuple[Path, str]]:
    """(sweep folder, its leaderboard in Markdown) of every sweep under `folder`."""
    return [(p.parent, (p.parent / "leaderboard.md").read_text()) for p in sorted(Path(folder).rglob("leaderboard.json"))
            if (p.parent / "leaderboard.md").exists()]
