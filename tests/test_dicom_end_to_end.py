"""DICOM studies with reports, and an image-only DICOM collection, through every phase: extract,
adapt, eval, search, the page's API, export. Nothing that identifies a patient may reach any file
the toolkit writes or any answer the page gives."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from medembed.adapt.config import AdaptConfig
from medembed.adapt.trainer import train
from medembed.evaluate.pipeline import EvalOptions, run_eval
from medembed.extract.extraction import ExtractConfig, extract
from medembed.serve.export import ExportOptions, export_embeddings
from medembed.serve.index import IndexOptions, build_index, load_index
from medembed.serve.page import ServeLimits, create_app
from medembed.serve.search import Searcher, search

IDENTIFIERS = {"PatientName": "Testpatient^Alice", "PatientID": "MRN-7731-0042", "PatientBirthDate": "19590213",
               "AccessionNumber": "ACC-99812-Q", "InstitutionName": "St Example Hospital",
               "ReferringPhysicianName": "Doctor^Bob", "OtherPatientIDs": "OPI-55120"}
SPLITS = {"train": 24, "valid": 8, "test": 8}
FINDINGS = [("bright round lesion in the upper field", 1), ("dark wedge shaped defect", 0)]


def _studies(root: Path) -> tuple[Path, list[str]]:
    """Single-frame MR files built from pydicom's MR_small with identifying attributes filled in, a
    pattern per finding, unique UIDs; a captions CSV pairs each with its finding and split."""
    template = pydicom.dcmread(get_testdata_file("MR_small.dcm", download=False))
    folder = root / "archive"
    rng = np.random.default_rng(0)
    rows, uids = [], []
    yy, xx = np.mgrid[:64, :64]
    i = 0
    for split, n in SPLITS.items():
        for j in range(n):
            caption, bright = FINDINGS[j % 2]
            ds = template.copy()
            for key, value in IDENTIFIERS.items():
                setattr(ds, key, value)
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            uids += [ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID]
            base = rng.normal(600, 60, (64, 64))
            blob = ((yy - 20) ** 2 + (xx - 32) ** 2 < 100) if bright else (np.abs(yy - xx) < 6)
            base[blob] = 1500 if bright else 50
            ds.PixelData = np.clip(base, 0, 4000).astype(np.int16).tobytes()
            path = folder / f"study{i:03d}" / "IM0001.dcm"
            path.parent.mkdir(parents=True)
            ds.save_as(path)
            rows.append({"image": str(path.relative_to(folder)), "caption": caption, "split": split})
            i += 1
    with open(folder / "captions.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["image", "caption", "split"])
        w.writeheader()
        w.writerows(rows)
    return folder, uids


def _leaks(root: Path, secrets: list[str], skip: Path) -> list[str]:
    """Every (file, secret) where a written file contains an identifier, as text or UTF-16."""
    found = []
    for path in root.rglob("*"):
        if not path.is_file() or skip in path.parents:
            continue
        data = path.read_bytes()
        for secret in secrets:
            if secret.encode() in data or secret.encode("utf-16-le") in data:
                found.append(f"{path.relative_to(root)}: {secret}")
    return found


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("dicom")
    data, uids = _studies(root)
    summary = extract(ExtractConfig(data=str(data), backbone="tiny-clip", out=str(root / "features"), workers=0,
                                    progress=False, batch_size=8))
    train(AdaptConfig(features_dir=summary.out_dir, out=str(root / "runs" / "r"), head="linear", dim=16, epochs=3,
                      batch_size=8), progress=False)
    return {"root": root, "data": data, "uids": uids, "run": root / "runs" / "r", "summary": summary}


def test_dicom_studies_with_reports_run_every_phase_without_leaking_identifiers(project):
    root, run, summary = project["root"], project["run"], project["summary"]
    assert [(s.split, s.images, s.captions, len(s.skipped)) for s in summary.splits] == [
        ("train", 24, 24, 0), ("valid", 8, 8, 0), ("test", 8, 8, 0)]
    result = run_eval([run], split="test", ks=[1, 5], out_dir=root / "eval", options=EvalOptions(progress=False))
    assert result["pool_images"] == 8 and 0 <= result["metrics"]["t2i_R@5"] <= 100
    hits = search(run, text=FINDINGS[0][0], k=3)
    assert len(hits.hits) == 3 and all(h.location.endswith("IM0001.dcm") for h in hits.hits)
    query = next(project["data"].rglob("*.dcm"))
    by_image = search(run, image=str(query), k=2)  # a DICOM file as the query
    assert by_image.hits
    for fmt in ("npy", "parquet"):
        export_embeddings(run, ExportOptions(format=fmt, split="all", out=str(root / "exports" / fmt)))
    client = TestClient(create_app(Searcher(run), ServeLimits()))
    answers = [client.get("/api/info").text, client.get("/api/search/text", params={"q": "lesion", "k": 5}).text,
               client.post("/api/search/image", content=query.read_bytes()).text]
    key = json.loads(answers[1])["hits"][0]["key"]
    thumb = client.get(f"/api/image/{key}")
    assert thumb.status_code == 200 and thumb.content[:4] == b"\x89PNG"
    (root / "answers.json").write_text(json.dumps(answers))
    secrets = list(IDENTIFIERS.values()) + project["uids"]
    written = [p for p in root.rglob("*") if p.is_file() and project["data"] not in p.parents]
    assert len(written) > 20  # caches, run, eval report, exports, answers: every one is scanned
    assert _leaks(root, secrets, skip=project["data"]) == []
    assert _leaks(project["data"], secrets, skip=root / "none")  # the scan does find them where they are


def test_an_image_only_collection_is_searched_served_and_exported_but_not_evaluated(project, tmp_path):
    run = project["run"]
    collection = tmp_path / "archive-images"
    for i, src in enumerate(sorted(project["data"].rglob("*.dcm"))[:10]):
        dest = collection / f"series{i % 2}" / f"IM{i:04d}"  # suffix-less, as archives write them
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(src.read_bytes())
    features = tmp_path / "features"
    by_text = search(run, text=FINDINGS[1][0], k=4, data=str(collection), features_root=str(features))
    assert len(by_text.hits) == 4 and all(str(collection) in h.location for h in by_text.hits)
    assert {h.image_id.split("/")[0] for h in by_text.hits} <= {"series0", "series1"}
    by_image = search(run, image=str(collection / "series0" / "IM0000"), k=3, data=str(collection),
                      features_root=str(features))
    assert by_image.hits[0].image_id == "series0/IM0000"  # an image finds itself first
    client = TestClient(create_app(Searcher(run, data=str(collection), features_root=str(features)), ServeLimits()))
    info = client.get("/api/info").json()
    assert info["pool_images"] == 10 and info["splits"] == ["all"]
    got = client.get("/api/search/text", params={"q": FINDINGS[0][0], "k": 3}).json()
    assert len(got["hits"]) == 3
    index_path, meta = build_index(run, IndexOptions(kind="hnsw", data=str(collection), features_root=str(features)))
    assert meta.ntotal == 10 and index_path.parent == run / "index" / "pools" / "archive-images"
    indexed = search(run, text=FINDINGS[1][0], k=4, data=str(collection), features_root=str(features))
    assert indexed.via.startswith("hnsw") and [h.image_id for h in indexed.hits] == [h.image_id for h in by_text.hits]
    assert load_index(run) is None  # the run's own pool has no index: the two are kept apart
    summary = export_embeddings(run, ExportOptions(split="all", data=str(collection), features_root=str(features)))
    assert summary.rows == 10 and Path(summary.out).name == "archive-images-all-npy"
    with pytest.raises(ValueError, match="an image-only collection .no captions.: evaluation needs captions"):
        run_eval([run], split="all", ks=[1], out_dir=tmp_path / "eval",
                 options=EvalOptions(progress=False, data=str(collection), features_root=str(features)))
    with pytest.raises(ValueError, match="no captions"):
        train(AdaptConfig(features_dir=str(next(features.glob("*/*"))), out=str(tmp_path / "r2")), progress=False)
    assert _leaks(tmp_path, list(IDENTIFIERS.values()) + project["uids"], skip=collection) == []
