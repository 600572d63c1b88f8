"""Shard throughput: the same extraction run as 1 and as 2 Ray shard workers on a local cluster.

    .venv/bin/python benchmarks/shards.py [--data ../shared/data/roco-rad] [--n 192] [--workers 1,2]
                                          [--layout generic|webdataset]

`--layout webdataset` packs the subset as WebDataset tar shards of 64 samples (KEY.jpg + KEY.txt, as
img2dataset writes them) named train-NNNNN.tar, read in place by member offset.

Each Ray task gets one CPU (Ray sets its thread count to 1), so the ratio shows how shards scale
across cores; on a GPU cluster each task gets one GPU instead.
"""
from __future__ import annotations

import argparse
import csv
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from medembed.extract.distributed import extract_with_ray  # noqa: E402
from medembed.extract.extraction import ExtractConfig  # noqa: E402


def subset(src: Path, dst: Path, n: int) -> Path:
    """A generic-layout copy of the first n train records (symlinked images), so runs stay short."""
    (dst / "images").mkdir(parents=True)
    rows = list(csv.DictReader(open(src / "train_captions.csv", newline="")))[:n]
    with open(dst / "captions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption", "split"])
        for r in rows:
            os.symlink(src / "images" / f"{r['ID']}.jpg", dst / "images" / f"{r['ID']}.jpg")
            w.writerow([f"images/{r['ID']}.jpg", r["Caption"], "train"])
    return dst


def as_webdataset(src: Path, dst: Path, n: int, per_shard: int = 64) -> Path:
    """The first n train records as WebDataset tar shards (KEY.jpg + KEY.txt members)."""
    import io
    import tarfile

    dst.mkdir(parents=True)
    rows = list(csv.DictReader(open(src / "train_captions.csv", newline="")))[:n]
    for s in range(0, len(rows), per_shard):
        with tarfile.open(dst / f"train-{s // per_shard:05d}.tar", "w") as tar:
            for k, r in enumerate(rows[s : s + per_shard]):
                key = f"{s + k:09d}"
                tar.add(src / "images" / f"{r['ID']}.jpg", arcname=f"{key}.jpg")
                text = r["Caption"].encode()
                info = tarfile.TarInfo(f"{key}.txt")
                info.size = len(text)
                tar.addfile(info, io.BytesIO(text))
    return dst


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/roco-rad"))
    ap.add_argument("--n", type=int, default=192)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--backbone", default="effnet-lite0+minilm")
    ap.add_argument("--layout", choices=("generic", "webdataset"), default="generic")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        make = as_webdataset if args.layout == "webdataset" else subset
        data = make(Path(args.data), Path(tmp) / "subset", args.n)
        for w in [int(x) for x in args.workers.split(",")]:
            out = Path(tmp) / f"out{w}"
            cfg = ExtractConfig(data=str(data), backbone=args.backbone, out=str(out), batch_size=32, workers=0,
                                progress=False)
            t0 = time.perf_counter()
            extract_with_ray(cfg, shards=w, num_cpus=w)
            secs = time.perf_counter() - t0
            rows.append((w, secs, args.n / secs))
            shutil.rmtree(out)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; command: python benchmarks/shards.py "
          + " ".join(sys.argv[1:]))
    what = "as WebDataset tar shards of 64" if args.layout == "webdataset" else "as image files"
    print(f"{args.n} roco-rad train images {what}, backbone {args.backbone}, local Ray cluster, one CPU per shard "
          "task; wall time includes Ray start-up, model loading in each task and the join\n")
    print("| shard workers | wall s | images/s | speed-up vs 1 |")
    print("|---|---|---|---|")
    for w, secs, rate in rows:
        print(f"| {w} | {secs:.1f} | {rate:.2f} | {rate / rows[0][2]:.2f} |")


if __name__ == "__main__":
    main()
