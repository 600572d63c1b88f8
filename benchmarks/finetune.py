"""Periodic unfreezing, measured.

    python benchmarks/finetune.py speed [--backbone tiny-clip --images 64 --unlocked 2 --epochs 1]
        seconds per fine-tuning epoch of the raw-image path vs the cached partial unfreeze (same blocks
        unlocked, same pairs, eval transform on both so only the frozen trunk differs), plus valid R@10 of
        the heads after each; one run, printed as a Markdown table.

Full-scale real-data runs (all roco-rad pairs, several cycles, LiT) are in benchmarks/quality.py.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(x) for x in r) + " |" for r in rows]
    return "\n".join(out)


# ------------------------------------------------------------------------------------------- speed
def _colour_dataset(root: Path, n_train: int, n_valid: int, size: int) -> Path:
    """ImageCLEF-2023-style folder of noisy coloured squares whose captions name the colour."""
    from PIL import Image

    rng = np.random.default_rng(0)
    colours = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "grey": (128, 128, 128)}
    (root / "images").mkdir(parents=True, exist_ok=True)
    k = 0
    for split, n in (("train", n_train), ("valid", n_valid)):
        caps, cons = ["ID,Caption"], ["ID,CUIs"]
        for _ in range(n):
            name = list(colours)[k % 4]
            arr = np.clip(np.array(colours[name])[None, None] + rng.normal(0, 40, (size, size, 3)), 0, 255)
            Image.fromarray(arr.astype(np.uint8)).save(root / "images" / f"IMG_{k:05d}.jpg")
            caps.append(f"IMG_{k:05d},A {name} square number {k}.")
            cons.append(f"IMG_{k:05d},C000000{k % 4}")
            k += 1
        (root / f"{split}_captions.csv").write_text("\n".join(caps) + "\n")
        (root / f"{split}_concepts.csv").write_text("\n".join(cons) + "\n")
    return root


def speed(args) -> None:
    from medembed.adapt.config import AdaptConfig
    from medembed.adapt.tuning.unfreeze import TuneConfig, train_with_unfreezing
    from medembed.common.recall_keys import recall_key
    from medembed.extract.extraction import ExtractConfig, extract

    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="ft-speed-"))
    try:
        data = _colour_dataset(work / "data", args.images, max(8, args.images // 4), args.size)
        cache = Path(extract(ExtractConfig(data=str(data), backbone=args.backbone, out=str(work / "features"),
                                           workers=0, progress=False)).out_dir)
        rows = []
        for cached in (False, True):
            config = AdaptConfig(features_dir=str(cache), out=str(work / f"run-{cached}"), head="mlp", dim=64,
                                 epochs=2, batch_size=args.batch, device="cpu")
            tune = TuneConfig(unlock=str(args.unlocked), every=1, epochs=args.epochs, batch_size=args.batch,
                              backbone_lr=1e-4, head_lr=1e-3, augment=False, cached_trunk=cached, rollback=False,
                              features_root=str(work / f"f-{cached}"))
            summary = train_with_unfreezing(config, tune, progress=False)
            (cycle,) = summary["cycles"]
            rows.append(["cached partial unfreeze" if cached else "raw images", round(cycle["seconds"] / args.epochs, 2),
                         cycle["pairs_per_s"], f"{cycle['train_loss']:.3f}", f"{summary['valid'][recall_key('t2i', 10)]:.1f}",
                         f"{summary['valid'][recall_key('i2t', 10)]:.1f}"])
        print(f"backbone {args.backbone}, {args.images} train images of {args.size}px, unlocked top {args.unlocked} "
              f"blocks per tower, {args.epochs} cycle epoch(s), batch {args.batch}, CPU threads {torch.get_num_threads()}\n")
        print(table(["path", "s/epoch", "pairs/s", "train loss", "valid t2i R@10", "valid i2t R@10"], rows))
        print(f"\nspeed-up per epoch: {rows[0][1] / max(rows[1][1], 1e-9):.2f}x (the cached path also built its "
              "trunk activations once)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("speed")
    s.add_argument("--backbone", default="tiny-clip")
    s.add_argument("--images", type=int, default=64)
    s.add_argument("--size", type=int, default=64)
    s.add_argument("--unlocked", type=int, default=2)
    s.add_argument("--epochs", type=int, default=1)
    s.add_argument("--batch", type=int, default=16)
    s.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    print("command: python benchmarks/finetune.py " + " ".join(sys.argv[1:]))
    speed(args)


if __name__ == "__main__":
    main()
