"""Images/s of the whole extract pipeline next to a bare forward loop over pre-decoded tensors, per runtime.

Both use the same backbone, batch size and machine in one run; the ratio (pipeline / bare) says how
much decoding, data loading and cache writing cost on top of the model itself, and the last column
compares each runtime's pipeline with PyTorch's.

    .venv/bin/python benchmarks/extract.py [--data ../shared/data/roco-rad] [--n 512] [--batch-size 64] [--workers 2]
        [--backbone effnet-lite0-ms+minilm] [--runtimes torch onnx]
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
from medembed.extract.backbones.onnx_runtime import use_onnx_images  # noqa: E402
from medembed.extract.datasets import load_dataset  # noqa: E402
from medembed.extract.extraction import ExtractConfig, extract_split  # noqa: E402
from medembed.extract.imaging import open_image  # noqa: E402


def bare_forward(bb, pixels: torch.Tensor, batch_size: int, device: str) -> float:
    """Images/s of the forward alone over pre-decoded, preprocessed tensors (after one warm-up batch)."""
    with torch.inference_mode():
        bb.encode_images(pixels[:batch_size].to(device))
        t0 = time.perf_counter()
        for s in range(0, len(pixels), batch_size):
            bb.encode_images(pixels[s : s + batch_size].to(device))
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return len(pixels) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/roco-rad"))
    ap.add_argument("--backbone", default="effnet-lite0-ms+minilm")
    ap.add_argument("--split", default="train")
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--runtimes", nargs="+", default=["torch", "onnx"], choices=["torch", "onnx"])
    args = ap.parse_args()

    ds = load_dataset(args.data)
    records = ds.split(args.split)[: args.n]
    ds = dataclasses.replace(ds, records=records)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for runtime in args.runtimes:
            bb = create_backbone(args.backbone, device=args.device)
            if runtime == "onnx":
                use_onnx_images(bb, Path(tmp) / "graphs")
            # bare: decode + preprocess everything first (not timed), then time only the forward passes
            pixels = torch.stack([bb.preprocess(open_image(r.image)) for r in records])
            bare = bare_forward(bb, pixels, args.batch_size, args.device)
            del pixels
            cfg = ExtractConfig(data=args.data, backbone=args.backbone, batch_size=args.batch_size,
                                workers=args.workers, device=args.device, out=str(Path(tmp) / runtime), progress=False,
                                runtime=runtime)
            t0 = time.perf_counter()
            s = extract_split(bb, ds, args.split, cfg, args.device)
            total = time.perf_counter() - t0
            rows.append((runtime, bare, s.images_per_s, len(records) / total))

    base = rows[0][2]
    cmd = "python benchmarks/extract.py " + " ".join(sys.argv[1:])
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads "
          f"{torch.get_num_threads()}, device {args.device}")
    print(f"command: {cmd.strip()}")
    print(f"images: {len(records)} from {args.data} ({args.split}), backbone {args.backbone}, batch {args.batch_size}, "
          f"workers {args.workers}\n")
    print(f"| runtime | measure | images/s | ratio to its bare forward | ratio to {rows[0][0]}'s pipeline |")
    print("|---|---|--:|--:|--:|")
    for runtime, bare, image_phase, end_to_end in rows:
        print(f"| {runtime} | bare forward over pre-decoded tensors | {bare:.1f} | 1.00 | |")
        print(f"| {runtime} | extract pipeline, image phase (decode in workers + forward + part writes) | "
              f"{image_phase:.1f} | {image_phase / bare:.2f} | {image_phase / base:.2f} |")
        print(f"| {runtime} | extract pipeline, end to end (+ captions, concept prompts, HDF5 assembly) | "
              f"{end_to_end:.1f} | {end_to_end / bare:.2f} | |")


if __name__ == "__main__":
    main()
