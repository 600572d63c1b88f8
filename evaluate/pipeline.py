"""`cli.py eval`: every metric for each run and its baselines on one split, then files to read.

Columns are computed the same way for everything: a model is two raw-feature -> embedding maps
(`evaluate.models`), so chance, the closed-form head and each trained run are directly comparable.
Chance columns come from closed forms (expected values of a random ranking), not from sampling.
"""
from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from medembed.cache.provenance import ProvenanceMismatch, backbone_differences
from medembed.cache.reader import CachedSplit, find_splits, load_split
from medembed.evaluate import detection, fewshot, retrieval, zeroshot
from medembed.evaluate.examples import write_examples
from medembed.evaluate.models import EmbeddingModel, model_from_heads, model_from_run
from medembed.evaluate.plots import fewshot_curves, recall_curves
from medembed.evaluate.report import markdown_report, write_metrics

CURVE_KS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)


@dataclass
class EvalOptions:
    zeroshot: zeroshot.ZeroShotConfig = field(default_factory=zeroshot.ZeroShotConfig)
    fewshot: fewshot.FewShotConfig = field(default_factory=fewshot.FewShotConfig)
    detection: detection.DetectionConfig = field(default_factory=detection.DetectionConfig)
    closed_form: bool = True  # fit the closed-form baseline on train
    sections: tuple[str, ...] = ("retrieval", "zeroshot", "fewshot", "detection")
    examples: int = 1  # text->image and image->text example grids of the first run
    memory_mb: float = retrieval.DEFAULT_MEMORY_MB
    data: str | None = None  # score this dataset's raw images and captions, encoded by each run's own backbone
    features_root: str = "features"  # where that encoding is cached
    progress: bool = True


@dataclass
class ColumnResult:
    metrics: dict[str, float]
    recall: dict[str, list[float]] = field(default_factory=dict)
    fewshot: dict[str, list[float]] = field(default_factory=dict)
    concepts: zeroshot.ZeroShotResult | None = None
    seconds: float = 0.0


@dataclass
class SplitPair:
    """The evaluation split and the train split few-shot and detection learn from."""

    features_dir: Path
    test: CachedSplit
    train: CachedSplit | None
    notes: dict[str, list[str]] = field(default_factory=dict)


def load_pair(features_dir: Path, split: str) -> SplitPair:
    files = find_splits(features_dir)
    if split not in files:
        raise FileNotFoundError(f"{features_dir}: no {split}.h5 (found: {', '.join(files)})")
    test = load_split(files[split], with_views=False)
    train = None
    notes: dict[str, list[str]] = {}
    if split == "train":
        notes["fewshot"] = notes["detection"] = ["evaluating on train: few-shot and detection need a separate train split; skipped"]
    elif "train" not in files:
        notes["fewshot"] = notes["detection"] = [f"{features_dir} has no train.h5: few-shot, detection and closed-form skipped"]
    else:
        train = load_split(files["train"], with_views=False)
    return SplitPair(Path(features_dir), test, train, notes)


def _has_concepts(s: CachedSplit | None) -> bool:
    return s is not None and s.concepts is not None and s.concepts.shape[1] > 0 and s.concepts.nnz > 0


def curve_ks(ks: list[int], pool: int) -> list[int]:
    return sorted({k for k in (*CURVE_KS, *ks) if k <= max(pool, 1)} | {1})


def evaluate_model(model: EmbeddingModel, pair: SplitPair, ks: list[int], options: EvalOptions) -> tuple[ColumnResult, torch.Tensor, torch.Tensor]:
    """All sections for one model; also returns the evaluation split's image and text embeddings."""
    start = time.perf_counter()
    test, train = pair.test, pair.train
    img, txt = model.images(test.image_features), model.texts(test.caption_features)
    res = ColumnResult(metrics={})
    if "retrieval" in options.sections:
        r = retrieval.ranks(img, txt, test.caption_image, options.memory_mb)
        res.metrics.update(retrieval.summarize(r, ks))
        cks = curve_ks(ks, max(r.pool_images, r.pool_captions))
        res.recall = {"t2i": retrieval.recall_curve(r.t2i, cks, r.pool_images),
                      "i2t": retrieval.recall_curve(r.i2t, cks, r.pool_captions)}
    concept_emb = None
    if _has_concepts(test) and test.concept_text_features is not None:
        concept_emb = model.concept_prompts(test.concept_text_features)
    if "zeroshot" in options.sections and concept_emb is not None:
        res.concepts = zeroshot.compute(img, concept_emb, test.concepts, test.concept_ids, test.concept_names, options.zeroshot)
        res.metrics.update(res.concepts.metrics())
    if _has_concepts(test) and _has_concepts(train):
        train_img = model.images(train.image_features)
        if "fewshot" in options.sections:
            fs = fewshot.compute(train_img, train.concepts, img, test.concepts, concept_emb, test.concept_names, options.fewshot)
            res.metrics.update(fs.metrics())
            res.fewshot = {m: fs.curve(m) for m in fs.methods} if fs.concept_rows else {}
        if "detection" in options.sections:
            res.metrics.update(detection.evaluate(train_img, train.concepts, img, test.concepts, options.detection))
    res.seconds = time.perf_counter() - start
    return res, img, txt


