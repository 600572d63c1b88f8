"""What an evaluation leaves behind: metrics.json (flat numbers), a Markdown report and a console table.

Every table puts the baselines (chance, the closed-form head) beside each run, so a number is
never read without knowing what doing nothing, or fitting nothing, already gets.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

SECTIONS = {
    "retrieval": ("t2i_R@", "i2t_R@", "t2i_medr", "i2t_medr", "t2i_meanr", "i2t_meanr", "pool_images", "pool_captions"),
    "zeroshot": ("zeroshot_",),
    "fewshot": ("fewshot_",),
    "detection": ("concept_f1",),
}

# keys shown in the console table (the headline numbers the task names)
HEADLINE_PREFIXES = ("t2i_R@", "i2t_R@", "t2i_medr", "i2t_medr", "zeroshot_modality_acc", "zeroshot_concept_map", "fewshot_map@")
HEADLINE_KEYS = ("concept_f1",)

_INT_KEYS = ("pool_images", "pool_captions", "zeroshot_concepts", "zeroshot_modality_images", "zeroshot_modality_classes",
             "fewshot_concepts", "fewshot_seeds", "concept_f1_concepts")


def section_keys(columns: dict[str, dict[str, float]], section: str) -> list[str]:
    """Keys of one section in first-seen order over all columns (so K order follows --k)."""
    prefixes = SECTIONS[section]
    keys: list[str] = []
    for metrics in columns.values():
        for key in metrics:
            if key.startswith(prefixes) and key not in keys:
                keys.append(key)
    return keys


def format_value(key: str, value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if key in _INT_KEYS or key.endswith("_fallback"):
        return str(int(value))
    if key.endswith(("_medr", "_meanr")):
        return f"{value:.1f}" if value != int(value) else str(int(value))
    if key.endswith("_threshold") or key.endswith("_mean_predicted"):
        return f"{value:.2f}"
    return f"{value:.1f}"


def markdown_table(columns: dict[str, dict[str, float]], keys: list[str]) -> str:
    names = list(columns)
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for key in keys:
        lines.append(f"| {key} | " + " | ".join(format_value(key, columns[n].get(key)) for n in names) + " |")
    return "\n".join(lines)


def headline_keys(columns: dict[str, dict[str, float]]) -> list[str]:
    keys: list[str] = []
    for metrics in columns.values():
        for key in metrics:
            if (key.startswith(HEADLINE_PREFIXES) or key in HEADLINE_KEYS) and key not in keys:
                keys.append(key)
    return keys


_METHOD_KEY = re.compile(r"^fewshot_(?P<method>.+)_map@(?P<k>\d+)$")


def fewshot_method_table(metrics: dict[str, float]) -> str:
    """One column's few-shot mAP as methods x k (the long flat keys, made readable)."""
    grid: dict[str, dict[int, float]] = {}
    for key, value in metrics.items():
        m = _METHOD_KEY.match(key)
        if m:
            grid.setdefault(m["method"], {})[int(m["k"])] = value
    if not grid:
        return ""
    ks = sorted({k for row in grid.values() for k in row})
    lines = ["| method | " + " | ".join(f"k={k}" for k in ks) + " |", "|---|" + "---:|" * len(ks)]
    for method, row in grid.items():
        lines.append(f"| {method} | " + " | ".join(format_value("", row.get(k)) for k in ks) + " |")
    return "\n".join(lines)


def write_metrics(path: Path, metrics: dict[str, float]) -> Path:
    """Flat {name: number}; NaN (a metric with nothing to average) is written as null."""
    clean = {k: (None if isinstance(v, float) and math.isnan(v) else round(v, 4) if isinstance(v, float) else v)
             for k, v in metrics.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(clean, indent=2) + "\n")
    return path


def _rel(path: Path, out_dir: Path) -> str:
    try:
        return str(Path(path).relative_to(out_dir))
    except ValueError:
        return str(path)


