"""`index` on one machine vs `index --engine ray` on a local Ray cluster, over the same run and pool.

    python benchmarks/index_ray.py --run /work/serve-bench/run --parts 2

Builds the run's index over its test split (`--kind auto`) once in this process and once filled in
`--parts` Ray tasks (a local cluster of that many CPUs, 1 core each), timing each build, then checks
that the two answer alike: the vectors files byte for byte, and the top 10 of 200 random unit queries.
Made for the 10M-image pool `benchmarks/serve_scale.py` writes.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medembed.serve.index import IndexOptions, build_index, load_index, search_index  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--parts", type=int, default=2)
    args = p.parse_args()
    rows, answers = [], []
    for engine in ("local", "ray"):
        import ray

        if engine == "ray":
            ray.init(num_cpus=args.parts, include_dashboard=False, log_to_driver=False)
        t0 = time.perf_counter()
        path, meta = build_index(args.run, IndexOptions(split="test", engine=engine, parts=args.parts, overwrite=True))
        seconds = time.perf_counter() - t0
        if engine == "ray":
            ray.shutdown()
        index, _ = load_index(args.run, "test", meta.kind)
        queries = np.random.default_rng(0).standard_normal((200, meta.dim)).astype(np.float32)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        answers.append((search_index(index, queries, 10)[1], path.with_suffix(".vectors")))
        digest = hashlib.sha256()
        with open(path.with_suffix(".vectors"), "rb") as f:
            for block in iter(lambda: f.read(64 << 20), b""):
                digest.update(block)
        rows.append((engine if engine == "local" else f"ray, {args.parts} parts", meta.kind, meta.ntotal, seconds,
                     digest.hexdigest()[:12]))
    same = bool((answers[0][0] == answers[1][0]).all())
    print("\n| build | kind | vectors | seconds | vectors file sha256 |\n|---|---|--:|--:|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]:,} | {r[3]:.0f} | {r[4]} |")
    print(f"\nspeed-up {rows[0][3] / rows[1][3]:.2f}x; top 10 of 200 queries identical: {same}")


if __name__ == "__main__":
    main()
