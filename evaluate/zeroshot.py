"""Concept zero-shot: does an image embedding sit closer to the prompts of the concepts it carries?

`compute(...) -> dict` and `chance(...) -> dict` of flat named numbers, and `METRIC`, the section
`eval` scores with them (registered in `evaluate.metrics`); `score(...)` keeps the per-concept
numbers (the report's CSV) and per-image outcomes (its intervals and paired differences).

Each named concept is scored by the cosine between the image embedding and the concept's
prompt-ensemble embedding. Two views of the same scores:
- per concept, a ranking of all images: AUROC and average precision, averaged over concepts with
  at least `min_positives` positive images (fewer makes AP mostly noise);
- per image, a single-label choice among imaging modalities, on images that carry exactly one
  of them: the question a radiologist's search filter asks first.
Unnamed concepts ("" name) are left out: their prompts were encoded from an id, not words.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import torch

from medembed.common.errors import BadOption
from medembed.common.modalities import DEFAULT_MODALITIES, ModalityClass
from medembed.common.ranking import average_precision, roc_auc
from medembed.common.stats import rate_interval
from medembed.evaluate.metric import ColumnInputs, Metric, Needs, Scores, SectionView
from medembed.evaluate.tables import markdown_table


def parse_modality_concepts(spec: str) -> tuple[ModalityClass, ...]:
    """`"CT=C0040405,MRI=C0024485"` or just `"C0040405,C0024485"` (the id doubles as label)."""
    out = []
    for i, item in enumerate(x.strip() for x in spec.split(",")):
        if not item:
            continue
        label, _, cid = item.rpartition("=")
        if not cid:
            raise BadOption(f"--modality-concepts item {i + 1} ({item!r}): expected LABEL=CONCEPT_ID or CONCEPT_ID")
        out.append(ModalityClass(label.strip() or cid.strip(), cid.strip()))
    if not out:
        raise BadOption(f"--modality-concepts {spec!r}: no concepts given")
    return tuple(out)


@dataclass
class ZeroShotConfig:
    min_positives: int = 5  # concepts with fewer positive images are left out of AUROC / mAP
    modalities: tuple[ModalityClass, ...] = DEFAULT_MODALITIES
    min_modality_images: int = 5  # modality classes with fewer images in the split are dropped
    memory_mb: float = 256


@dataclass
class ZeroShotResult:
    concept_rows: list[int]  # columns evaluated
    concept_ids: list[str]
    concept_names: list[str]
    positives: list[int]
    auroc: list[float]
    ap: list[float]
    modality_classes: list[tuple[ModalityClass, int]] = field(default_factory=list)  # (class, images used)
    modality_images: int = 0
    modality_correct: int = 0
    modality_note: str = ""
    modality_hits: np.ndarray | None = None  # per modality image: was the choice right (for intervals)

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {
            "zeroshot_concepts": len(self.concept_rows),
            "zeroshot_concept_map": 100 * float(np.mean(self.ap)) if self.ap else float("nan"),
            "zeroshot_concept_auroc": 100 * float(np.mean(self.auroc)) if self.auroc else float("nan"),
        }
        if self.modality_images:
            out["zeroshot_modality_acc"] = 100 * self.modality_correct / self.modality_images
            if self.modality_hits is not None:
                out["zeroshot_modality_acc_ci_low"], out["zeroshot_modality_acc_ci_high"] = rate_interval(self.modality_hits)
        out["zeroshot_modality_images"] = self.modality_images
        out["zeroshot_modality_classes"] = len(self.modality_classes)
        return out


def _column_counts(labels: sp.csr_matrix) -> np.ndarray:
    return np.asarray(labels.sum(0)).ravel().astype(int)


def eligible_concepts(labels: sp.csr_matrix, concept_names: list[str], min_positives: int) -> list[int]:
    """Named concepts with >= min_positives positives and at least one negative in the split."""
    n = labels.shape[0]
    counts = _column_counts(labels)
    return [c for c, name in enumerate(concept_names) if name and min_positives <= counts[c] < n]


def modality_subset(
    labels: sp.csr_matrix,
    concept_ids: list[str],
    concept_names: list[str],
    modalities: tuple[ModalityClass, ...],
    min_images: int,
) -> tuple[list[tuple[ModalityClass, int]], np.ndarray, np.ndarray, str]:
    """Modality classes kept, the rows of images carrying exactly one of them, and each row's class.

    Returns (classes with their image counts, image rows, class index per row, note on dropped ones).
    """
    col = {c: i for i, c in enumerate(concept_ids)}
    counts = _column_counts(labels)
    kept: list[ModalityClass] = []
    dropped = []
    for m in modalities:
        j = col.get(m.concept_id)
        if j is None:
            dropped.append(f"{m.label} ({m.concept_id}): not in the concept vocabulary")
        elif not concept_names[j]:
            dropped.append(f"{m.label} ({m.concept_id}): concept has no name to prompt with")
        elif counts[j] < min_images:
            dropped.append(f"{m.label} ({m.concept_id}): {counts[j]} image{'' if counts[j] == 1 else 's'} < {min_images}")
        else:
            kept.append(m)
    if not kept:
        return [], np.zeros(0, int), np.zeros(0, int), "; ".join(dropped)
    cols = [col[m.concept_id] for m in kept]
    sub = labels[:, cols].toarray() > 0  # [N, K]
    rows = np.flatnonzero(sub.sum(1) == 1)
    truth = sub[rows].argmax(1)
    per_class = np.bincount(truth, minlength=len(kept))
    return [(m, int(c)) for m, c in zip(kept, per_class)], rows, truth, "; ".join(dropped)


@torch.no_grad()
def score(
    image_emb: torch.Tensor,
    concept_emb: torch.Tensor,
    labels: sp.csr_matrix,
    concept_ids: list[str],
    concept_names: list[str],
    config: ZeroShotConfig | None = None,
) -> ZeroShotResult:
    """Per-concept AUROC / AP and the modality choice. image_emb [N, D] and concept_emb [C, D]
    unit vectors; labels [N, C] multi-hot."""
    cfg = config or ZeroShotConfig()
    labels = sp.csr_matrix(labels)
    n = image_emb.shape[0]
    if labels.shape != (n, concept_emb.shape[0]):
        raise ValueError(f"labels are {labels.shape} but there are {n} images and {concept_emb.shape[0]} concepts")
    cols = eligible_concepts(labels, concept_names, cfg.min_positives)
    counts = _column_counts(labels)
    labels_csc = labels.tocsc()
    img = image_emb.float()
    # score a block of concepts over all images at a time: the ranking passes hold about 64 bytes per
    # (image, concept) cell, so N x block cells stay within memory_mb
    block = max(1, int(cfg.memory_mb * 2**20 // (max(n, 1) * 64)))
    aurocs: list[float] = []
    aps: list[float] = []
    for s in range(0, len(cols), block):
        cb = cols[s : s + block]
        scores = img @ concept_emb[cb].float().T
        truth = torch.from_numpy(labels_csc[:, cb].toarray() > 0)
        aurocs += roc_auc(scores, truth).tolist()
        aps += average_precision(scores, truth).tolist()
    result = ZeroShotResult(
        concept_rows=cols,
        concept_ids=[concept_ids[c] for c in cols],
        concept_names=[concept_names[c] for c in cols],
        positives=[int(counts[c]) for c in cols],
        auroc=aurocs,
        ap=aps,
    )
    classes, rows, truth, note = modality_subset(labels, concept_ids, concept_names, cfg.modalities, cfg.min_modality_images)
    result.modality_note = note
    if len(classes) < 2:
        result.modality_note = "; ".join(x for x in (note, "fewer than 2 modality classes left: no accuracy") if x)
        result.modality_classes = classes
        return result
    col = {c: i for i, c in enumerate(concept_ids)}
    class_emb = concept_emb[[col[m.concept_id] for m, _ in classes]].float()
    pred = (img[torch.as_tensor(rows, dtype=torch.long)] @ class_emb.T).argmax(1).numpy()
    result.modality_classes = classes
    result.modality_images = int(len(rows))
    result.modality_correct = int((pred == truth).sum())
    result.modality_hits = pred == truth
    return result


def compute(
    image_emb: torch.Tensor,
    concept_emb: torch.Tensor,
    labels: sp.csr_matrix,
    concept_ids: list[str],
    concept_names: list[str],
    config: ZeroShotConfig | None = None,
) -> dict[str, float]:
    """Flat numbers: mean concept AUROC / mAP over eligible concepts, modality accuracy (see `score`)."""
    return score(image_emb, concept_emb, labels, concept_ids, concept_names, config).metrics()


# --- chance -------------------------------------------------------------------------------------


def expected_random_ap(positives: int, total: int) -> float:
    """Expected average precision of a uniformly random ranking (no ties) of `total` items.

    The positive at a uniform rank r sees (r-1)(R-1)/(N-1) other positives above it on average,
    so E[AP] = (1/N) * (H_N + (R-1)(N - H_N)/(N-1)), H_N the harmonic number. Tends to R/N.
    """
    r, n = positives, total
    if r <= 0 or n <= 0:
        return float("nan")
    h = sum(1.0 / i for i in range(1, n + 1)) if n < 10_000 else math.log(n) + 0.5772156649 + 1 / (2 * n)
    if n == 1:
        return 1.0
    return (h + (r - 1) * (n - h) / (n - 1)) / n


def chance(
    labels: sp.csr_matrix,
    concept_ids: list[str],
    concept_names: list[str],
    config: ZeroShotConfig | None = None,
) -> dict[str, float]:
    """Numbers a random scorer gets on the same concepts and modality images."""
    cfg = config or ZeroShotConfig()
    labels = sp.csr_matrix(labels)
    n = labels.shape[0]
    cols = eligible_concepts(labels, concept_names, cfg.min_positives)
    counts = _column_counts(labels)
    aps = [expected_random_ap(int(counts[c]), n) for c in cols]
    classes, rows, _, _ = modality_subset(labels, concept_ids, concept_names, cfg.modalities, cfg.min_modality_images)
    out: dict[str, float] = {
        "zeroshot_concepts": len(cols),
        "zeroshot_concept_map": 100 * float(np.mean(aps)) if aps else float("nan"),
        "zeroshot_concept_auroc": 50.0 if cols else float("nan"),
    }
    if len(classes) >= 2:
        out["zeroshot_modality_acc"] = 100.0 / len(classes)
        out["zeroshot_modality_images"] = int(len(rows))
    else:
        out["zeroshot_modality_images"] = 0
    out["zeroshot_modality_classes"] = len(classes)
    return out


# --- the eval section ---------------------------------------------------------------------------


def _score(inputs: ColumnInputs, cfg: ZeroShotConfig) -> Scores:
    test = inputs.test
    result = score(inputs.images(), inputs.concept_prompts(), test.concepts, test.concept_ids, test.concept_names, cfg)
    hits = {"zeroshot_modality_acc": result.modality_hits} if result.modality_hits is not None else {}
    return Scores(result.metrics(), hits=hits, detail=result)


def _chance(inputs: ColumnInputs, cfg: ZeroShotConfig) -> Scores:
    test = inputs.test
    return Scores(chance(test.concepts, test.concept_ids, test.concept_names, cfg))


def _report(view: SectionView[ZeroShotConfig]) -> list[str]:
    out = [f"## {view.title}", ""]
    if not view.keys:
        return out + view.notes
    out += [f"Cosine between image embedding and each named concept's prompt-ensemble embedding "
            f"({len(view.test.templates)} templates). mAP and AUROC (in %) over concepts with at least "
            f"{view.settings.min_positives} positive images in the split.", ""]
    z = view.details.get(view.first)
    if isinstance(z, ZeroShotResult) and z.modality_classes:
        out += ["Modality accuracy: single-label choice among " + ", ".join(
            f"{m.label} ({m.concept_id}: {n} images)" for m, n in z.modality_classes) +
            "; images carrying exactly one of them.", ""]
    if isinstance(z, ZeroShotResult) and z.modality_note:
        out += [f"Modality classes left out: {z.modality_note}.", ""]
    if "table" in view.files:
        out += [f"Per-concept AUROC and AP: `{view.files['table']}`.", ""]
    return out + [markdown_table(view.columns, view.keys), ""]


METRIC = Metric(
    section="zeroshot", title="Concept zero-shot", name="zero-shot", keys=r"zeroshot_\w+",
    headline=r"zeroshot_(modality_acc|concept_map)", score=_score, chance=_chance,
    needs=Needs(concepts=True, prompts=True), report=_report,
)
