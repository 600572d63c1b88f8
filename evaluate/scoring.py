"""Scoring an evaluation's columns (chance, the closed-form baseline, each run), one section of the
metric registry at a time; every statistic is computed here once and kept in the column's result."""
from __future__ import annotations

import time
from collections.abc import Callable

from medembed.adapt.closed_form_store import closed_form
from medembed.common.stats import paired_difference
from medembed.evaluate import metrics as registry
from medembed.evaluate.metric import ColumnInputs
from medembed.evaluate.plan import Column, ColumnResult, EvalOptions, EvalPlan
from medembed.model.embedding import EmbeddingModel, model_from_heads


# ------------------------------------------------------------------------------------------- scoring
def _fit_closed_form(col: Column, options: EvalOptions) -> EmbeddingModel:
    """The same closed form as `adapt --head cca`: ridge and weighting chosen on valid."""
    fit = closed_form(col.pool.train, col.pool.valid, col.run.dim, progress=options.progress)
    chosen = "chosen on valid" if fit.chosen_on_valid else "(no valid split to choose them on)"
    kept = (f"; reused from {fit.stored}" if fit.reused else f"; stored in {fit.stored}" if fit.stored else "")
    col.note = f"regularised CCA fitted on train, ridge {fit.reg:g} and weighting {fit.power:g} {chosen}{kept}"
    return model_from_heads(col.name, fit.image_head, fit.text_head)


def score_column(col: Column, plan: EvalPlan, options: EvalOptions, log: Callable[[str], None]) -> ColumnResult:
    """Every asked-for section that the column's pool has the data for, in registry order: chance
    from each metric's closed form, the baseline and runs from their embeddings."""
    start = time.perf_counter()
    if col.kind == "baseline":
        t0 = time.perf_counter()
        col.model = _fit_closed_form(col, options)
        log(f"eval {col.name}: fitted ({col.note}) {time.perf_counter() - t0:.2f} s")
    pool = col.pool
    inputs = ColumnInputs(pool.test, pool.train, pool.valid, plan.ks, options.memory_mb,
                          None if col.kind == "chance" else col.model, progress=options.progress)
    # only the first run's embeddings outlive its scoring (its example grids); on a 100k pool each
    # kept pair is 200 MB
    keep = col.kind != "chance" and options.examples > 0 and col.name == plan.names[0]
    res = ColumnResult()
    asked = registry.asked(options.sections)
    last_text_reader = max((i for i, m in enumerate(asked) if m.needs.texts), default=-1)
    for i, metric in enumerate(asked):
        if metric.needs.met_by(pool.test, pool.train):
            t0 = time.perf_counter()
            scorer = metric.chance if col.kind == "chance" else metric.score
            res.add(metric, scorer(inputs, options.settings(metric.section)))
            log(f"eval {col.name}: {metric.section} {time.perf_counter() - t0:.2f} s")
        if i == last_text_reader and not keep:
            inputs.release_texts()  # the later sections score images only
    if keep:
        res.embeddings = (inputs.images(), inputs.texts())
        res.offsets = inputs.ranked_offsets()
    res.seconds = time.perf_counter() - start
    return res


def pair_with_first(plan: EvalPlan, results: dict[str, ColumnResult]) -> None:
    """Each run after the first against the first, on the queries both were scored on: the paired
    bootstrap interval of the difference of every rate metric both kept per-query hits for
    (Recall@K, the modality accuracy), stored in the run's result."""
    runs = [c for c in plan.columns if c.kind == "run"]
    first = results[runs[0].name]
    for other in runs[1:]:
        if other.pool is not runs[0].pool:
            continue  # a cross table: different queries, no pairing
        res = results[other.name]
        res.paired = {key: paired_difference(hits, res.hits[key]) for key, hits in first.hits.items()
                      if key in res.hits}


def score_columns(plan: EvalPlan, options: EvalOptions, log: Callable[[str], None]) -> dict[str, ColumnResult]:
    """Every column, then the runs' paired differences: each statistic once, for every file to read."""
    results = {col.name: score_column(col, plan, options, log) for col in plan.columns}
    pair_with_first(plan, results)
    return results


# ----------------------------------------------------------------------------------- comparisons
def paired(plan: EvalPlan, results: dict[str, ColumnResult]) -> dict[str, dict[str, dict[str, float]]]:
    """The paired differences scoring stored ({run: {metric: {"diff", "ci_low", "ci_high"}}}), as
    comparison.json, the report and the console show them."""
    stored = {c.name: results[c.name].paired for c in plan.columns if c.kind == "run"}
    return {name: {m: {"diff": p.diff, "ci_low": p.low, "ci_high": p.high} for m, p in rows.items()}
            for name, rows in stored.items() if rows is not None}
