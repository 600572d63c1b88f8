"""Records as Arrow columns (`extract.record_table`): the table behaves as the list of `Record` it
replaces, every `Dataset` question (splits, vocabulary, overlaps, fingerprint) has the answer the
list gave, and a large collection is held as a memory-mapped file, not as Python objects."""
from __future__ import annotations

import hashlib
import os
import pickle
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from medembed.common.splits import sort_splits
from medembed.extract import record_table
from medembed.extract.datasets import load_dataset
from medembed.extract.imaging.locations import fingerprint_size
from medembed.extract.record_table import RecordTableBuilder
from medembed.extract.records import Dataset, Record


def _records() -> list[Record]:
    """Ids whose order differs by code point and by case, ties of (split, id), several captions, a
    file under two ids in two splits and an id in two splits."""
    out = []
    for i, image_id in enumerate(["b", "B", "é", "z", "a", "ä", "b", "Z", "ü", "c"] * 3):
        split = ("train", "valid", "test")[i % 3]
        out.append(Record(image_id, f"/d/{image_id}-{i % 7}.png", tuple(f"cap {i} {j}" for j in range(i % 3 + 1)),
                          tuple(f"C{i % 4}{k}" for k in range(i % 2)), split))
    out.append(Record("shared-a", "/d/shared.png", ("one",), (), "train"))
    out.append(Record("shared-b", "/d/shared.png", ("two",), (), "test"))
    return out


def _list_fingerprint(ds: Dataset, records: list[Record]) -> str:
    """The fingerprint as it was computed over a list (caches written before keep their fingerprint)."""
    h = hashlib.sha256()
    h.update(ds.layout.encode())
    for r in sorted(records, key=lambda r: (r.split, r.image_id)):
        h.update(f"{r.split}\x1f{r.image_id}\x1f{os.path.basename(r.image)}\x1f{fingerprint_size(r.image)}".encode())
        h.update("\x1e".join(r.captions).encode())
        h.update(";".join(r.concepts).encode())
    for k in sorted(ds.concept_names):
        h.update(f"{k}\x1f{ds.concept_names[k]}".encode())
    return h.hexdigest()


def _list_overlaps(records: list[Record]) -> list[tuple[str, tuple[str, ...]]]:
    by_id: dict[str, set[str]] = {}
    by_file: dict[str, tuple[set[str], set[str]]] = {}
    for r in records:
        by_id.setdefault(r.image_id, set()).add(r.split)
        splits, ids = by_file.setdefault(r.image, (set(), set()))
        splits.add(r.split)
        ids.add(r.image_id)
    out = [(f"id {i}", tuple(sort_splits(s))) for i, s in by_id.items() if len(s) > 1]
    leaked = {i for i, s in by_id.items() if len(s) > 1}
    return out + [(f"file {f}", tuple(sort_splits(s))) for f, (s, ids) in by_file.items()
                  if len(s) > 1 and not ids <= leaked]


@pytest.mark.parametrize("spill_rows", [10**9, 5])
def test_the_table_is_the_list_it_replaces(spill_rows):
    records = _records()
    table = RecordTableBuilder(spill_rows=spill_rows, batch_rows=4).extend(records).finish()
    assert table.spilled == (spill_rows == 5)
    assert len(table) == len(records) and list(table) == records and table == records
    assert table[0] == records[0] and table[-1] == records[-1] and table[17] == records[17]
    assert table[3:20:4] == records[3:20:4] and table[5:9][1:3] == records[6:8]
    with pytest.raises(IndexError):
        table[len(records)]
    assert pickle.loads(pickle.dumps(table[2:9])) == records[2:9]
    # reading backwards crosses the decoded window every time and still answers right
    assert [table[i] for i in reversed(range(len(table)))] == records[::-1]

    ds = Dataset("d", "/d", "generic", table, {"C00": "zero", "C99": "named only"})
    listed = Dataset("d", "/d", "generic", records, dict(ds.concept_names))
    assert ds.splits == ["train", "valid", "test"]
    for split in ds.splits:
        assert ds.split(split) == [r for r in records if r.split == split]
    assert ds.split("test")[2:4] == [r for r in records if r.split == "test"][2:4]
    assert ds.concept_vocab() == sorted({c for r in records for c in r.concepts} | {"C00", "C99"})
    assert ds.records.n_captions() == sum(len(r.captions) for r in records)
    assert ds.split_overlaps() == _list_overlaps(records)
    assert ("file /d/shared.png", ("train", "test")) in ds.split_overlaps()
    assert ds.fingerprint() == _list_fingerprint(listed, records) == listed.fingerprint()


def test_splits_filled_afterwards_rewrite_only_the_split_column():
    records = [Record(f"s{i}", f"/d/{i}.png", (f"c{i}",), (), "" if i % 2 else "valid") for i in range(11)]
    table = RecordTableBuilder(spill_rows=3, batch_rows=4).extend(records).finish().with_splits(lambda i: f"x-{i}")
    assert table.spilled
    assert [r.split for r in table] == [f"x-s{i}" if i % 2 else "valid" for i in range(11)]
    assert [(r.image_id, r.captions) for r in table] == [(r.image_id, r.captions) for r in records]


