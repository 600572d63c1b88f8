"""Reading a dataset of millions of records before extraction: the records as Arrow columns in a
memory-mapped file (what `load_dataset` does) against the same records as a list of `Record` objects
(what the readers returned before).

    python benchmarks/records_scale.py --n 10000000 --work /work/records-bench

Writes a ROCOv2-shaped parquet folder of `--n` rows in shards of 1M (image ids, a radiology caption
of ~100 characters, two CUIs; a one-byte image, since what is measured is the records), then, each in
a fresh process: (1) `load_dataset`, the split-overlap check, the fingerprint and the train split,
as `cli.py extract` does before its first image; (2) the same, then the records turned into a list of
`Record`, as they were held before. Prints one markdown table: seconds per step, peak memory (VmHWM,
which counts the mapped file's pages the process touched), the peak of anonymous memory (RssAnon,
sampled every 50 ms: what the process itself holds; the mapped pages are the kernel's to drop) and
what each holds per record at the end. Files are kept in --work, so a second run reuses the folder.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARD = 1_000_000
CAPTION = ("Axial contrast-enhanced CT of the abdomen showing a {} mm hypodense lesion in segment {} of the liver "
           "(arrow).")

MEASURE = r"""
import json, sys, threading, time
from medembed.common.memory import peak_rss_bytes
from medembed.extract.datasets import load_dataset

def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0

top = [0]
def sample():  # the peak of anonymous memory, sampled every 50 ms
    while True:
        top[0] = max(top[0], anon())
        time.sleep(0.05)
threading.Thread(target=sample, daemon=True).start()

out, t = {"start_anon": anon()}, time.perf_counter()
ds = load_dataset(sys.argv[1])
out["read_s"], t = time.perf_counter() - t, time.perf_counter()
assert ds.split_overlaps() == []
out["overlaps_s"], t = time.perf_counter() - t, time.perf_counter()
out["fingerprint"] = ds.fingerprint()
out["fingerprint_s"], t = time.perf_counter() - t, time.perf_counter()
out["train"] = len(ds.split("train"))
out["split_s"] = time.perf_counter() - t
out["n"], out["spilled"] = len(ds.records), ds.records.spilled
out["table_bytes"] = ds.records.table.nbytes
if sys.argv[2] == "list":
    t = time.perf_counter()
    as_list = list(ds.records)
    out["list_s"] = time.perf_counter() - t
out["end_anon"], out["peak"], out["peak_anon"] = anon(), peak_rss_bytes(), top[0]
print("RESULT", json.dumps(out))
"""


def prepare(folder: Path, n: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = folder / "data"
    data.mkdir(parents=True, exist_ok=True)
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    count = -(-n // SHARD)
    for s in range(count):
        path = data / f"train-{s:05d}-of-{count:05d}.parquet"
        if path.exists():
            continue
        rows = range(s * SHARD, min(n, (s + 1) * SHARD))
        pq.write_table(pa.table({
            "image": pa.array([{"bytes": b"x", "path": None}] * len(rows), image),
            "image_id": [f"ROCOv2_2023_train_{i:09d}" for i in rows],
            "caption": [CAPTION.format(i % 97, i % 8 + 1) for i in rows],
            "cui": [["C0040405", f"C{i % 5000:07d}"] for i in rows],
        }), path, row_group_size=65_536)
        print(f"  shard {s + 1}/{count} written", flush=True)


def measure(folder: Path, mode: str) -> dict:
    done = subprocess.run([sys.executable, "-c", MEASURE, str(folder), mode], capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    return json.loads(done.stdout.rsplit("RESULT", 1)[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000_000)
    ap.add_argument("--work", type=Path, default=Path("/tmp/records-bench"))
    args = ap.parse_args()
    folder = args.work / f"rocov2-{args.n}"
    t0 = time.perf_counter()
    prepare(folder, args.n)
    print(f"folder ready in {time.perf_counter() - t0:.0f} s", flush=True)
    table, listed = measure(folder, "table"), measure(folder, "list")
    assert table["fingerprint"] == listed["fingerprint"]
    n, gib = table["n"], 1 << 30
    print(f"\n{n:,} records, {table['table_bytes'] / n:.0f} bytes a record in the mapped Arrow file\n")
    print("| held as | read s | overlap check s | fingerprint s | peak (VmHWM) | peak anonymous | anonymous memory at the end | per record |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in (("Arrow columns, memory-mapped (`RecordTable`)", table),
                    ("then a list of `Record` (as before)", listed)):
        held = r["end_anon"] - r["start_anon"]
        print(f"| {name} | {r['read_s']:.0f} | {r['overlaps_s']:.0f} | {r['fingerprint_s']:.0f} | "
              f"{r['peak'] / gib:.2f} GiB | {r['peak_anon'] / gib:.2f} GiB | {held / gib:.2f} GiB | {held / n:.0f} B |")
    print(f"\nratio (anonymous memory held, table / list): {(table['end_anon'] - table['start_anon']) / (listed['end_anon'] - listed['start_anon']):.3f}")


if __name__ == "__main__":
    main()
