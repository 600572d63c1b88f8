"""DICOM studies with reports, and an image-only DICOM collection, through every phase: extract,
adapt, eval, search, the page's API, index, export. Nothing that identifies a patient -- the files'
attributes, nor the folder names an archive export gives them (`Doe_Jane/...`) -- may reach any file
the toolkit writes, any label it draws or any answer the page gives."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import h5py
import numpy as np
import pyarrow.parquet as pq
import pydicom
import pytest
from fastapi.testclient import TestClient
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from medembed.adapt.config import AdaptConfig
from medembed.adapt.trainer import train
from medembed.cache.provenance import ProvenanceMismatch
from medembed.evaluate import examples as examples_module
from medembed.evaluate.pipeline import EvalOptions, run_eval
from medembed.extract.extraction import ExtractConfig, extract
from medembed.extract.path_key import load_path_key
from medembed.serve import search as search_module
from medembed.serve.export import ExportOptions, export_embeddings
from medembed.serve.index import IndexOptions, build_index, load_index
from medembed.serve.page import ServeLimits, create_app
from medembed.serve.search import Searcher, search

IDENTIFIERS = {"PatientName": "Testpatient^Alice", "PatientID": "MRN-7731-0042", "PatientBirthDate": "19590213",
               "AccessionNumber": "ACC-99812-Q", "InstitutionName": "St Example Hospital",
               "ReferringPhysicianName": "Doctor^Bob", "OtherPatientIDs": "OPI-55120"}
# how PACS exports name folders: by patient name, or name and record number
PATIENTS = ("Doe_Jane", "Roe_Richard", "Smith_John_MRN55120", "Garcia_Maria")
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
            path = folder / PATIENTS[i % len(PATIENTS)] / f"study{i:03d}" / "IM0001.dcm"
            path.parent.mkdir(parents=True)
            ds.save_as(path)
            rows.append({"image": str(path.relative_to(folder)), "caption": caption, "split": split})
            i += 1
    with open(folder / "captions.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["image", "caption", "split"])
        w.writeheader()
        w.writerows(rows)
    return folder, uids


def _texts(path: Path) -> list[str]:
    """What a written file says, decoded where bytes on disk may hide it (compressed HDF5 strings and
    attributes, parquet pages, PNG text chunks)."""
    out = []
    if path.suffix == ".h5":
        with h5py.File(path, "r") as f:
            def visit(_, obj) -> None:
                out.extend(str(v) for v in obj.attrs.values())
                if isinstance(obj, h5py.Dataset) and obj.dtype.kind in "OSU":
                    out.extend(v.decode() if isinstance(v, bytes) else str(v) for v in np.asarray(obj[()]).ravel())
            out.extend(str(v) for v in f.attrs.values())
            f.visititems(visit)
    elif path.suffix == ".parquet":
        out.append(json.dumps(pq.read_table(path).drop_columns(
            [c for c in ("embedding",) if c in pq.read_schema(path).names]).to_pylist(), default=str))
    elif path.suffix == ".png":
        from PIL import Image
        with Image.open(path) as im:
            out.extend(f"{k}={v}" for k, v in im.text.items())
    return out


def _leaks(root: Path, secrets: list[str], skip: Path) -> list[str]:
    """Every (file, secret) where a written file contains an identifier: in its bytes (as text or
    UTF-16) or in what it says once decoded."""
    found = []
    for path in root.rglob("*"):
        if not path.is_file() or skip in path.parents:
            continue
        data, texts = path.read_bytes(), _texts(path)
        for secret in secrets:
            if secret.encode() in data or secret.encode("utf-16-le") in data or any(secret in t for t in texts):
                found.append(f"{path.relative_to(root)}: {secret}")
    return found


@pytest.fixture
def drawn(monkeypatch) -> list[str]:
    """Every string the search grids draw (tile labels, captions, the query line)."""
    labels: list[str] = []
    text_grid, image_grid = search_module.text_query_grid, search_module.image_query_grid
    similar_grid = search_module.similar_images_grid

    def text_query_grid(query, tiles, path, *a, **kw):
        labels.extend([query, *(t.label for t in tiles)])
        return text_grid(query, tiles, path, *a, **kw)

    def image_query_grid(image, label, captions, path, *a, **kw):
        labels.extend([label, *(c[0] for c in captions)])
        return image_grid(image, label, captions, path, *a, **kw)

    def similar_images_grid(image, label, tiles, path, *a, **kw):
        labels.extend([label, *(t.label for t in tiles)])
        return similar_grid(image, label, tiles, path, *a, **kw)

    for module in (search_module, examples_module):  # search's grids and eval's example grids
        monkeypatch.setattr(module, "text_query_grid", text_query_grid)
        monkeypatch.setattr(module, "image_query_grid", image_query_grid)
    monkeypatch.setattr(search_module, "similar_images_grid", similar_images_grid)
    return labels


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("dicom")
    data, uids = _studies(root)
    summary = extract(ExtractConfig(data=str(data), backbone="tiny-clip", out=str(root / "features"), workers=0,
                                    progress=False, batch_size=8))
    train(AdaptConfig(features_dir=summary.out_dir, out=str(root / "runs" / "r"), head="linear", dim=16, epochs=3,
                      batch_size=8), progress=False)
    return {"root": root, "data": data, "uids": uids, "run": root / "runs" / "r", "summary": summary}


def _key_id(relative: str) -> str:
    """The id a record at this path below its data folder gets (the test session's path key)."""
    return load_path_key().image_id(relative)


def test_dicom_studies_with_reports_run_every_phase_without_leaking_identifiers(project, drawn):
    root, run, summary = project["root"], project["run"], project["summary"]
    assert [(s.split, s.images, s.captions, len(s.skipped)) for s in summary.splits] == [
        ("train", 24, 24, 0), ("valid", 8, 8, 0), ("test", 8, 8, 0)]
    assert any("DICOM images, whose paths may name patients" in w for w in summary.warnings)
    result = run_eval([run], split="test", ks=[1, 5], out_dir=root / "eval", options=EvalOptions(progress=False))
    assert result["pool_images"] == 8 and 0 <= result["metrics"]["t2i_R@5"] <= 100
    hits = search(run, text=FINDINGS[0][0], k=3, out=root / "grid-text.png")
    # each hit is named by a keyed hash of its path, and found again (drawn) through it
    every_id = {_key_id(p.relative_to(project["data"]).as_posix()) for p in project["data"].rglob("*.dcm")}
    assert len(hits.hits) == 3 and {h.image_id for h in hits.hits} <= every_id
    assert all("::private:" in h.location for h in hits.hits)
    query = next(project["data"].rglob("*.dcm"))
    by_image = search(run, image=str(query), k=2, out=root / "grid-image.png")  # a DICOM file as the query
    assert by_image.hits
    build_index(run, IndexOptions(kind="flat"))
    for fmt in ("npy", "parquet"):
        export_embeddings(run, ExportOptions(format=fmt, split="all", out=str(root / "exports" / fmt)))
    client = TestClient(create_app(Searcher(run), ServeLimits()))
    answers = [client.get("/api/info").text, client.get("/api/search/text", params={"q": "lesion", "k": 5}).text,
               client.post("/api/search/image", content=query.read_bytes()).text]
    key = json.loads(answers[1])["hits"][0]["key"]
    thumb = client.get(f"/api/image/{key}")
    assert thumb.status_code == 200 and thumb.content[:4] == b"\x89PNG"
    # a file gone since extraction: the page's 404 says why without its path (the folder names the patient)
    by_id = {_key_id(p.relative_to(project["data"]).as_posix()): p for p in project["data"].rglob("*.dcm")}
    gone = by_id[json.loads(answers[1])["hits"][0]["id"]]
    kept = gone.read_bytes()
    gone.unlink()
    try:
        missing = [client.get(f"/api/image/{key}"), client.get(f"/api/explain/{key}", params={"q": "lesion"})]
    finally:
        gone.write_bytes(kept)
    for answer in missing:
        error = answer.json()["error"]
        assert answer.status_code == 404 and error.startswith(f"{key}: image not readable ("), answer.text
        assert "FileNotFoundError" in error and "<image>" in error, error
    answers += [answer.text for answer in missing]
    (root / "answers.json").write_text(json.dumps(answers))
    secrets = list(IDENTIFIERS.values()) + project["uids"] + list(PATIENTS)
    written = [p for p in root.rglob("*") if p.is_file() and project["data"] not in p.parents]
    assert len(written) > 20  # caches, run, eval report, index, exports, grids, answers: every one is scanned
    assert {"grid-text.png", "grid-image.png"} <= {p.name for p in written}
    assert any(p.suffix == ".parquet" for p in written) and any(p.parent.name == "index" for p in written)
    assert _leaks(root, secrets, skip=project["data"]) == []
    assert drawn and not [(label, s) for label in drawn for s in secrets if s in label]
    assert _leaks(project["data"], secrets, skip=root / "none")  # the scan does find them where they are


def test_an_image_only_collection_is_searched_served_and_exported_but_not_evaluated(project, tmp_path, drawn):
    run = project["run"]
    collection = tmp_path / "archive-images"
    for i, src in enumerate(sorted(project["data"].rglob("*.dcm"))[:10]):
        dest = collection / PATIENTS[i % 2] / f"IM{i:04d}"  # suffix-less, as archives write them
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(src.read_bytes())
    written = tmp_path / "written"
    features = written / "features"
    by_text = search(run, text=FINDINGS[1][0], k=4, data=str(collection), features_root=str(features),
                     out=written / "grid-text.png")
    ids = {_key_id(f"{PATIENTS[i % 2]}/IM{i:04d}"): i for i in range(10)}
    assert len(by_text.hits) == 4 and all(str(collection) in h.location for h in by_text.hits)
    assert {h.image_id for h in by_text.hits} <= set(ids)
    by_image = search(run, image=str(collection / PATIENTS[0] / "IM0000"), k=3, data=str(collection),
                      features_root=str(features), out=written / "grid-image.png")
    assert ids[by_image.hits[0].image_id] == 0  # an image finds itself first
    client = TestClient(create_app(Searcher(run, data=str(collection), features_root=str(features)), ServeLimits()))
    info = client.get("/api/info").json()
    assert info["pool_images"] == 10 and info["splits"] == ["all"]
    got = client.get("/api/search/text", params={"q": FINDINGS[0][0], "k": 3}).json()
    assert len(got["hits"]) == 3
    thumb = client.get(f"/api/image/{got['hits'][0]['key']}")
    assert thumb.status_code == 200 and thumb.content[:4] == b"\x89PNG"  # every image is still shown
    upload = client.post("/api/search/image", content=(collection / PATIENTS[1] / "IM0001").read_bytes()).json()
    (written / "answers.json").write_text(json.dumps([info, got, upload]))
    index_path, meta = build_index(run, IndexOptions(kind="hnsw", data=str(collection), features_root=str(features)))
    assert meta.ntotal == 10 and index_path.parent == run / "index" / "pools" / "archive-images"
    assert set(meta.image_ids) == set(ids)  # the index's pool file names images by their keyed ids only
    indexed = search(run, text=FINDINGS[1][0], k=4, data=str(collection), features_root=str(features))
    assert indexed.via.startswith("hnsw") and [h.image_id for h in indexed.hits] == [h.image_id for h in by_text.hits]
    own = load_index(run)  # the run's own pool (indexed by the test above when it ran) is kept apart
    assert own is None or (own[1].pool == "" and own[1].ntotal == 40)
    for fmt in ("npy", "parquet"):
        summary = export_embeddings(run, ExportOptions(format=fmt, split="all", data=str(collection),
                                                       features_root=str(features), out=str(written / fmt)))
        assert summary.rows == 10
    with pytest.raises(ValueError, match="an image-only collection .no captions.: evaluation needs captions"):
        run_eval([run], split="all", ks=[1], out_dir=tmp_path / "eval",
                 options=EvalOptions(progress=False, data=str(collection), features_root=str(features)))
    with pytest.raises(ValueError, match="no captions"):
        train(AdaptConfig(features_dir=str(next(features.glob("*/*"))), out=str(tmp_path / "r2")), progress=False)
    secrets = list(IDENTIFIERS.values()) + project["uids"] + list(PATIENTS)
    assert len([p for p in written.rglob("*") if p.is_file()]) > 8
    assert _leaks(written, secrets, skip=collection) == []
    assert _leaks(run / "index" / "pools", secrets, skip=collection) == []
    assert drawn and not [(label, s) for label in drawn for s in secrets if s in label]
    # readable paths on request only, never mixed into the keyed encoding of the same folder
    readable = search(run, text=FINDINGS[1][0], k=4, data=str(collection), features_root=str(tmp_path / "readable"),
                      readable_paths=True)
    assert {h.image_id.split("/")[0] for h in readable.hits} <= set(PATIENTS[:2])
    assert _leaks(tmp_path / "readable", list(PATIENTS), skip=collection)  # the scan finds names in a cache that has them
    with pytest.raises(ProvenanceMismatch, match=r"named by keyed hashes of their paths \(path key [0-9a-f]{8}\), this "
                       "run names them by their paths; read it without --readable-paths"):
        search(run, text="x", data=str(collection), features_root=str(features), readable_paths=True)