def _parquet_corpus(root: Path, n: int, shards: int = 2) -> None:
    """A ROCOv2-shaped folder of n rows (one-byte images: what is measured is the records)."""
    (root / "data").mkdir(parents=True)
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    per = n // shards
    for s in range(shards):
        ids = [f"ROCOv2_2023_train_{s * per + i:07d}" for i in range(per)]
        caption = "Axial contrast-enhanced CT of the abdomen showing a hypodense lesion in segment {} of the liver."
        pq.write_table(pa.table({
            "image": pa.array([{"bytes": b"x", "path": None}] * per, image),
            "image_id": ids,
            "caption": [caption.format(i) for i in range(per)],
            "cui": [["C0040405", "C0023884"]] * per,
        }), root / "data" / f"train-{s:05d}-of-{shards:05d}.parquet", row_group_size=65_536)


@pytest.mark.slow
def test_a_large_collection_is_read_into_a_mapped_file_not_into_objects(tmp_path, monkeypatch):
    """120k ROCOv2 rows, with the table spilled past 50,000 records (262,144 by default). Read, checked for overlaps and fingerprinted, the heap peaks at one batch's
    worth, a small part of what the same records take as a list of `Record`; once read, the records
    are a memory-mapped file, not heap, Python's or Arrow's."""
    monkeypatch.setattr(record_table, "SPILL_ROWS", 50_000)
    n = 120_000
    _parquet_corpus(tmp_path / "rocov2", n)
    arrow_before = pa.total_allocated_bytes()
    tracemalloc.start()
    ds = load_dataset(tmp_path / "rocov2")
    assert len(ds.records) == n and ds.records.spilled
    assert pa.total_allocated_bytes() - arrow_before < 1 << 20  # the columns live in the mapping
    assert ds.split_overlaps() == []
    fingerprint = ds.fingerprint()
    assert len(ds.split("train")) == n
    held, peak = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    as_list = list(ds.records)
    listed, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    listed -= held
    assert held < n * 16, f"{held / n:.0f} bytes a record held after reading"  # the split's row numbers
    assert peak < listed / 4, f"peak {peak / 2**20:.0f} MiB; the list takes {listed / 2**20:.0f} MiB"
    # the same answers as the list: the fingerprint over the same records as objects
    assert fingerprint == _list_fingerprint(ds, as_list)
    assert ds.records[73_456] == as_list[73_456] == Record(
        "ROCOv2_2023_train_0073456", f"{tmp_path / 'rocov2' / 'data' / 'train-00001-of-00002.parquet'}::13456",
        ("Axial contrast-enhanced CT of the abdomen showing a hypodense lesion in segment 13456 of the liver.",),
        ("C0040405", "C0023884"), "train")


def test_the_generic_reader_joins_scattered_rows_of_an_image_as_a_dictionary_would(tmp_path):
    """3,000 rows of 1,200 images in shuffled order (1-4 rows each, some captions empty): the streamed
    reader joins them exactly as grouping the rows in a dictionary does, in the order images first appear."""
    import csv
    import random

    rng = random.Random(0)
    rows = [(f"img{i:04d}.png", f"caption {i} {j}" if rng.random() > 0.1 else "", f"C{i % 7};C{j % 3}")
            for i in range(1200) for j in range(rng.randint(1, 4))][:3000]
    rng.shuffle(rows)
    folder = tmp_path / "g"
    folder.mkdir()
    with open(folder / "captions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption", "labels"])
        w.writerows(rows)
    grouped: dict[str, tuple[list[str], list[str]]] = {}
    for image, caption, labels in rows:
        captions, concepts = grouped.setdefault(image, ([], []))
        captions += [caption] if caption else []
        for c in labels.split(";"):
            if c not in concepts:
                concepts.append(c)
    want = [(k, tuple(c), tuple(k_)) for k, (c, k_) in grouped.items() if c]
    ds = load_dataset(folder)
    assert [(r.image_id, r.captions, r.concepts) for r in ds.records] == want
    assert {r.split for r in ds.records} == {"train"}
    assert "image(s) left with no caption were dropped" in ds.warnings[0]


def test_the_spilled_file_is_gone_once_mapped_or_when_reading_stops(tmp_path):
    records = _records()
    table = RecordTableBuilder(spill_rows=5, batch_rows=4, spill_dir=str(tmp_path)).extend(records).finish()
    assert table.spilled and list(tmp_path.iterdir()) == [] and table == records  # unlinked, still readable

    def reader_that_fails():
        builder = RecordTableBuilder(spill_rows=5, batch_rows=4, spill_dir=str(tmp_path)).extend(records)
        assert builder.rows == len(records) and len(list(tmp_path.iterdir())) == 1  # spilled, not finished
        raise ValueError("bad row")

    with pytest.raises(ValueError):
        reader_that_fails()
    import gc

    gc.collect()
    assert list(tmp_path.iterdir()) == []
