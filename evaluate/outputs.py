"""Writing an evaluation folder: built beside its final place and swapped in whole, so a reader
sees the previous evaluation or the new one, never a mix."""
from __future__ import annotations

import csv
import shutil
from datetime import UTC, datetime
from pathlib import Path

from medembed.adapt import run_files
from medembed.adapt.run import AdaptedRun, describe_run
from medembed.cache import schema
from medembed.common.files import read_json, read_jsonl, replace_folder, slug, staging_folder, write_json
from medembed.common.version import __version__
from medembed.evaluate import zeroshot
from medembed.evaluate.examples import write_examples
from medembed.evaluate.plan import COMPARISON, Column, ColumnResult, EvalOptions, EvalPlan, EvalPool
from medembed.evaluate.plots import fewshot_curves, recall_curves, training_curve
from medembed.evaluate.report import markdown_report
from medembed.evaluate.scoring import paired

SCHEMA_VERSION = 2


# ------------------------------------------------------------------------------------------- writing
def _scored(pool: EvalPool) -> dict:
    """The provenance of what a column was scored on."""
    attrs = pool.test.attrs
    keys = (schema.DATASET, schema.DATASET_FINGERPRINT, schema.SPLIT, schema.BACKBONE, schema.WEIGHTS_SHA256, schema.DATA_ROOT,
            schema.CREATED)
    return {"features": pool.test.path, "pool_images": pool.test.n_images, "pool_captions": pool.test.n_captions,
            **{k: attrs.get(k, "") for k in keys}}


def _run_record(plan: EvalPlan, col: Column, res: ColumnResult, created: str) -> dict:
    run = col.run
    return {
        "schema_version": SCHEMA_VERSION, "toolkit_version": __version__, "created": created,
        "run": col.name, "run_ref": str(run.checkpoint or run.run_dir), "describe": describe_run(run),
        "split": plan.split, "ks": plan.ks, "scored": _scored(col.pool),
        "metrics": res.metrics, "sections": res.sections, "seconds": round(res.seconds, 2),
    }


def _comparison(plan: EvalPlan, results: dict[str, ColumnResult], created: str, pairs: dict) -> dict:
    return {
        "paired_vs": plan.names[0], "paired": pairs,
        "schema_version": SCHEMA_VERSION, "toolkit_version": __version__, "created": created,
        "split": plan.split, "ks": plan.ks,
        "runs": {n: str(r.checkpoint or r.run_dir) for n, r in zip(plan.names, plan.runs)},
        "columns": {c.name: results[c.name].metrics for c in plan.columns},
        "sections": {c.name: results[c.name].sections for c in plan.columns},
        "pools": {c.name: _scored(c.pool) for c in plan.columns},
        "seconds": {c.name: round(results[c.name].seconds, 2) for c in plan.columns},
        "notes": plan.notes,
    }


def metrics_file(name: str) -> str:
    return f"metrics-{slug(name.replace('/', '_'))}.json"


def _write_concepts_csv(path: Path, columns: dict[str, ColumnResult]) -> Path | None:
    """Zero-shot AUROC and AP of every concept, one column pair per scored column."""
    zs = {n: c.details.get("zeroshot") for n, c in columns.items()}
    with_concepts = {n: z for n, z in zs.items() if isinstance(z, zeroshot.ZeroShotResult) and z.concept_rows}
    if not with_concepts:
        return None
    first = next(iter(with_concepts.values()))
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["concept_id", "name", "positives", *(f"{n}_{m}" for n in with_concepts for m in ("auroc", "ap"))])
        for i, cid in enumerate(first.concept_ids):
            row = [cid, first.concept_names[i], first.positives[i]]
            for z in with_concepts.values():
                row += [f"{100 * z.auroc[i]:.2f}", f"{100 * z.ap[i]:.2f}"] if i < len(z.auroc) else ["", ""]
            w.writerow(row)
    return path


