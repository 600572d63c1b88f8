"""Images/s of the whole extract pipeline next to a bare forward loop over pre-decoded tensors.

Both use the same backbone, batch size and machine in one run; the ratio (pipeline / bare) says how
much decoding, data loading and cache writing cost on top of the model itself.

    .venv/bin/python benchmarks/extract.py [--data ../shared/data/roco-rad] [--n 512] [--batch-size 64] [--workers 2]
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from medembed.extract.backbones import create_backbone  # noqa: E402
from medembed.extract.datasets import load_dataset  # noqa: E402
from medembed.extract.extraction import ExtractConfig, extract_split  # noqa: E402
from medembed.extract.imaging import open_image  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/roco-rad"))
    ap.add_argument("--backbone", default="effnet-lite0+minilm")
    ap.add_argument("--split", default="train")
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    ds = load_dataset(args.data)
    records = ds.split(args.split)[: args.n]
    ds = dataclasses.replace(ds, records=records)
    bb = create_backbone(args.backbone, device=args.device)

    # bare: decode + preprocess everything first (not timed), then time only the forward passes
    pixels = torch.stack([bb.preprocess(open_image(r.image)) for r in records])
    with torch.inference_mode():
        bb.encode_images(pixels[: args.batch_size].to(args.device))  # warm-up
        t0 = time.perf_counter()
        for s in range(0, len(pixels), args.batch_size):
            bb.encode_images(pixels[s : s + args.batch_size].to(args.device))
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        bare = len(pixels) / (time.perf_counter() - t0)

    with tempfile.TemporaryDirectory() as tmp:
        cfg = ExtractConfig(data=args.data, backbone=args.backbone, batch_size=args.batch_size,
                            workers=args.workers, device=args.device, out=tmp, progress=False)
        t0 = time.perf_counter()
        s = extract_split(bb, ds, args.split, cfg, args.device)
        total = time.perf_counter() - t0
    pipe_images = s.images_per_s
    pipe_total = len(records) / total

    cmd = "python benchmarks/extract.py " + " ".join(sys.argv[1:])
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads "
          f"{torch.get_num_threads()}, device {args.device}")
    print(f"command: {cmd.strip()}")
    print(f"images: {len(records)} from {args.data} ({args.split}), backbone {bb.name}, batch {args.batch_size}, "
          f"workers {args.workers}\n")
    print("| measure | images/s | ratio to bare |")
    print("|---|---|---|")
    print(f"| bare forward over pre-decoded tensors | {bare:.1f} | 1.00 |")
    print(f"| extract pipeline, image phase (decode in workers + forward + part writes) | {pipe_images:.1f} | {pipe_images / bare:.2f} |")
    print(f"| extract pipeline, end to end (+ captions, concept prompts, HDF5 assembly) | {pipe_total:.1f} | {pipe_total / bare:.2f} |")


if __name__ == "__main__":
    main()
