"""The embedded phantom dataset: reproducible to the byte, consistent with its captions, and learnable."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medembed.extract.datasets import load_dataset
from medembed.extract.synthetic import (
    CONCEPTS,
    MODALITY_CUI,
    default_dataset_dir,
    ensure_default_dataset,
    is_complete,
    make_phantoms,
)


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_bytes_other_seed_differs(tmp_path: Path) -> None:
    a = folder_bytes(make_phantoms(tmp_path / "a", n_images=20, size=64, seed=3))
    b = folder_bytes(make_phantoms(tmp_path / "b", n_images=20, size=64, seed=3))
    c = folder_bytes(make_phantoms(tmp_path / "c", n_images=20, size=64, seed=4))
    assert a == b
    assert len([k for k in a if k.startswith("images/")]) == 20
    assert {"README.md", "SYNTHETIC", "cui_names.csv", "train_captions.csv", "test_concepts.csv"} <= set(a)
    assert a["images/PHANTOM_00001.png"] != c["images/PHANTOM_00001.png"]
    make_phantoms(tmp_path / "a", n_images=12, size=64, seed=3)  # regenerating smaller leaves no stale images
    assert len(list((tmp_path / "a" / "images").iterdir())) == 12


def test_loads_as_synthetic_imageclef2023(tmp_path: Path) -> None:
    folder = make_phantoms(tmp_path / "synthetic-phantoms", n_images=40, size=48, seed=0)
    ds = load_dataset(folder)
    assert (ds.name, ds.layout, ds.synthetic, ds.warnings) == ("synthetic-phantoms", "imageclef2023", True, [])
    assert {s: len(ds.split(s)) for s in ds.splits} == {"train": 28, "valid": 6, "test": 6}
    assert ds.concept_names == CONCEPTS
    assert "SYNTHETIC" in (folder / "README.md").read_text()
    for r in ds.records:
        with Image.open(r.image) as img:
            assert img.size == (48, 48) and img.mode == "L"
        assert set(r.concepts) <= set(CONCEPTS)


MODALITY_WORDS = {
    "C0040405": r"\bct\b|computed tomography",
    "C0024485": r"\bmri?\b|magnetic resonance",
    "C0041618": r"ultrasound|sonography",
    "C1306645": r"radiograph|x-ray",
}
COUNT_WORDS = {"SYN0011": r"\b(a single|one)\b", "SYN0012": r"\b(two|2)\b", "SYN0013": r"\b(three|3)\b"}
ORGAN_WORDS = {"SYN0001": "brain", "SYN0002": "lung", "SYN0003": "kidney", "SYN0004": "liver"}
SIDE_WORDS = {"SYN0020": "left", "SYN0021": "right", "SYN0022": "upper", "SYN0023": "lower"}


def test_captions_say_what_the_concepts_say(tmp_path: Path) -> None:
    ds = load_dataset(make_phantoms(tmp_path / "p", n_images=120, size=32, seed=1))
    modality_cuis = set(MODALITY_CUI.values())
    phrasings = set()
    for r in ds.records:
        caption = r.captions[0]
        phrasings.add(re.sub(r"\w+", "w", caption)[:12])
        modality = [c for c in r.concepts if c in modality_cuis]
        assert len(modality) == 1 and re.search(MODALITY_WORDS[modality[0]], caption.lower()), (caption, r.concepts)
        organ = r.concepts[1]
        assert ORGAN_WORDS[organ] in caption.lower(), (caption, r.concepts)
        count = r.concepts[2]
        if count == "SYN0010":
            assert re.search(r"\b(no|without|unremarkable)\b", caption.lower()) and len(r.concepts) == 3, caption
        else:
            assert re.search(COUNT_WORDS[count], caption.lower()), caption
            assert SIDE_WORDS[r.concepts[3]] in caption.lower(), caption
    assert len(phrasings) >= 4  # several sentence shapes, not one template
    words = {w for r in ds.records for w in re.findall(r"[a-z]+", r.captions[0].lower())}
    assert "masses" in words and not {"masss", "cystss", "masse"} & words  # plurals are spelled right


@pytest.mark.slow
def test_images_carry_the_caption_attributes(tmp_path: Path) -> None:
    """Linear models on raw downsampled pixels beat chance by far: modality and organ are visible, and
    text->image retrieval through a ridge map from pixels to caption words ranks the right image high."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression, Ridge

    ds = load_dataset(make_phantoms(tmp_path / "p", n_images=480, size=96, seed=0))
    train, test = ds.split("train"), ds.split("test")

    def pixels(records):
        return np.stack(
            [np.asarray(Image.open(r.image).resize((24, 24), Image.BILINEAR), np.float32).ravel() / 255 for r in records]
        )

    x_train, x_test = pixels(train), pixels(test)
    for position, chance in ((0, 0.25), (1, 0.25)):  # modality, organ
        clf = LogisticRegression(max_iter=3000).fit(x_train, [r.concepts[position] for r in train])
        assert clf.score(x_test, [r.concepts[position] for r in test]) > chance + 0.35

    words = TfidfVectorizer().fit([r.captions[0] for r in train])
    t_train = words.transform([r.captions[0] for r in train]).toarray()
    t_test = words.transform([r.captions[0] for r in test]).toarray()
    predicted = Ridge(alpha=10.0).fit(x_train, t_train).predict(x_test)
    predicted /= np.linalg.norm(predicted, axis=1, keepdims=True)
    t_test /= np.linalg.norm(t_test, axis=1, keepdims=True)
    scores = t_test @ predicted.T  # caption x image
    ranks = (scores > np.diag(scores)[:, None]).sum(axis=1)
    recall_at_10 = float((ranks < 10).mean())
    assert recall_at_10 > 3 * 10 / len(test)  # chance is 10/72


@pytest.mark.slow
def test_ensure_default_dataset_generates_once_and_repairs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    folder = ensure_default_dataset()
    assert folder == default_dataset_dir() == tmp_path / "data" / "synthetic-phantoms"
    assert is_complete(folder)
    ds = load_dataset(folder)
    assert (ds.name, ds.synthetic, len(ds.records)) == ("synthetic-phantoms", True, 480)
    assert {s: len(ds.split(s)) for s in ds.splits} == {"train": 336, "valid": 72, "test": 72}
    original = folder_bytes(folder)

    untouched = folder / "images" / "PHANTOM_00002.png"
    mtime = untouched.stat().st_mtime_ns
    assert ensure_default_dataset() == folder and untouched.stat().st_mtime_ns == mtime  # complete: left alone

    (folder / "images" / "PHANTOM_00007.png").unlink()
    (folder / "stray.txt").write_text("left from a crash")
    assert not is_complete(folder)
    ensure_default_dataset()
    assert folder_bytes(folder) == original
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["synthetic-phantoms"]  # no temp folders left