def write_outputs(plan: EvalPlan, results: dict[str, ColumnResult], options: EvalOptions,
                  expected: tuple[int, int] | None) -> dict:
    """Build the evaluation folder beside its final place, then swap it in (all or nothing), only if
    the folder is still in the `expected` state (`common.files.folder_state`) it was checked in."""
    work = staging_folder(plan.out_dir)
    try:
        files = _write_files(work, plan, results, options)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    replace_folder(work, plan.out_dir, expected)
    return {k: (plan.out_dir / Path(v).relative_to(work) if isinstance(v, Path) else
                [plan.out_dir / Path(x).relative_to(work) for x in v]) for k, v in files.items()}


def _training_curve(col: Column, work: Path, title: str) -> Path | None:
    """The run's own metrics.jsonl as a figure (none for the closed form, which has no epochs)."""
    rows = [r for r in _metrics_rows(col.run) if "train_loss" in r]
    if not rows:
        return None
    summary = col.run.run_dir / run_files.SUMMARY
    best = read_json(summary).get("best_epoch", 0) if summary.exists() else 0
    return training_curve(rows, best, work / f"training-{slug(col.name.replace('/', '_'))}.png",
                          title=f"Training of {col.name} (valid split of its cache); evaluated on {title}")


def _metrics_rows(run: AdaptedRun) -> list[dict]:
    path = run.run_dir / run_files.METRICS
    if not path.exists():
        return []
    return read_jsonl(path)


def _write_files(work: Path, plan: EvalPlan, results: dict[str, ColumnResult], options: EvalOptions) -> dict:
    created = datetime.now(UTC).isoformat(timespec="seconds")
    runs = [c for c in plan.columns if c.kind == "run"]
    metrics_paths = [write_json(work / metrics_file(c.name), _run_record(plan, c, results[c.name], created))
                     for c in runs]
    pairs = paired(plan, results)
    write_json(work / COMPARISON, _comparison(plan, results, created, pairs))
    first = plan.pools[Path(plan.runs[0].features_dir)]
    title = f"{first.test.attrs.get(schema.DATASET, '')} {plan.split}, {first.test.n_images} images"
    figures: dict[str, Path] = {}  # section -> its figure, drawn from the curves scoring kept
    curves = {n: r.curves["retrieval"] for n, r in results.items() if r.curves.get("retrieval")}
    if curves:
        figures["retrieval"] = recall_curves(curves, work / "recall_at_k.png",
                                             title=f"Recall@K of {', '.join(plan.names)} on {title} (bands: 95% intervals)")
    fs = {n: r.curves["fewshot"] for n, r in results.items() if r.curves.get("fewshot")}
    if any(c.kind != "chance" and c.name in fs for c in plan.columns):
        ks = sorted(set(options.fewshot.ks))
        spread = {n: {m: [results[n].metrics.get(f"fewshot_{m}_map@{k}_seed_std", 0.0) for k in ks] for m in c}
                  for n, c in fs.items()}
        figures["fewshot"] = fewshot_curves(fs, ks, work / "fewshot.png", spread=spread,
                                            title=f"Concept few-shot, {title} (mean over {options.fewshot.seeds} "
                                                  "seeds, bars: their spread)")
    training: dict[str, Path] = {}
    for c in runs:
        curve = _training_curve(c, work, title)
        if curve is not None:
            training[f"training {c.name}"] = curve
    examples = []
    primary = results[runs[0].name]
    if options.examples and primary.embeddings is not None:
        examples = write_examples(first.test, *primary.embeddings, work, options.examples, run_name=runs[0].name,
                                  offsets=primary.offsets)
    section_files = {section: {"figure": path} for section, path in figures.items()}
    concepts_csv = _write_concepts_csv(work / "zeroshot_concepts.csv", results)
    if concepts_csv is not None:
        section_files.setdefault("zeroshot", {})["table"] = concepts_csv
    report = work / "report.md"
    report.write_text(markdown_report(plan, results, options, section_files, training, examples, work, pairs))
    return {"metrics": metrics_paths, "report": report, "comparison": work / COMPARISON,
            "plots": [*figures.values(), *training.values()], "examples": examples}
