"""How a number reads in report.md and on the console: its format, its interval in brackets, tables.

Shared by the report and each metric module's own report text, so every section formats a value
the same way.
"""
from __future__ import annotations

import math

# counts written as integers (any int-valued metric is too)
_INT_KEYS = ("pool_images", "pool_captions", "zeroshot_concepts", "zeroshot_modality_images", "zeroshot_modality_classes",
             "fewshot_concepts", "fewshot_seeds", "concept_f1_concepts")
CI = ("_ci_low", "_ci_high")


def format_value(key: str, value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if key in _INT_KEYS or key.endswith("_fallback") or (isinstance(value, int) and not isinstance(value, bool)):
        return str(int(value))
    if key.endswith(("_medr", "_meanr")):
        return f"{value:.1f}" if value != int(value) else str(int(value))
    if key.endswith(("_threshold", "_mean_predicted")):
        return f"{value:.2f}"
    return f"{value:.1f}"


def with_interval(key: str, metrics: dict[str, float]) -> str:
    """A value, with its 95% interval in brackets when the metrics carry one."""
    text = format_value(key, metrics.get(key))
    lo, hi = metrics.get(key + CI[0]), metrics.get(key + CI[1])
    if lo is None or hi is None or text == "–":
        return text
    return f"{text} [{format_value(key, lo)}, {format_value(key, hi)}]"


def markdown_table(columns: dict[str, dict[str, float]], keys: list[str]) -> str:
    """One row per key (intervals beside their value, not as rows), one column per evaluated column."""
    names = list(columns)
    keys = [k for k in keys if not k.endswith(CI)]
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for key in keys:
        lines.append(f"| {key} | " + " | ".join(with_interval(key, columns[n]) for n in names) + " |")
    return "\n".join(lines)
