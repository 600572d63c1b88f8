"""Concept zero-shot, few-shot and ImageCLEF detection F1 on tiny deterministic sets with hand-computed answers."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from medembed.common.modalities import ModalityClass
from medembed.evaluate import detection, fewshot, zeroshot


def _unit(rows) -> torch.Tensor:
    x = torch.tensor(rows, dtype=torch.float32)
    return x / x.norm(dim=1, keepdim=True)


# --- zero-shot ------------------------------------------------------------------------------------

# image i sits at (s_i, sqrt(1 - s_i^2)); concept A = (1, 0) scores s_i, concept B = (0, 1) the other coordinate
S = [0.9, 0.5, 0.1, -0.3]
IMAGES = torch.tensor([[s, math.sqrt(1 - s * s)] for s in S], dtype=torch.float32)
CONCEPTS = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
LABELS = sp.csr_matrix(np.array([
    # A  B  unnamed  rare
    [1, 0, 1, 0],
    [0, 1, 0, 0],
    [1, 0, 1, 1],
    [0, 1, 0, 0],
], dtype=np.float32))
IDS = ["A", "B", "C3", "D"]
NAMES = ["finding a", "finding b", "", "finding d"]


def test_zeroshot_auroc_and_ap_by_hand():
    res = zeroshot.score(IMAGES, CONCEPTS, LABELS, IDS, NAMES, zeroshot.ZeroShotConfig(min_positives=2))
    # unnamed C3 and D (1 positive) are left out
    assert res.concept_ids == ["A", "B"]
    # A: scores .9(P) .5(N) .1(P) -.3(N): 3 of 4 pos/neg pairs ordered -> AUROC .75; AP = (1/1 + 2/3)/2
    # B: scores .436(N) .866(P) .995(N) .954(P): AUROC 2/4; AP = (1/2 + 2/3)/2
    assert res.auroc == pytest.approx([0.75, 0.5])
    assert res.ap == pytest.approx([(1 + 2 / 3) / 2, (1 / 2 + 2 / 3) / 2])
    m = res.metrics()
    assert m["zeroshot_concept_map"] == pytest.approx(100 * ((1 + 2 / 3) / 2 + (1 / 2 + 2 / 3) / 2) / 2)
    assert m["zeroshot_concept_auroc"] == pytest.approx(62.5)
    assert m["zeroshot_concepts"] == 2


def test_zeroshot_memory_blocks_do_not_change_results():
    a = zeroshot.score(IMAGES, CONCEPTS, LABELS, IDS, NAMES, zeroshot.ZeroShotConfig(min_positives=2))
    b = zeroshot.score(IMAGES, CONCEPTS, LABELS, IDS, NAMES, zeroshot.ZeroShotConfig(min_positives=2, memory_mb=1e-6))
    assert a.ap == b.ap and a.auroc == b.auroc


def _modality_set():
    """12 images; CT on 0-5, ultrasound on 5-10 (image 5 has both), PET on 0 and 11 (2 images: dropped)."""
    ids = ["C0040405", "C0041618", "C0032743", "C0002978"]
    names = ["X-Ray Computed Tomography", "Ultrasonography", "Positron-Emission Tomography", "Angiogram"]
    y = np.zeros((12, 4), dtype=np.float32)
    y[0:6, 0] = 1
    y[5:11, 1] = 1
    y[[0, 11], 2] = 1
    concept_emb = torch.eye(4)
    # CT images point at CT except image 4, which points at ultrasound (and a little at PET)
    img = torch.zeros(12, 4)
    img[0:6, 0] = 1
    img[4] = _unit([[0.0, 1.0, 0.2, 0.0]])[0]
    img[6:11, 1] = 1
    img[11, 2] = 1
    return img, concept_emb, sp.csr_matrix(y), ids, names


def test_modality_accuracy_single_label_images_only():
    img, concept_emb, labels, ids, names = _modality_set()
    res = zeroshot.score(img, concept_emb, labels, ids, names)
    used = [(m.label, m.concept_id, n) for m, n in res.modality_classes]
    # image 5 carries two modalities and is left out; 5 CT + 5 ultrasound remain, one CT image is wrong
    assert used == [("CT", "C0040405", 5), ("ultrasound", "C0041618", 5)]
    assert res.modality_images == 10
    assert res.metrics()["zeroshot_modality_acc"] == pytest.approx(90.0)
    assert "MRI (C0024485): not in the concept vocabulary" in res.modality_note
    assert "PET (C0032743): 2 images < 5" in res.modality_note
    assert "angiogram (C0002978): 0 images < 5" in res.modality_note
    chance = zeroshot.chance(labels, ids, names)
    assert chance["zeroshot_modality_acc"] == 50.0 and chance["zeroshot_modality_images"] == 10


def test_modality_concepts_are_configurable():
    img, concept_emb, labels, ids, names = _modality_set()
    classes = zeroshot.parse_modality_concepts("CT=C0040405, C0032743")
    assert classes == (ModalityClass("CT", "C0040405"), ModalityClass("C0032743", "C0032743"))
    res = zeroshot.score(img, concept_emb, labels, ids, names, zeroshot.ZeroShotConfig(modalities=classes, min_modality_images=2))
    # CT alone on 0-5 except image 0 (also PET); PET alone on 11
    assert [(m.concept_id, n) for m, n in res.modality_classes] == [("C0040405", 5), ("C0032743", 1)]
    # image 4 now leans to PET (0.2 > 0): 5 of the 6 single-label images right
    assert res.metrics()["zeroshot_modality_acc"] == pytest.approx(100 * 5 / 6)
    with pytest.raises(ValueError, match="item 1"):
        zeroshot.parse_modality_concepts("CT=")


def test_expected_random_ap_matches_enumeration():
    for n, r in ((5, 2), (6, 3), (4, 1), (3, 3)):
        aps = []
        for pos in itertools.combinations(range(n), r):
            hits = 0
            precisions = []
            for rank in range(1, n + 1):
                if rank - 1 in pos:
                    hits += 1
                    precisions.append(hits / rank)
            aps.append(np.mean(precisions))
        assert zeroshot.expected_random_ap(r, n) == pytest.approx(np.mean(aps))


# --- few-shot -------------------------------------------------------------------------------------


def _clusters(n: int, seed: int, extra: bool = True):
    """Concept j on the rows whose embedding leans to axis j (rows cycle through 0, 1, 2); with
    `extra`, rows 0, 1 and 3 also carry concept 2, which their embedding does not show."""
    rng = np.random.default_rng(seed)
    which = np.arange(n) % 3
    x = 0.05 * rng.standard_normal((n, 4))
    x[which == 0, 0] += 1
    x[which == 1, 1] += 1
    x[which == 2, 2] += 1
    y = np.zeros((n, 3), dtype=np.float32)
    y[which == 0, 0] = 1
    y[which == 1, 1] = 1
    y[which == 2, 2] = 1
    if extra:
        y[:4, 2] = 1
    emb = torch.from_numpy(x).float()
    return emb / emb.norm(dim=1, keepdim=True), sp.csr_matrix(y)


def test_choose_concepts_by_frequency_with_thresholds():
    rows = [[1, 1, 1, 0]] * 20 + [[1, 0, 0, 0]] * 10 + [[0, 0, 1, 1]] * 5 + [[0, 0, 0, 0]] * 20
    train = sp.csr_matrix(np.array(rows, dtype=np.float32))
    test = sp.csr_matrix(np.array([[1, 1, 1, 1]] * 3 + [[0, 0, 0, 0]] * 3, dtype=np.float32))
    # train counts 30, 20, 25, 5 of 55; concept 3 has < 16 train positives; cap at 2 keeps the 2 most frequent
    assert fewshot.choose_concepts(train, test, 16, 10, 3) == [0, 2, 1]
    assert fewshot.choose_concepts(train, test, 16, 2, 3) == [0, 2]
    assert fewshot.choose_concepts(train, test, 16, 10, 4) == []  # only 3 test positives
    assert fewshot.choose_concepts(train, test, 21, 10, 3) == [0, 2]  # concept 1 has 20 < 21 positives
    assert fewshot.choose_concepts(train, test, 26, 10, 3) == []  # concept 0: 30 positives but 25 negatives


def test_fewshot_separable_concepts_reach_full_map():
    xtr, ytr = _clusters(90, seed=0, extra=False)
    xte, yte = _clusters(30, seed=1, extra=False)
    cfg = fewshot.FewShotConfig(ks=(1, 16), seeds=2, max_concepts=5, min_test_positives=5, methods=fewshot.METHODS)
    res = fewshot.score(xtr, ytr, xte, yte, torch.eye(3, 4), ["a", "b", "c"], cfg)
    assert res.concept_rows == [0, 1, 2]  # 30 positives each: ties keep column order
    for method in ("logreg", "prototype", "tip_adapter"):
        assert res.curve(method) == pytest.approx([100.0, 100.0]), method
    assert res.curve("lightgbm")[-1] == pytest.approx(100.0)
    m = res.metrics()
    assert m["fewshot_map@16"] == pytest.approx(100.0) and m["fewshot_concepts"] == 3
    assert fewshot.chance(ytr, yte, cfg)["fewshot_map@16"] == pytest.approx(100 * zeroshot.expected_random_ap(10, 30))
    # the same seeds draw the same supports: a rerun gives identical numbers
    assert np.array_equal(fewshot.score(xtr, ytr, xte, yte, torch.eye(3, 4), ["a", "b", "c"], cfg).ap, res.ap)


def test_fewshot_chance_is_expected_random_ap():
    xtr, ytr = _clusters(90, seed=0)
    _, yte = _clusters(30, seed=1)
    c = fewshot.chance(ytr, yte, fewshot.FewShotConfig(ks=(1, 16), max_concepts=5, methods=fewshot.METHODS))
    # test set: concept 2 on 10 + 4 rows (row 0..3 overlap: rows 0,1,3 are extra), concepts 0/1 on 10 rows each
    counts = np.asarray(yte.sum(0)).ravel()
    expected = 100 * np.mean([zeroshot.expected_random_ap(int(counts[j]), 30) for j in (2, 0, 1)])
    assert c["fewshot_map@1"] == pytest.approx(expected) and c["fewshot_lightgbm_map@16"] == pytest.approx(expected)


def test_fewshot_uninformative_features_stay_near_chance():
    rng = np.random.default_rng(3)
    _, ytr = _clusters(300, seed=0)
    _, yte = _clusters(300, seed=1)
    noise_tr = torch.from_numpy(rng.standard_normal((300, 16))).float()
    noise_te = torch.from_numpy(rng.standard_normal((300, 16))).float()
    cfg = fewshot.FewShotConfig(ks=(4,), seeds=3, methods=("logreg", "prototype"))
    res = fewshot.score(noise_tr, ytr, noise_te, yte, None, None, cfg)
    chance = fewshot.chance(ytr, yte, cfg)["fewshot_map@4"]
    assert abs(res.curve("logreg")[0] - chance) < 10
    assert abs(res.curve("prototype")[0] - chance) < 10


# --- detection (ImageCLEF F1) ---------------------------------------------------------------------


def test_f1_per_image_as_imageclef_scores_it():
    cols = {"a": 0, "b": 1, "c": 2}
    gold = [{"a", "b"}, {"a"}, set(), set(), {"c"}]
    pred = [{"a"}, {"a", "c"}, set(), {"b"}, set()]

    def dense(sets):
        m = np.zeros((len(sets), 3), dtype=np.float32)
        for i, s in enumerate(sets):
            for c in s:
                m[i, cols[c]] = 1
        return sp.csr_matrix(m)

    # {a,b} vs {a}: 2*1/3; {a} vs {a,c}: 2*1/3; empty vs empty: 1; empty gold vs {b}: 0; {c} vs empty: 0
    expected = [2 / 3, 2 / 3, 1.0, 0.0, 0.0]
    assert detection.f1_per_image(dense(gold), dense(pred)) == pytest.approx(expected)
    assert detection.imageclef_f1(gold, pred) == pytest.approx(np.mean(expected))


def test_detection_learns_separable_concepts():
    xtr, ytr = _clusters(300, seed=0)
    xte, yte = _clusters(90, seed=1)
    for predictor in ("logreg", "knn"):
        res = detection.score(xtr, ytr, xte, yte, detection.DetectionConfig(predictors=(predictor,)))
        assert res.concepts_modelled == 3 and res.predictor == predictor
        # each image's main concept is predictable from its embedding; rows 0, 1 and 3 also carry
        # concept 2, which their embedding does not show: F1 2/3 there, 1 elsewhere
        assert res.f1 == pytest.approx((87 + 3 * 2 / 3) / 90), predictor
        assert res.mean_predicted == pytest.approx(1.0)
    # with a valid split the settings are chosen there, and both predictors are reported when asked for
    xva, yva = _clusters(60, seed=2)
    assert detection.DetectionConfig().predictors == ("knn",)  # the default: the better one on roco-rad
    m = detection.compute(xtr, ytr, xte, yte, detection.DetectionConfig(predictors=("logreg", "knn")), valid=(xva, yva))
    assert m["concept_f1_logreg"] == pytest.approx(100 * (87 + 3 * 2 / 3) / 90)
    assert m["concept_f1_knn"] == pytest.approx(100 * (87 + 3 * 2 / 3) / 90)


def _labelled(n: int, rng, proj: np.ndarray, noise: float):
    """Multi-hot labels over 8 concepts and embeddings that show them through `proj`, plus noise."""
    y = (rng.random((n, 8)) < 0.25).astype(np.float32)
    x = torch.from_numpy(y @ proj + noise * rng.standard_normal((n, proj.shape[1]))).float()
    return x / x.norm(dim=1, keepdim=True), sp.csr_matrix(y)


def _normed(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True)


def test_detection_settings_chosen_with_other_embeddings():
    """A refit run's detectors: settings chosen with another model's train and valid embeddings
    (its heads as valid chose them), the predictor then fitted on this model's own train embeddings."""
    rng = np.random.default_rng(0)
    proj = rng.standard_normal((8, 16))
    (xtr, ytr), (xva, yva), (xte, yte) = (_labelled(n, rng, proj, 1.0) for n in (400, 120, 150))
    cfg = detection.DetectionConfig()
    plain = detection.score(xtr, ytr, xte, yte, cfg, valid=(xva, yva))
    # tuning with the model's own embeddings is the plain choice
    same = detection.score(xtr, ytr, xte, yte, cfg, valid=(xva, yva), tuning=(xtr, xva))
    assert same == plain
    # another model's embeddings of the same train and valid images (here: much noisier) choose the settings
    other_tr = _normed(xtr + 0.6 * torch.from_numpy(rng.standard_normal(tuple(xtr.shape))).float())
    other_va = _normed(xva + 0.6 * torch.from_numpy(rng.standard_normal(tuple(xva.shape))).float())
    chooser = detection.score(other_tr, ytr, xte, yte, cfg, valid=(other_va, yva))
    apart = detection.score(xtr, ytr, xte, yte, cfg, valid=(xva, yva), tuning=(other_tr, other_va))
    assert (apart.threshold, apart.fallback, apart.neighbours, apart.sharpness) == (
        chooser.threshold, chooser.fallback, chooser.neighbours, chooser.sharpness)
    assert (apart.threshold, apart.neighbours) != (plain.threshold, plain.neighbours)  # the choice did move
    # ... and the test images are scored by propagation from this model's train embeddings, by hand:
    top, rows = (xte @ xtr.T).topk(apart.neighbours, dim=1)
    votes = torch.softmax(apart.sharpness * top, dim=1)
    scores = torch.zeros(len(xte), 8)
    for i in range(len(xte)):
        scores[i] = (votes[i, :, None] * torch.from_numpy(ytr[rows[i].numpy()].toarray())).sum(0)
    pred = detection.decide(scores, apart.threshold, apart.fallback).numpy().astype(np.float32)
    assert apart.f1 == pytest.approx(float(detection.f1_per_image(yte, sp.csr_matrix(pred)).mean()), abs=1e-6)
    m = detection.compute(xtr, ytr, xte, yte, cfg, valid=(xva, yva), tuning=(other_tr, other_va))
    assert m["concept_f1_tuned_apart"] == 1.0 and m["concept_f1"] == pytest.approx(100 * apart.f1)
    with pytest.raises(ValueError, match="tuning embeddings cover 399 train"):
        detection.score(xtr, ytr, xte, yte, cfg, valid=(xva, yva), tuning=(other_tr[:-1], other_va))


def test_detection_chance_matches_its_expectation():
    # every image has exactly one of 3 concepts, each at train frequency 1/3: guessing each concept
    # with p=1/3 gives E[F1] = 1/3 * sum_j P(j of the 2 others guessed) * 2/(2+j) = 0.26543
    y = sp.csr_matrix(np.eye(3, dtype=np.float32)[np.arange(3000) % 3])
    c = detection.chance(y, y, draws=5)
    assert c["concept_f1"] == pytest.approx(100 * (1 / 3) * (4 / 9 * 1 + 4 / 9 * 2 / 3 + 1 / 9 * 1 / 2), abs=1.0)
