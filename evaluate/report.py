"""What an evaluation leaves to read: a Markdown report and a console table.

Every table puts the baselines (chance, the closed-form head) beside each run, so a number is
never read without knowing what doing nothing, or fitting nothing, already gets. Which keys
belong to which section is what each metric module produced (`ColumnResult.sections`), not a
guess from key names. The report has one part per registered metric (`evaluate.metrics.METRICS`),
written by the metric's own `report` (or, without one, its title and table).
"""
from __future__ import annotations

from pathlib import Path

from medembed.adapt.run import describe_run
from medembed.cache import schema
from medembed.evaluate import metrics as registry
from medembed.evaluate.metric import Metric, SectionView
from medembed.evaluate.tables import CI, format_value, markdown_table, with_interval

__all__ = ["CI", "format_value", "markdown_table", "with_interval", "section_keys", "paired_lines",
           "markdown_report", "headline_keys", "format_summary"]


def section_keys(results: dict, section: str, keep=lambda k: True) -> list[str]:
    """The keys one section produced, in first-seen order over all columns."""
    keys: list[str] = []
    for res in results.values():
        keys += [k for k in res.sections.get(section, []) if k not in keys and keep(k)]
    return keys


def paired_lines(pairs: dict, first: str) -> list[str]:
    """One sentence per run and metric: is it better than the first run, by how much, how sure."""
    out = []
    for name, rows in pairs.items():
        for metric, p in rows.items():
            verdict = "better than" if p["ci_low"] > 0 else "worse than" if p["ci_high"] < 0 else "not clearly different from"
            out.append(f"- `{name}` is {verdict} `{first}` on {metric}: {p['diff']:+.1f}, 95% CI "
                       f"[{p['ci_low']:+.1f}, {p['ci_high']:+.1f}]")
    return out


def _rel(path: Path, out_dir: Path) -> str:
    try:
        return str(Path(path).relative_to(out_dir))
    except ValueError:
        return str(path)


def _header(plan, results, options) -> list[str]:
    first = plan.pools[Path(plan.runs[0].features_dir)].test
    out = [f"# Evaluation on `{first.attrs.get(schema.DATASET, '')}` / {plan.split}", ""]
    models = {c.name: c.model for c in plan.columns if c.kind == "run"}
    for n, r in zip(plan.names, plan.runs):
        model = models.get(n)
        ranked = (f"; ranks with {model.ranking} (plain-cosine recall: `cosine_*` in the metrics)"
                  if model is not None and model.gallery_offsets is not None else
                  f"; ranks by {model.ranking}" if model is not None and model.ranking != "plain cosine" else "")
        out.append(f"- run `{n}`: {describe_run(r)}{ranked}")
    for pool in plan.pools.values():
        out.append(f"- pool `{pool.label}`: {pool.test.n_images} images, {pool.test.n_captions} captions "
                   f"(the whole {plan.split} split), features `{pool.features_dir}`")
    baselines = [c for c in plan.columns if c.kind == "baseline"]
    out.append("- `chance` is the expected value of a random ranking or guess" +
               "".join(f"; `{c.name}` is {c.note}" for c in baselines) + ".")
    out += [f"- note: {n}" for n in plan.notes]
    return out + [""]


def _why_empty(metric: Metric, pool) -> list[str]:
    """Why a section has no numbers on this pool, when it has none (Markdown lines)."""
    test = pool.test
    if metric.needs.concepts and (test.concepts is None or test.concepts.nnz == 0):
        return ["_this split carries no concept labels: section skipped_"]
    if metric.needs.prompts and test.concept_text_features is None:
        return [f"_the cache has no concept prompt features: {metric.name} skipped_"]
    return [f"_{n}_" for n in pool.notes.get(metric.section, [])]


def _plain_section(view: SectionView) -> list[str]:
    """A metric's part of the report when it writes none of its own: its title and its table."""
    out = ["", f"## {view.title}", ""]
    return out + ([markdown_table(view.columns, view.keys), ""] if view.keys else view.notes)


def markdown_report(plan, results: dict, options, section_files: dict[str, dict[str, Path]],
                    training: dict[str, Path], examples: list[Path], out_dir: Path, pairs: dict | None = None) -> str:
    """The whole report as Markdown: header, one part per registered metric, training, examples.
    `section_files`: each section's figure / table files; `training`: each run's training figure."""
    columns = {n: r.metrics for n, r in results.items()}
    pool = plan.pools[Path(plan.runs[0].features_dir)]
    sentences = paired_lines(pairs or {}, plan.names[0])
    out = _header(plan, results, options)
    for metric in registry.METRICS:
        view = SectionView(
            title=metric.title, columns=columns, keys=section_keys(results, metric.section),
            details={n: r.details[metric.section] for n, r in results.items() if metric.section in r.details},
            first=plan.names[0], test=pool.test, settings=options.settings(metric.section),
            notes=_why_empty(metric, pool), paired=sentences,
            files={k: _rel(p, out_dir) for k, p in section_files.get(metric.section, {}).items()})
        out += (metric.report or _plain_section)(view)
    if training:
        out += ["", "## Training", "", "Train loss and valid recall per epoch of each run; the dashed line marks the "
                "epoch whose heads were kept.", ""]
        out += [f"![{k}]({_rel(v, out_dir)})" for k, v in training.items()]
    if examples:
        out += ["", f"## Retrieval examples (`{plan.names[0]}`)", ""]
        out += [f"![example]({_rel(p, out_dir)})" for p in examples]
    return "\n".join(out).rstrip() + "\n"


def headline_keys(columns: dict[str, dict[str, float]]) -> list[str]:
    """The console table's keys: each metric's headline numbers, in registry order."""
    keys: list[str] = []
    for metric in registry.METRICS:
        for metrics in columns.values():
            keys += [k for k in metrics if metric.is_headline(k) and k not in keys]
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
