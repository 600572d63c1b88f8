"""FAISS index benchmark: recall@10 of the approximate kinds against exact search, and queries/s.

The database is N synthetic unit vectors with the structure of real embeddings: clusters, and a
continuum of neighbours inside each (uniform vectors on the sphere make "the 10 nearest" near-ties
that no index can, or needs to, find). Each query is a noisy copy of a random database vector.
Every kind is built by `evaluate.index.new_index` with the `IndexOptions` defaults of
`cli.py index`, one at a time, so only one index sits beside the data. Search-time knobs (ivf
nprobe, hnsw efSearch) are swept on the one built index: the recall / speed trade-off at a glance.

recall@10 = |approximate top-10 ∩ exact top-10| / 10, averaged over queries; source@1 = the vector
a query was copied from ranks first. queries/s: all queries in one batched call, on the threads
FAISS is given (a warm-up call first).

usage: python benchmarks/index.py [--n 1000000] [--dim 256] [--queries 1000] [--kinds flat,ivf,hnsw]
                                  [--nlist 0] [--nprobe 0,...] [--m 32] [--ef-search 128,...] [--threads 0]
"""
from __future__ import annotations

import argparse
import gc
import shlex
import sys
import time
from pathlib import Path

import faiss
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medembed.serve.index import IndexOptions, new_index, search_index, tune  # noqa: E402


def structured_unit_vectors(n: int, dim: int, clusters: int, latent: int, spread: float, seed: int,
                            chunk: int = 100_000) -> np.ndarray:
    """n float32 unit vectors near a random `latent`-dimensional subspace (embeddings use few of
    their dimensions), grouped around `clusters` centres in it that overlap rather than sit apart;
    each point is its centre plus an in-subspace offset of norm ~`spread` plus a little noise."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((dim, latent)))[0].T.astype(np.float32)  # [latent, dim], orthonormal rows
    centres = rng.standard_normal((clusters, latent)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = np.empty((n, dim), dtype=np.float32)
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        z = centres[rng.integers(0, clusters, m)]
        z += np.float32(spread / np.sqrt(latent)) * rng.standard_normal((m, latent), dtype=np.float32)
        block = z @ basis + np.float32(0.1 / np.sqrt(dim)) * rng.standard_normal((m, dim), dtype=np.float32)
        x[s : s + m] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return x


def noisy_queries(db: np.ndarray, q: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed + 1)
    src = rng.choice(db.shape[0], size=q, replace=False)
    x = db[src] + np.float32(noise / np.sqrt(db.shape[1])) * rng.standard_normal((q, db.shape[1]), dtype=np.float32)
    return np.ascontiguousarray(x / np.linalg.norm(x, axis=1, keepdims=True)), src


def recall_at(rows: np.ndarray, exact: np.ndarray, k: int) -> float:
    return float(np.mean([len(set(a[:k]) & set(b[:k])) / k for a, b in zip(rows.tolist(), exact.tolist())]))


def timed_search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    search_index(index, queries[:10], k)  # warm-up: first-call allocations stay out of the timing
    t0 = time.perf_counter()
    _, rows = search_index(index, queries, k)
    return rows, queries.shape[0] / (time.perf_counter() - t0)


def build(kind: str, db: np.ndarray, options: IndexOptions, seed: int) -> tuple[faiss.Index, dict, float, float]:
    params = options.plan(db.shape[0], db.shape[1]).params
    index = new_index(kind, db.shape[1], params)
    t0 = time.perf_counter()
    if kind == "ivf":
        sample = np.random.default_rng(seed + 2).choice(db.shape[0], size=params["train_size"], replace=False)
        index.train(db[np.sort(sample)])
    t_train = time.perf_counter() - t0
    index.add(db)
    return index, params, time.perf_counter() - t0, t_train


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--kinds", default="flat,ivf,hnsw")
    ap.add_argument("--clusters", type=int, default=0, help="0: n / 100")
    ap.add_argument("--latent", type=int, default=24, help="dimensions the vectors mostly live in")
    ap.add_argument("--spread", type=float, default=1.0, help="norm of the offsets around each cluster centre")
    ap.add_argument("--query-noise", type=float, default=0.1)
    ap.add_argument("--nlist", type=int, default=0, help="0: the index command's default, sqrt(n)")
    ap.add_argument("--nprobe", default="0,8,32,128", help="comma list swept on one ivf index; 0: the default")
    ap.add_argument("--m", type=int, default=32)
    ap.add_argument("--ef-construction", type=int, default=40)
    ap.add_argument("--ef-search", default="32,64,128", help="comma list swept on one hnsw index")
    ap.add_argument("--threads", type=int, default=0, help="FAISS threads; 0: its default")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    kinds = [k for k in args.kinds.split(",") if k]
    clusters = args.clusters or max(1, args.n // 100)

    t0 = time.perf_counter()
    db = structured_unit_vectors(args.n, args.dim, clusters, args.latent, args.spread, args.seed)
    queries, src = noisy_queries(db, args.queries, args.query_noise, args.seed)
    t_data = time.perf_counter() - t0

    rows_out = []  # (kind, params, build, qps, recall, source@1)
    index, _, t_build, _ = build("flat", db, IndexOptions(kind="flat"), args.seed)
    exact, qps = timed_search(index, queries, args.k)
    del index
    rows_out.append(("flat", "exact inner product", f"{t_build:.1f}", qps, 1.0, float(np.mean(exact[:, 0] == src))))
    for kind in kinds:
        if kind == "flat":
            continue
        opts = IndexOptions(kind=kind, nlist=args.nlist, m=args.m, ef_construction=args.ef_construction, seed=args.seed)
        index, params, t_build, t_train = build(kind, db, opts, args.seed)
        build_s = f"{t_build:.1f}" + (f" (train {t_train:.1f})" if kind == "ivf" else "")
        if kind == "ivf":
            default = params["nprobe"]
            sweep = [("nprobe", p or default, p == 0 or p == default) for p in _ints(args.nprobe)]
            fixed = f"nlist {params['nlist']}, train {params['train_size']:,}"
        else:
            default = IndexOptions().ef_search
            sweep = [("ef_search", e, e == default) for e in _ints(args.ef_search)]
            fixed = f"M {params['m']}, efConstruction {params['ef_construction']}"
        seen = set()
        for knob, value, is_default in sweep:
            if value in seen:
                continue
            seen.add(value)
            tune(index, {knob: value})
            rows, qps = timed_search(index, queries, args.k)
            label = f"{fixed}, {knob} {value}" + (" (default)" if is_default else "")
            rows_out.append((kind, label, build_s, qps, recall_at(rows, exact, args.k), float(np.mean(rows[:, 0] == src))))
            build_s = "〃"
        del index
        gc.collect()

    total = time.perf_counter() - t0
    print(f"{args.n:,} unit vectors x {args.dim} ({clusters:,} clusters, {args.latent}-d latent subspace, spread {args.spread}), "
          f"{args.queries:,} queries (noisy copies of database vectors), k={args.k}; "
          f"FAISS {faiss.__version__} on {faiss.omp_get_max_threads()} thread(s)\n")
    print(f"| kind | parameters | build s | queries/s | recall@{args.k} vs exact | source@1 |")
    print("|------|------------|--------:|----------:|-------------------:|---------:|")
    for kind, label, build_s, qps, rec, s1 in rows_out:
        print(f"| {kind} | {label} | {build_s} | {qps:,.0f} | {rec:.3f} | {s1:.3f} |")
    print(f"\ndata generation {t_data:.1f} s, total {total:.1f} s")
    print("command: python benchmarks/index.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])))


if __name__ == "__main__":
    main()