def chance_column(pair: SplitPair, ks: list[int], options: EvalOptions) -> ColumnResult:
    test, train = pair.test, pair.train
    res = ColumnResult(metrics={})
    if "retrieval" in options.sections:
        res.metrics.update(retrieval.chance(test.caption_image, test.n_images, ks))
        cks = curve_ks(ks, max(test.n_images, test.n_captions))
        full = retrieval.chance(test.caption_image, test.n_images, cks)
        res.recall = {d: [full[f"{d}_R@{k}"] for k in cks] for d in ("t2i", "i2t")}
    if "zeroshot" in options.sections and _has_concepts(test) and test.concept_text_features is not None:
        res.metrics.update(zeroshot.chance(test.concepts, test.concept_ids, test.concept_names, options.zeroshot))
    if _has_concepts(test) and _has_concepts(train):
        if "fewshot" in options.sections:
            fs = fewshot.chance(train.concepts, test.concepts, options.fewshot)
            res.metrics.update(fs)
            ks_fs = sorted(set(options.fewshot.ks))
            if fs.get("fewshot_concepts"):
                res.fewshot = {m: [fs[f"fewshot_{m}_map@{k}"] for k in ks_fs] for m in options.fewshot.methods}
        if "detection" in options.sections:
            res.metrics.update(detection.chance(train.concepts, test.concepts))
    return res


def _unique_names(run_dirs: list[Path]) -> list[str]:
    names = [p.name for p in run_dirs]
    return [f"{p.parent.name}/{p.name}" if names.count(p.name) > 1 else p.name for p in run_dirs]


def _write_concepts_csv(path: Path, columns: dict[str, ColumnResult]) -> Path | None:
    with_concepts = {n: c.concepts for n, c in columns.items() if c.concepts is not None and c.concepts.concept_rows}
    if not with_concepts:
        return None
    first = next(iter(with_concepts.values()))
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["concept_id", "name", "positives", *(f"{n}_{m}" for n in with_concepts for m in ("auroc", "ap"))])
        for i, cid in enumerate(first.concept_ids):
            row = [cid, first.concept_names[i], first.positives[i]]
            for z in with_concepts.values():
                row += [f"{100 * z.auroc[i]:.2f}", f"{100 * z.ap[i]:.2f}"]
            w.writerow(row)
    return path


