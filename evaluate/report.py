"""What an evaluation leaves to read: a Markdown report and a console table.

Every table puts the baselines (chance, the closed-form head) beside each run, so a number is
never read without knowing what doing nothing, or fitting nothing, already gets. Which keys
belong to which section is what each metric module produced (`ColumnResult.sections`), not a
guess from key names.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

from medembed.adapt.run import describe_run

# keys shown in the console table (the headline numbers)
HEADLINE = {
    "retrieval": re.compile(r"^(t2i|i2t)_(R@\d+|medr)$"),
    "zeroshot": re.compile(r"^zeroshot_(modality_acc|concept_map)$"),
    "fewshot": re.compile(r"^fewshot_map@\d+$"),
    "detection": re.compile(r"^concept_f1$"),
}

_INT_KEYS = ("pool_images", "pool_captions", "zeroshot_concepts", "zeroshot_modality_images", "zeroshot_modality_classes",
             "fewshot_concepts", "fewshot_seeds", "concept_f1_concepts")
_METHOD_KEY = re.compile(r"^fewshot_(?P<method>.+)_map@(?P<k>\d+)$")


def format_value(key: str, value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if key in _INT_KEYS or key.endswith("_fallback"):
        return str(int(value))
    if key.endswith(("_medr", "_meanr")):
        return f"{value:.1f}" if value != int(value) else str(int(value))
    if key.endswith(("_threshold", "_mean_predicted")):
        return f"{value:.2f}"
    return f"{value:.1f}"


def section_keys(results: dict, section: str, keep=lambda k: True) -> list[str]:
    """The keys one section produced, in first-seen order over all columns."""
    keys: list[str] = []
    for res in results.values():
        keys += [k for k in res.sections.get(section, []) if k not in keys and keep(k)]
    return keys


CI = ("_ci_low", "_ci_high")


def with_interval(key: str, metrics: dict[str, float]) -> str:
    """A value, with its 95% interval in brackets when the metrics carry one."""
    text = format_value(key, metrics.get(key))
    lo, hi = metrics.get(key + CI[0]), metrics.get(key + CI[1])
    if lo is None or hi is None or text == "–":
        return text
    return f"{text} [{format_value(key, lo)}, {format_value(key, hi)}]"


def markdown_table(columns: dict[str, dict[str, float]], keys: list[str]) -> str:
    names = list(columns)
    keys = [k for k in keys if not k.endswith(CI)]
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for key in keys:
        lines.append(f"| {key} | " + " | ".join(with_interval(key, columns[n]) for n in names) + " |")
    return "\n".join(lines)


def paired_lines(pairs: dict, first: str) -> list[str]:
    """One sentence per run and metric: is it better than the first run, by how much, how sure."""
    out = []
    for name, rows in pairs.items():
        for metric, p in rows.items():
            verdict = "better than" if p["ci_low"] > 0 else "worse than" if p["ci_high"] < 0 else "not clearly different from"
            out.append(f"- `{name}` is {verdict} `{first}` on {metric}: {p['diff']:+.1f}, 95% CI "
                       f"[{p['ci_low']:+.1f}, {p['ci_high']:+.1f}]")
    return out


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


def _rel(path: Path, out_dir: Path) -> str:
    try:
        return str(Path(path).relative_to(out_dir))
    except ValueError:
        return str(path)


def _header(plan, results, options) -> list[str]:
    first = plan.pools[Path(plan.runs[0].features_dir)].test
    out = [f"# Evaluation on `{first.attrs.get('dataset', '')}` / {plan.split}", ""]
    for n, r in zip(plan.names, plan.runs):
        bank = r.querybank
        ranked = (f"; ranks with {bank.describe()} chosen on valid (plain-cosine recall: `cosine_*` in the metrics)"
                  if bank is not None and bank.active else "")
        out.append(f"- run `{n}`: {describe_run(r)}{ranked}")
    for pool in plan.pools.values():
        out.append(f"- pool `{pool.label}`: {pool.test.n_images} images, {pool.test.n_captions} captions "
                   f"(the whole {plan.split} split), features `{pool.features_dir}`")
    baselines = [c for c in plan.columns if c.kind == "baseline"]
    out.append("- `chance` is the expected value of a random ranking or guess" +
               "".join(f"; `{c.name}` is {c.note}" for c in baselines) + ".")
    out += [f"- note: {n}" for n in plan.notes]
    return out + [""]


def _notes(pool, section: str) -> list[str]:
    return [f"_{n}_" for n in pool.notes.get(section, [])]


def _concept_notes(plan, section: str) -> list[str]:
    """Why a concept section is empty, when it is."""
    pool = plan.pools[Path(plan.runs[0].features_dir)]
    test = pool.test
    if test.concepts is None or test.concepts.nnz == 0:
        return ["_this split carries no concept labels: section skipped_"]
    if section == "zeroshot" and test.concept_text_features is None:
        return ["_the cache has no concept prompt features: zero-shot skipped_"]
    return _notes(pool, section)


def markdown_report(plan, results: dict, options, plots: dict[str, Path], examples: list[Path],
                    concepts_csv: Path | None, out_dir: Path, pairs: dict | None = None) -> str:
    """The whole report as Markdown: header, one section per metric module, examples."""
    columns = {n: r.metrics for n, r in results.items()}
    out = _header(plan, results, options)
    out += ["## Retrieval", "", "Recall@K in %, with its 95% bootstrap interval over queries in brackets. "
            "Image->text is a hit when any of the image's captions is in the top K; text->image uses each "
            "caption's own image. Ties count against the query.", ""]
    out += [markdown_table(columns, section_keys(results, "retrieval")), ""]
    if pairs and any(pairs.values()):
        out += [f"Paired comparison with `{plan.names[0]}` on the same queries (bootstrap over queries):", "",
                *paired_lines(pairs, plan.names[0]), ""]
    if "recall" in plots:
        out += [f"![recall@K]({_rel(plots['recall'], out_dir)})", ""]
    out += ["## Concept zero-shot", ""]
    zs = section_keys(results, "zeroshot")
    if zs:
        out += _zeroshot_text(plan, results, options, concepts_csv, out_dir)
        out += [markdown_table(columns, zs), ""]
    else:
        out += _concept_notes(plan, "zeroshot")
    out += ["", "## Concept few-shot", ""]
    fs = section_keys(results, "fewshot", keep=lambda k: not _METHOD_KEY.match(k) and not k.endswith("_seed_std"))
    if fs:
        out += _fewshot_text(plan, columns, options, plots, out_dir, fs)
    else:
        out += _concept_notes(plan, "fewshot")
    out += ["", "## Concept detection (ImageCLEFmedical F1)", ""]
    det = section_keys(results, "detection")
    if det:
        out += ["Predictors from the image embedding (`--detectors`): concept propagation from the most similar "
                "train images (`concept_f1_knn`, the default) and one-vs-rest logistic regression "
                "(`concept_f1_logreg`); each one's score threshold (and whether to fall back to the top concept) "
                "chosen on the valid split (20% of train without one), and `concept_f1` is the predictor that "
                "scored best there. F1 per image between "
                "predicted and gold concept sets, averaged over images (empty vs empty scores 1), in %. Chance "
                "guesses each concept at its train frequency.", "", markdown_table(columns, det), ""]
    else:
        out += _concept_notes(plan, "detection")
    training = {k: v for k, v in plots.items() if k.startswith("training ")}
    if training:
        out += ["", "## Training", "", "Train loss and valid recall per epoch of each run; the dashed line marks the "
                "epoch whose heads were kept.", ""]
        out += [f"![{k}]({_rel(v, out_dir)})" for k, v in training.items()]
    if examples:
        out += ["", f"## Retrieval examples (`{plan.names[0]}`)", ""]
        out += [f"![example]({_rel(p, out_dir)})" for p in examples]
    return "\n".join(out).rstrip() + "\n"


def _zeroshot_text(plan, results, options, concepts_csv, out_dir) -> list[str]:
    first = plan.pools[Path(plan.runs[0].features_dir)].test
    out = [f"Cosine between image embedding and each named concept's prompt-ensemble embedding "
           f"({len(first.templates)} templates). mAP and AUROC (in %) over concepts with at least "
           f"{options.zeroshot.min_positives} positive images in the split.", ""]
    z = results[plan.names[0]].concepts
    if z is not None and z.modality_classes:
        out += ["Modality accuracy: single-label choice among " + ", ".join(
            f"{m.label} ({m.concept_id}: {n} images)" for m, n in z.modality_classes) +
            "; images carrying exactly one of them.", ""]
    if z is not None and z.modality_note:
        out += [f"Modality classes left out: {z.modality_note}.", ""]
    if concepts_csv:
        out += [f"Per-concept AUROC and AP: `{_rel(concepts_csv, out_dir)}`.", ""]
    return out


def _fewshot_text(plan, columns, options, plots, out_dir, keys) -> list[str]:
    cfg = options.fewshot
    n = int(columns[plan.names[0]].get("fewshot_concepts", 0))
    out = [f"k positive and k negative train images per concept, {cfg.seeds} seed(s); the {n} most frequent "
           f"train concepts with at least {max(cfg.ks)} train and {cfg.min_test_positives} evaluation positives "
           f"(capped at {cfg.max_concepts} to keep evaluation fast). mAP in % over the evaluation split; "
           "`fewshot_map@k` is the logistic-regression probe.", "", markdown_table(columns, keys), ""]
    for name, metrics in columns.items():
        if not name.startswith("chance") and fewshot_method_table(metrics):
            out += [f"All scorers, `{name}`:", "", fewshot_method_table(metrics), ""]
    if "fewshot" in plots:
        out += [f"![few-shot]({_rel(plots['fewshot'], out_dir)})", ""]
    return out


def headline_keys(columns: dict[str, dict[str, float]]) -> list[str]:
    keys: list[str] = []
    for pattern in HEADLINE.values():
        for metrics in columns.values():
            keys += [k for k in metrics if pattern.match(k) and k not in keys]
    return keys


def format_summary(result: dict) -> str:
    """Console view of `run_eval`'s result: the headline table and where everything went."""
    columns = result["columns"]
    names = list(columns)
    keys = headline_keys(columns)
    widths = [max(len("metric"), *(len(k) for k in keys))] + [
        max(len(n), *(len(with_interval(k, columns[n])) for k in keys)) for n in names]

    def line(cells):
        return "  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(cells))

    rows = [line(["metric", *names]), line(["-" * w for w in widths])]
    rows += [line([k, *(with_interval(k, columns[n]) for n in names)]) for k in keys]
    rows.append("")
    rows.append(f"pool: {result['pool_images']} images, {result['pool_captions']} captions ({result['split']})")
    rows += [f"note: {n}" for n in result.get("notes", [])]
    pairs = paired_lines(result.get("paired", {}), result.get("paired_vs", ""))
    rows += [p.removeprefix("- ").replace("`", "") for p in pairs]
    files = result["files"]
    rows.append(f"report:  {files['report']}")
    rows += [f"metrics: {p}" for p in files["metrics"]]
    rows.append(f"comparison: {files['comparison']}")
    rows += [f"plot: {p}" for p in files["plots"]]
    if files["examples"]:
        rows.append(f"examples: {', '.join(str(p) for p in files['examples'])}")
    return "\n".join(rows)
