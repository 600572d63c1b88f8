"""Does decoding medical formats slow extraction down? Images/s of the extract pipeline on the same
images stored five ways -- JPEG files, uncompressed 16-bit DICOM, JPEG 2000 DICOM, a ROCOv2-style
parquet shard and a WebDataset tar shard -- next to the bare model forward over pre-decoded tensors,
all in one run on one machine.

    .venv/bin/python benchmarks/decode.py [--data ../shared/data/roco-rad] [--n 384] [--workers 2]

The DICOM files carry 12-bit values in 16-bit words with a window in the header (as CR/DX files do),
so their path runs the whole Modality LUT -> VOI -> 8-bit conversion.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import platform
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from pydicom.dataset import Dataset as DicomDataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import JPEG2000Lossless, SecondaryCaptureImageStorage, generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from medembed.extract.backbones import create_backbone  # noqa: E402
from medembed.extract.datasets import load_dataset  # noqa: E402
from medembed.extract.extraction import ExtractConfig, extract_split  # noqa: E402
from medembed.extract.imaging import open_image  # noqa: E402


def _dicom(gray: np.ndarray, compressed: bool) -> DicomDataset:
    """A secondary-capture DICOM of 12-bit grayscale with its window in the header."""
    ds = DicomDataset()
    ds.file_meta = FileMetaDataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    ds.Modality = "OT"
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.set_pixel_data((gray.astype(np.uint16) * 16), "MONOCHROME2", 12)
    if compressed:
        ds.compress(JPEG2000Lossless)
    return ds


def build_formats(records, root: Path) -> dict[str, Path]:
    """The same images as JPEG files, DICOM (plain and JPEG 2000), one parquet shard and one tar shard."""
    folders = {k: root / k for k in ("jpeg", "dicom", "dicom-j2k", "parquet", "webdataset")}
    for f in folders.values():
        f.mkdir(parents=True)
    rows = {"jpeg": [], "dicom": [], "dicom-j2k": []}
    table = {"image": [], "image_id": [], "caption": [], "cui": []}
    with tarfile.open(folders["webdataset"] / "train-000000.tar", "w") as tar:
        for i, r in enumerate(records):
            data = Path(r.image).read_bytes()
            caption = r.captions[0]
            (folders["jpeg"] / f"{i:05d}.jpg").write_bytes(data)
            gray = np.asarray(Image.open(io.BytesIO(data)).convert("L"))
            for kind, compressed in (("dicom", False), ("dicom-j2k", True)):
                _dicom(gray, compressed).save_as(folders[kind] / f"{i:05d}.dcm", enforce_file_format=True)
                rows[kind].append((f"{i:05d}.dcm", caption))
            rows["jpeg"].append((f"{i:05d}.jpg", caption))
            table["image"].append({"bytes": data, "path": f"{r.image_id}.jpg"})
            table["image_id"].append(r.image_id)
            table["caption"].append(caption)
            table["cui"].append(list(r.concepts))
            for name, payload in ((f"{i:05d}.jpg", data), (f"{i:05d}.txt", caption.encode()),
                                  (f"{i:05d}.json", json.dumps({"id": r.image_id}).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    for kind in ("jpeg", "dicom", "dicom-j2k"):
        with open(folders[kind] / "captions.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["image", "caption", "split"])
            w.writerows([(name, caption, "train") for name, caption in rows[kind]])
    pq.write_table(pa.table(table), folders["parquet"] / "train-00000-of-00001.parquet")
    return folders


def decode_rate(dataset, preprocess) -> float:
    """Decode + preprocess in this process only (no model): the ceiling decoding puts on a worker."""
    t0 = time.perf_counter()
    for r in dataset.records:
        preprocess(open_image(r.image))
    return len(dataset.records) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/roco-rad"))
    ap.add_argument("--backbone", default="effnet-lite0+minilm")
    ap.add_argument("--n", type=int, default=384)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()

    records = load_dataset(args.data).split("train")[: args.n]
    bb = create_backbone(args.backbone, device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        folders = build_formats(records, Path(tmp) / "data")
        sizes = {k: sum(p.stat().st_size for p in f.rglob("*") if p.is_file()) for k, f in folders.items()}
        pixels = torch.stack([bb.preprocess(open_image(r.image)) for r in load_dataset(folders["jpeg"]).records])

        def bare_forward() -> float:
            with torch.inference_mode():
                bb.encode_images(pixels[: args.batch_size])  # warm-up
                t0 = time.perf_counter()
                for s in range(0, len(pixels), args.batch_size):
                    bb.encode_images(pixels[s : s + args.batch_size])
                return len(pixels) / (time.perf_counter() - t0)

        bares = [bare_forward()]
        results = []
        for kind, folder in folders.items():
            ds = load_dataset(folder)
            assert len(ds.records) == len(records), (kind, len(ds.records))
            decode = decode_rate(ds, bb.preprocess)
            cfg = ExtractConfig(data=str(folder), backbone=args.backbone, batch_size=args.batch_size,
                                workers=args.workers, device="cpu", out=str(Path(tmp) / "out" / kind), progress=False)
            summary = extract_split(bb, ds, "train", cfg, "cpu")
            assert summary.images == len(records) and not summary.skipped, (kind, summary.skipped[:2])
            results.append((kind, ds.layout, sizes[kind], decode, summary.images_per_s))
        bares.append(bare_forward())  # again at the end: the machine's drift during the run shows here
        bare = float(np.mean(bares))

    cmd = "python benchmarks/decode.py " + " ".join(sys.argv[1:])
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads "
          f"{torch.get_num_threads()}, cpu")
    print(f"command: {cmd.strip()}")
    print(f"images: {len(records)} roco-rad train images, backbone {bb.name}, batch {args.batch_size}, "
          f"workers {args.workers}\n")
    print("| input | layout | MB | decode + preprocess, 1 process (img/s) | extract pipeline (img/s) | pipeline / bare forward |")
    print("|---|---|---|---|---|---|")
    print(f"| bare forward over pre-decoded tensors (before {bares[0]:.1f}, after {bares[1]:.1f}) | - | - | - | "
          f"{bare:.1f} | 1.00 |")
    for kind, layout, size, decode, pipe in results:
        print(f"| {kind} | {layout} | {size / 1e6:.1f} | {decode:.0f} | {pipe:.1f} | {pipe / bare:.2f} |")


if __name__ == "__main__":
    main()
