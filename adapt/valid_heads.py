"""Which heads a run's valid numbers come from, and whether those heads ever trained on valid.

A refit run (the default) trains fresh heads on train + valid once valid has chosen the epoch
(`trainer.refit_heads`): the heads it embeds with have seen every valid pair, so valid recall
measured through them is no held-out number (a student taught by them, or started from them,
inherits the same). Its valid numbers are therefore those of the heads valid chose
(`selection.safetensors`), which never trained on valid; runs made from it (compact, distilled)
measure valid through their own counterparts of those heads.

summary.json says which, beside its "valid": `valid_heads` ("best": `best.safetensors`, the heads
the run embeds with; "selection": `selection.safetensors`) and `valid_held_out` (false: the heads
that produced the valid numbers learned from valid pairs, directly or through a teacher, so those
numbers say nothing of unseen data: `runs` and `sweep` show them marked and never rank them above
a held-out one). Runs saved before these fields existed are read by what their folders show
(`valid_source`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from medembed.adapt.run_files import CONFIG, SELECTION, SUMMARY

__all__ = ["BEST_HEADS", "SELECTION_HEADS", "VALID_HEADS", "VALID_HELD_OUT", "VALID_WHY", "ValidSource",
           "valid_fields", "valid_source"]

VALID_HEADS = "valid_heads"  # summary.json: which heads its valid numbers come from
VALID_HELD_OUT = "valid_held_out"  # summary.json: false when those heads trained on valid
VALID_WHY = "valid_not_held_out"  # summary.json, only when not held out: how valid reached those heads
BEST_HEADS = "best"  # best.safetensors
SELECTION_HEADS = "selection"  # selection.safetensors


@dataclass(frozen=True)
class ValidSource:
    heads: str  # BEST_HEADS or SELECTION_HEADS
    held_out: bool
    why: str = ""  # when not held out: how valid reached those heads

    def describe(self) -> str:
        """The heads, and "not held out" when valid trained them: a table cell."""
        return self.heads if self.held_out else f"{self.heads}, not held out"


def valid_fields(heads: str, held_out: bool = True, why: str = "") -> dict:
    """summary.json's record of where its valid numbers come from."""
    return {VALID_HEADS: heads, VALID_HELD_OUT: held_out, **({VALID_WHY: why} if why else {})}


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def valid_source(run_dir: str | Path, summary: dict | None = None, config: dict | None = None) -> ValidSource:
    """Where the run's valid numbers come from: as summary.json records it, else (a run saved before
    the record existed) inferred from the folder: a refit run's valid numbers were always its
    selection heads'; a compact or distilled run made from a refit run without carrying selection
    heads of its own measured valid through heads made from the refit heads, which trained on valid
    (or from a run whose own valid numbers are not held out)."""
    run_dir = Path(run_dir)
    summary = _read(run_dir / SUMMARY) if summary is None else summary
    if VALID_HELD_OUT in summary:
        return ValidSource(str(summary.get(VALID_HEADS, BEST_HEADS)), bool(summary[VALID_HELD_OUT]),
                           str(summary.get(VALID_WHY, "")))
    if (run_dir / SELECTION).exists():
        return ValidSource(SELECTION_HEADS, True)
    config = _read(run_dir / CONFIG) if config is None else config
    source = next((config[k]["from"] for k in ("distilled", "compact")
                   if isinstance(config.get(k), dict) and config[k].get("from")), None)
    if source is not None and (Path(source) / SELECTION).exists():
        return ValidSource(BEST_HEADS, False, f"made from the refit heads of {source}, which trained on valid")
    if source is not None and (Path(source) / CONFIG).exists() and not valid_source(source).held_out:
        return ValidSource(BEST_HEADS, False, f"made from {source}, whose valid numbers are not held out")
    return ValidSource(BEST_HEADS, True)
