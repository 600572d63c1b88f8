"""An adapter epoch over millions of cached pairs streamed from disk within --max-memory-gb.

Writes N synthetic float16 pairs (image 512-d, caption 384-d: correlated through a shared 64-d latent,
so there is something to learn) as shard files of 1M pairs joined into one train.h5 without copying
(as a sharded or Ray extraction leaves them), plus a 10,000-pair valid split; then runs
`cli.py adapt` on them in a fresh process, one epoch, and reports the memory plan, the process's
measured peak (VmHWM), the epoch's wall time and pairs/s, and valid recall. The shard files are
left in --out for a second run (delete them after: 10M pairs take 18 GB).

usage: python benchmarks/adapt_stream.py --pairs 10000000 --out /tmp/stream-bench [--max-memory-gb 2]
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medembed.cache import schema  # noqa: E402
from medembed.cache.reader import CachedSplit  # noqa: E402
from medembed.cache.writer import write_joined, write_split  # noqa: E402
from medembed.common.recall_keys import recall_key  # noqa: E402

SHARD = 1_000_000
IMAGE_DIM, TEXT_DIM, LATENT = 512, 384, 64

RUNNER = """
import sys, time
from medembed.common.memory import peak_rss_bytes
t0 = time.perf_counter()
try:
    from medembed.cli import main
    main(sys.argv[1:], standalone_mode=False)
finally:
    print("PEAK", peak_rss_bytes(), "WALL", time.perf_counter() - t0, flush=True)
"""


def pairs(n: int, seed: int, split: str, first: int = 0, image_dim: int = IMAGE_DIM, text_dim: int = TEXT_DIM,
          noise: float = 1.5, world_seed: int = 99, locations: bool = False) -> CachedSplit:
    """n correlated pairs, drawn 65,536 at a time, stored float16 (the maps from the latent fixed by
    `world_seed`, shared by every split of one pool); `locations`: record an image path per row."""
    g = torch.Generator().manual_seed(seed)
    world = torch.Generator().manual_seed(world_seed)
    a = torch.randn(LATENT, image_dim, generator=world) / LATENT ** 0.5
    b = torch.randn(LATENT, text_dim, generator=world) / LATENT ** 0.5
    img = torch.empty(n, image_dim, dtype=torch.float16)
    txt = torch.empty(n, text_dim, dtype=torch.float16)
    for s in range(0, n, 65536):
        z = torch.randn(min(65536, n - s), LATENT, generator=g)
        img[s : s + len(z)] = (z @ a + noise * torch.randn(len(z), image_dim, generator=g)).half()
        txt[s : s + len(z)] = (z @ b + noise * torch.randn(len(z), text_dim, generator=g)).half()
    return CachedSplit(split=split, image_ids=[f"{split}{first + i}" for i in range(n)], image_features=img,
                       caption_features=txt, caption_image=torch.arange(n), captions=[f"c{first + i}" for i in range(n)],
                       image_locations=[f"images/{first + i}.png" for i in range(n)] if locations else [],
                       attrs={"backbone": "synthetic", "dataset": "synthetic", "split": split, "synthetic": True})


def write_cache(folder: Path, n: int) -> float:
    t0 = time.perf_counter()
    shards = []
    count = -(-n // SHARD)
    for i in range(count):
        path = folder / schema.shard_file("train", i, count)
        if not path.exists():
            write_split(path, pairs(min(SHARD, n - i * SHARD), seed=i, split="train", first=i * SHARD))
        shards.append(path)
        print(f"  shard {i + 1}/{count} written", flush=True)
    (folder / schema.split_file("train")).unlink(missing_ok=True)
    write_joined(folder / schema.split_file("train"), shards, {"backbone": "synthetic", "dataset": "synthetic", "split": "train",
                                               "dtype": "float16", "n_records": n})
    if not (folder / schema.split_file("valid")).exists():
        write_split(folder / schema.split_file("valid"), pairs(10_000, seed=10_000, split="valid"))
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=10_000_000)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--max-memory-gb", type=float, default=2.0)
    ap.add_argument("--batch-size", type=int, default=1024)
    args = ap.parse_args(argv)
    folder = args.out / "synthetic" / "pairs"
    folder.mkdir(parents=True, exist_ok=True)
    wrote = write_cache(folder, args.pairs)
    size = sum(p.stat().st_size for p in folder.glob(f"train*{schema.FILE_SUFFIX}"))
    run = args.out / "run"
    if run.exists():
        import shutil

        shutil.rmtree(run)
    cmd = ["adapt", "--features", str(folder), "--out", str(run), "--head", "linear", "--dim", "256", "--ensemble", "1",
           "--epochs", "1", "--batch-size", str(args.batch_size), "--max-memory-gb", str(args.max_memory_gb)]
    done = subprocess.run([sys.executable, "-c", RUNNER, *cmd], capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        sys.exit(done.stderr[-3000:])
    tail = done.stdout.rsplit("PEAK", 1)[1].split()
    peak, wall = int(tail[0]), float(tail[2])
    summary = json.loads((run / "summary.json").read_text())
    mem = summary["memory"]
    print(f"\ncache: {args.pairs:,} pairs ({IMAGE_DIM}-d image, {TEXT_DIM}-d caption, float16), "
          f"{size / 2**30:.1f} GiB in {-(-args.pairs // SHARD)} shard files, written in {wrote:.0f} s\n")
    print("| pairs | cache GiB | --max-memory-gb | plan | planned peak GiB | measured peak GiB | epoch s | pairs/s "
          "| process s | valid R@10 t2i / i2t |")
    print("|--:|--:|--:|---|--:|--:|--:|--:|--:|--:|")
    v = summary["valid"]
    print(f"| {args.pairs:,} | {size / 2**30:.1f} | {args.max_memory_gb:g} | "
          f"{'streamed, chunks of ' + format(mem['chunk_rows'], ',') if mem['streamed'] else 'in memory'} | "
          f"{mem['planned_bytes'] / 2**30:.2f} | {peak / 2**30:.2f} | {summary['seconds']:.0f} | "
          f"{summary['n_train_pairs'] / summary['seconds']:,.0f} | {wall:.0f} | "
          f"{v[recall_key('t2i', 10)]:.1f} / {v[recall_key('i2t', 10)]:.1f} |")
    print("\ncommand: python benchmarks/adapt_stream.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])))


if __name__ == "__main__":
    main()