def run_eval(
    run_dirs: list,
    split: str = "test",
    ks: list[int] | tuple[int, ...] = (1, 5, 10),
    out_dir: Path | None = None,
    options: EvalOptions | None = None,
) -> dict:
    """Evaluate runs (and their baselines) on one split; write metrics.json, report.md, plots.

    `run_dirs`: run folders, unfreezing run folders, fine-tuned checkpoints or loaded runs. With
    `options.data` each run is scored on that dataset's raw images and captions, encoded by the
    run's own backbone (the fine-tuned one for a checkpoint) instead of on the run's cache.
    `metrics.json` holds the first run's flat numbers; `comparison.json` every column's.
    Returns {"columns", "metrics", "out_dir", "metrics_path", "report", "plots", "examples",
    "split", "pool_images", "pool_captions"}.
    """
    from medembed.adapt.run import fit_closed_form  # the adapt phase: imported where used
    from medembed.evaluate.sources import eval_splits, open_runs

    options = options or EvalOptions()
    ks = sorted({int(k) for k in ks})
    if not run_dirs:
        raise ValueError("eval needs at least one --run")
    if not ks or ks[0] < 1:
        raise ValueError(f"--k values must be positive integers, got {ks}")
    data, wanted = options.data, None
    if data is not None:
        needs_train = options.closed_form or bool({"fewshot", "detection"} & set(options.sections))
        data, wanted = eval_splits(data, split, needs_train)
    runs = open_runs(list(run_dirs), data, wanted, options.features_root, progress=options.progress)
    names = _unique_names([r.run_dir for r in runs])
    out_dir = Path(out_dir) if out_dir else runs[0].run_dir / f"eval-{split}"
    out_dir.mkdir(parents=True, exist_ok=True)

    pairs: dict[Path, SplitPair] = {}
    for run in runs:
        fd = Path(run.features_dir)
        if fd not in pairs:
            pairs[fd] = load_pair(fd, split)
    first = pairs[Path(runs[0].features_dir)]

    columns: dict[str, ColumnResult] = {"chance": chance_column(first, ks, options)}
    for fd, pair in pairs.items():
        if not options.closed_form or pair.train is None:
            continue
        owner = next(r for r in runs if Path(r.features_dir) == fd)
        label = "closed-form" if len(pairs) == 1 else f"closed-form ({pair.test.attrs.get('backbone', fd.name)})"
        image_head, text_head = fit_closed_form(pair.train, owner.dim)
        columns[label], _, _ = evaluate_model(model_from_heads(label, image_head, text_head), pair, ks, options)
    primary_emb = None
    for name, run in zip(names, runs):
        pair = pairs[Path(run.features_dir)]
        diffs = backbone_differences(pair.test.attrs, run.config.get("cache", {}))
        if run.config.get("cache") and diffs:  # e.g. the cache was rebuilt with another backbone since training
            raise ProvenanceMismatch(pair.test.path, diffs)
        columns[name], img, txt = evaluate_model(model_from_run(run, name), pair, ks, options)
        if primary_emb is None:
            primary_emb = (img, txt)

    flat = {n: c.metrics for n, c in columns.items()}
    metrics_path = write_metrics(out_dir / "metrics.json", flat[names[0]])
    plots: dict[str, Path] = {}
    if any(c.recall for c in columns.values()):
        cks = curve_ks(ks, max(first.test.n_images, first.test.n_captions))
        plots["recall"] = recall_curves({n: c.recall for n, c in columns.items() if c.recall}, cks,
                                        out_dir / "recall_at_k.png", title=f"{split}: {first.test.n_images} images")
    if any(c.fewshot for n, c in columns.items() if n != "chance"):
        plots["fewshot"] = fewshot_curves({n: c.fewshot for n, c in columns.items() if c.fewshot},
                                          sorted(set(options.fewshot.ks)), out_dir / "fewshot.png")
    examples = []
    if options.examples and primary_emb is not None:
        examples = write_examples(pairs[Path(runs[0].features_dir)].test, *primary_emb, out_dir, options.examples)
    concepts_csv = _write_concepts_csv(out_dir / "zeroshot_concepts.csv", columns)

    test = first.test
    primary_zs = columns[names[0]].concepts
    context = {
        "dataset": test.attrs.get("dataset", first.features_dir.parent.name),
        "split": split,
        "features_dir": str(first.features_dir),
        "backbone": test.attrs.get("backbone", ""),
        "runs": [f"{n} ({r.config.get('head', '?')}, {r.config.get('loss', '?')}, dim {r.dim}"
                 + (f"; fine-tuned backbone {r.backbone.name} from {r.checkpoint}" if r.checkpoint else "") + ")"
                 for n, r in zip(names, runs)],
        "pool_images": test.n_images,
        "pool_captions": test.n_captions,
        "templates": len(test.templates),
        "min_positives": options.zeroshot.min_positives,
        "modality_classes": [(m.label, m.concept_id, n) for m, n in primary_zs.modality_classes] if primary_zs else [],
        "modality_note": primary_zs.modality_note if primary_zs else "",
        "concepts_csv": concepts_csv,
        "fewshot_seeds": options.fewshot.seeds,
        "fewshot_concepts": int(flat[names[0]].get("fewshot_concepts", 0)),
        "fewshot_min_train": max(options.fewshot.ks),
        "fewshot_min_test": options.fewshot.min_test_positives,
        "fewshot_max_concepts": options.fewshot.max_concepts,
        "notes": _notes(first, test),
    }
    report_path = out_dir / "report.md"
    report_path.write_text(markdown_report(flat, context, plots, examples, out_dir))
    (out_dir / "comparison.json").write_text(json.dumps({
        "split": split,
        "features_dir": str(first.features_dir),
        "runs": {n: str(r.checkpoint or r.run_dir) for n, r in zip(names, runs)},
        "seconds": {n: round(c.seconds, 2) for n, c in columns.items()},
        "columns": {n: {k: (None if v != v else v) for k, v in m.items()} for n, m in flat.items()},
    }, indent=2) + "\n")
    return {
        "columns": flat,
        "metrics": flat[names[0]],
        "out_dir": out_dir,
        "metrics_path": metrics_path,
        "report": report_path,
        "plots": plots,
        "examples": examples,
        "split": split,
        "pool_images": test.n_images,
        "pool_captions": test.n_captions,
    }


def _notes(pair: SplitPair, test: CachedSplit) -> dict[str, list[str]]:
    notes = {k: list(v) for k, v in pair.notes.items()}
    if not _has_concepts(test):
        for section in ("zeroshot", "fewshot", "detection"):
            notes.setdefault(section, []).append("this split carries no concept labels: section skipped")
    elif test.concept_text_features is None:
        notes.setdefault("zeroshot", []).append("the cache has no concept prompt features: zero-shot skipped")
    return notes
