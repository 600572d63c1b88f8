"""`cli.py eval`: every metric for each run and its baselines on one split, then files to read.

Three steps, so that nothing is lost or contradicted:
1. `plan_eval` loads the runs and the pools they are scored on and checks everything that can be
   checked before a number is computed: the runs are comparable (same dataset, pool and backbone,
   unless a cross table is asked for), the output folder is new (or replacing it was asked for),
   K fits the pool.
2. `score_columns` computes each column (chance, the closed-form baseline, each run), one section
   of the metric registry (`evaluate.metrics.METRICS`) at a time, printing one progress line per
   section; then each run's paired differences with the first. Every statistic is computed there
   once and kept in the column's result, which the files only read.
3. `write_outputs` builds the whole evaluation folder beside its final place and swaps it in with
   one rename: a reader sees the previous evaluation or the new one, never a mix.

Columns are computed the same way for everything: a model is two raw-feature -> embedding maps
(`model.embedding`), so chance, the closed-form head and each trained run are directly comparable.
Chance columns come from closed forms (expected values of a random ranking), not from sampling.
"""
from __future__ import annotations

from pathlib import Path

from medembed.common.files import folder_state
from medembed.common.locks import exclusive
from medembed.common.recall_keys import DEFAULT_KS
from medembed.evaluate.outputs import SCHEMA_VERSION, metrics_file, write_outputs
from medembed.evaluate.plan import (
    COMPARISON,
    EVAL_SPLIT,
    EvalOptions,
    EvalPlan,
    EvalPool,
    check_out_dir,
    load_pool,
    logger,
    plan_eval,
)
from medembed.evaluate.scoring import paired, score_columns

__all__ = ["COMPARISON", "SCHEMA_VERSION", "EvalOptions", "EvalPlan", "EvalPool", "load_pool", "metrics_file",
           "plan_eval", "run_eval", "score_columns", "write_outputs"]


def run_eval(
    run_dirs: list,
    split: str = EVAL_SPLIT,
    ks: list[int] | tuple[int, ...] = DEFAULT_KS,
    out_dir: Path | None = None,
    options: EvalOptions | None = None,
) -> dict:
    """Evaluate runs (and their baselines) on one split; write the evaluation folder.

    `run_dirs`: run folders, unfreezing run folders, fine-tuned checkpoints or loaded runs. With
    `options.data` each run is scored on that dataset's raw images and captions, encoded by the
    run's own backbone (the fine-tuned one for a checkpoint) instead of on the run's cache.
    Writes `metrics-RUN.json` for every run, `comparison.json` (every column), `report.md`, plots
    and examples into a new folder (default `FIRST_RUN/eval-SPLIT[-vs-...]`).
    Returns {"columns", "metrics" (the first run's), "out_dir", "files", "notes", "split",
    "pool_images", "pool_captions"}.
    """
    options = options or EvalOptions()
    plan = plan_eval(list(run_dirs), split, ks, out_dir, options)
    log = logger(options)
    # one eval writes a folder at a time; checked again under the lock, since another may have
    # finished between the plan's check and now, and once more right before the swap
    with exclusive(plan.out_dir, "eval", "wait for it to finish or choose another --out"):
        check_out_dir(plan.out_dir, options.overwrite)
        for note in plan.notes:  # once the evaluation is sure to run: a refusal stays one line
            log(f"note: {note}")
        if plan.memory is not None:
            log(f"memory: {plan.memory.describe()}")
        state = folder_state(plan.out_dir)
        results = score_columns(plan, options, log)
        files = write_outputs(plan, results, options, state)
    first = plan.pools[Path(plan.runs[0].features_dir)].test
    return {
        "paired": paired(plan, results),
        "paired_vs": plan.names[0],
        "columns": {n: r.metrics for n, r in results.items()},
        "metrics": results[plan.names[0]].metrics,
        "out_dir": plan.out_dir,
        "files": files,
        "notes": plan.notes,
        "split": split,
        "pool_images": first.n_images,
        "pool_captions": first.n_captions,
    }

