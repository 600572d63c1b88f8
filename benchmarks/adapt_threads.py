"""One CPU thread or all of them for the adapter loop: seconds of training epochs on a real cache.

    python benchmarks/adapt_threads.py [--features features/roco-rad/effnet-lite0-ms+minilm] [--epochs 3]

Each setting is trained twice per thread count (1, then torch's default), alternating, without the
query bank and the refit, so only the epochs are timed (`summary["seconds"]`); the two valid results
are compared too, since the thread count must not change what is learned. Prints a Markdown table
with the ratio (all threads / one thread); `adapt.trainer.training_threads` follows it.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SETTINGS = [dict(), dict(ensemble=1), dict(ensemble=4, dim=256), dict(ensemble=1, dim=256), dict(ensemble=1, dim=128),
            dict(ensemble=1, dim=32), dict(ensemble=1, dim=64, batch_size=64)]


def main() -> None:
    from medembed.adapt.config import AdaptConfig
    from medembed.adapt.trainer import train
    from medembed.cache.reader import feature_widths
    from medembed.cache.schema import split_file
    from medembed.common.recall_keys import MEAN_RECALL

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--features", default=str(REPO / "features" / "roco-rad" / "effnet-lite0-ms+minilm"))
    p.add_argument("--epochs", type=int, default=3)
    args = p.parse_args()
    every = torch.get_num_threads()
    print(f"| setting | multiply-adds per step | 1 thread s | {every} threads s | ratio | same valid recall |")
    print("|---|--:|--:|--:|--:|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for i, kw in enumerate(SETTINGS):
            seconds: dict[int, list[float]] = {1: [], every: []}
            recall: dict[int, float] = {}
            for rep in range(2):
                for threads in (1, every):
                    config = AdaptConfig(features_dir=args.features, out=f"{tmp}/{i}-{rep}-{threads}", epochs=args.epochs,
                                         threads=threads, refit=False, querybank=False, **kw)
                    s = train(config, progress=False)
                    seconds[threads].append(s["seconds"])
                    recall[threads] = s["valid"][MEAN_RECALL]
            image_dim, text_dim = feature_widths(Path(args.features) / split_file("train"))
            c = AdaptConfig(features_dir="", out="", **kw)
            macs = c.batch_size * (image_dim + text_dim) * c.dim * c.ensemble
            one, many = min(seconds[1]), min(seconds[every])
            name = ", ".join(f"{k}={v}" for k, v in kw.items()) or "the default (4 heads of 1024)"
            print(f"| {name} | {macs:.2g} | {one:.2f} | {many:.2f} | {many / one:.2f} | {recall[1] == recall[every]} |",
                  flush=True)


if __name__ == "__main__":
    main()
