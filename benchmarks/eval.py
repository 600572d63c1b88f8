"""Retrieval evaluation at scale: peak memory and wall time next to the bare GEMM it cannot avoid.

Synthetic pool: n random unit image vectors and n random unit caption vectors (dim 512), caption i
belonging to image i. Both directions of the full ranking (text->image and image->text) are timed
through `evaluate.retrieval.compute`, then the same score matrices are computed in the same
chunks with nothing else done to them (the GEMM floor, identical FLOPs, same run, same threads).

Peak RSS is the process high-water mark (`resource.getrusage`) read right after the ranking, so it
includes the two input matrices; torch's allocations are invisible to tracemalloc, hence RSS.

    python benchmarks/eval.py                 # 100k x 100k
    python benchmarks/eval.py --n 20000       # a smaller pool on a small machine
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medembed.common import ranking  # noqa: E402
from medembed.common.recall_keys import DEFAULT_KS, recall_key  # noqa: E402
from medembed.evaluate import retrieval  # noqa: E402


def rss_mb() -> float:
    """Peak resident set size so far, in MiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if platform.system() == "Darwin" else peak / 1024


def unit_rows(n: int, dim: int, seed: int, chunk: int = 16384) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    out = torch.empty(n, dim)
    for s in range(0, n, chunk):  # in chunks: no transient float64 or 2x copy of the whole matrix
        block = torch.randn(min(chunk, n - s), dim, generator=gen)
        out[s : s + chunk] = block / block.norm(dim=1, keepdim=True)
    return out


@torch.no_grad()
def gemm_floor(images: torch.Tensor, texts: torch.Tensor, chunk: int) -> float:
    """Seconds for both directions' score matrices in the same chunks, results discarded."""
    start = time.perf_counter()
    for queries, pool in ((texts, images), (images, texts)):
        for s in range(0, queries.shape[0], chunk):
            sims = queries[s : s + chunk] @ pool.T
            del sims
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000, help="images = captions in the pool (default 100000)")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--memory-mb", type=float, default=ranking.DEFAULT_MEMORY_MB,
                    help="score-matrix budget per chunk (common.ranking.chunk_rows)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    base = rss_mb()
    images = unit_rows(args.n, args.dim, seed=0)
    texts = unit_rows(args.n, args.dim, seed=1)
    caption_image = torch.arange(args.n)
    inputs = rss_mb()
    chunk = ranking.chunk_rows(args.n, args.memory_mb)

    start = time.perf_counter()
    metrics = retrieval.compute(images, texts, caption_image, ks=DEFAULT_KS, memory_mb=args.memory_mb)
    eval_s = time.perf_counter() - start
    peak = rss_mb()
    gemm_s = gemm_floor(images, texts, chunk)
    flops = 2 * 2 * args.n * args.n * args.dim  # two directions, 2 flops per multiply-add

    command = "python benchmarks/eval.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"`{command.strip()}` — torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f} at the end (other processes share the CPUs)\n")
    print("| pool (images x captions) | dim | chunk rows | eval wall s | GEMM wall s | eval / GEMM | "
          "GEMM GFLOP/s | peak RSS MiB | inputs RSS MiB | R@1 t2i / i2t |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    print(f"| {args.n:,} x {args.n:,} | {args.dim} | {chunk} | {eval_s:.1f} | {gemm_s:.1f} | {eval_s / gemm_s:.2f} | "
          f"{flops / gemm_s / 1e9:.0f} | {peak:.0f} | {inputs - base:.0f} | "
          f"{metrics[recall_key('t2i', 1)]:.4f} / {metrics[recall_key('i2t', 1)]:.4f} |")
    print(f"\ntargets: peak RSS < 2048 MiB ({'met' if peak < 2048 else 'MISSED'}), "
          f"eval <= 1.5x GEMM ({'met' if eval_s <= 1.5 * gemm_s else 'MISSED'}); "
          f"chance R@1 = {100 / args.n:.4f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