def markdown_report(
    columns: dict[str, dict[str, float]],
    context: dict,
    plots: dict[str, Path],
    examples: list[Path],
    out_dir: Path,
) -> str:
    """The whole report as Markdown. `context` carries the prose facts: split, features folder,
    modality classes used, few-shot concept choice, notes on anything skipped."""
    out: list[str] = [f"# Evaluation on `{context['dataset']}` / {context['split']}", ""]
    out += [
        f"- features: `{context['features_dir']}` (backbone `{context['backbone']}`)",
        f"- runs: {', '.join(f'`{r}`' for r in context['runs'])}",
        f"- pool: {context['pool_images']} images, {context['pool_captions']} captions (the whole split)",
        "- columns: `chance` is the expected value of a random ranking/guess; `closed-form` is the "
        "regularised-CCA head fitted on train without gradient steps; then each run.",
        "",
        "## Retrieval",
        "",
        "Recall@K in %. Image->text is a hit when any of the image's captions is in the top K; "
        "text->image uses each caption's own image. Ties count against the query.",
        "",
        markdown_table(columns, section_keys(columns, "retrieval")),
        "",
    ]
    if "recall" in plots:
        out += [f"![recall@K]({_rel(plots['recall'], out_dir)})", ""]
    zs = section_keys(columns, "zeroshot")
    out += ["## Concept zero-shot", ""]
    if zs:
        out += [
            f"Cosine between image embedding and each named concept's prompt-ensemble embedding "
            f"({context.get('templates', 0)} templates). mAP and AUROC (in %) over concepts with at least "
            f"{context['min_positives']} positive images in the split.",
            "",
        ]
        classes = context.get("modality_classes", [])
        if classes:
            out += ["Modality accuracy: single-label choice among " + ", ".join(
                f"{label} ({cid}: {n} images)" for label, cid, n in classes) + "; images carrying exactly one of them.", ""]
        if context.get("modality_note"):
            out += [f"Modality classes left out: {context['modality_note']}.", ""]
        out += [markdown_table(columns, zs), ""]
        if context.get("concepts_csv"):
            out += [f"Per-concept AUROC and AP: `{_rel(context['concepts_csv'], out_dir)}`.", ""]
    out += [f"_{n}_" for n in context.get("notes", {}).get("zeroshot", [])]
    fs = section_keys(columns, "fewshot")
    out += ["", "## Concept few-shot", ""]
    if fs:
        out += [
            f"k positive and k negative train images per concept, {context.get('fewshot_seeds')} seeds; "
            f"the {context.get('fewshot_concepts')} most frequent train concepts with at least "
            f"{context.get('fewshot_min_train')} train and {context.get('fewshot_min_test')} evaluation positives "
            f"(capped at {context.get('fewshot_max_concepts')} to keep evaluation fast). "
            "mAP in % over the evaluation split; `fewshot_map@k` is the logistic-regression probe.",
            "",
            markdown_table(columns, [k for k in fs if not _METHOD_KEY.match(k)]),
            "",
        ]
        for name, metrics in columns.items():
            if name != "chance" and fewshot_method_table(metrics):
                out += [f"All scorers, `{name}`:", "", fewshot_method_table(metrics), ""]
        if "fewshot" in plots:
            out += [f"![few-shot]({_rel(plots['fewshot'], out_dir)})", ""]
    out += [f"_{n}_" for n in context.get("notes", {}).get("fewshot", [])]
    det = section_keys(columns, "detection")
    out += ["", "## Concept detection (ImageCLEFmedical F1)", ""]
    if det:
        out += [
            "One-vs-rest logistic regression on the image embedding; one probability threshold (and whether "
            "to fall back to the top concept) chosen on 20% of train; F1 per image between predicted and "
            "gold concept sets, averaged over images (empty vs empty scores 1), in %. Chance guesses each "
            "concept at its train frequency.",
            "",
            markdown_table(columns, det),
            "",
        ]
    out += [f"_{n}_" for n in context.get("notes", {}).get("detection", [])]
    if examples:
        out += ["", f"## Retrieval examples ({context['runs'][0]})", ""]
        out += [f"![example]({_rel(p, out_dir)})" for p in examples]
    return "\n".join(out).rstrip() + "\n"


def format_summary(result: dict) -> str:
    """Console view of `run_eval`'s result: the headline table and where everything went."""
    columns = result["columns"]
    names = list(columns)
    keys = headline_keys(columns)
    widths = [max(len("metric"), *(len(k) for k in keys))] + [max(len(n), 6) for n in names]

    def line(cells):
        return "  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(cells))

    rows = [line(["metric", *names]), line(["-" * w for w in widths])]
    rows += [line([k, *(format_value(k, columns[n].get(k)) for n in names)]) for k in keys]
    rows.append("")
    rows.append(f"pool: {result['pool_images']} images, {result['pool_captions']} captions ({result['split']})")
    rows.append(f"metrics: {result['metrics_path']}")
    rows.append(f"report:  {result['report']}")
    for name, path in result["plots"].items():
        rows.append(f"plot ({name}): {path}")
    if result["examples"]:
        rows.append(f"examples: {', '.join(str(p) for p in result['examples'])}")
    return "\n".join(rows)
