"""Index at archive scale: build time, peak memory, bytes per vector, queries/s at 1 and 8 clients and
recall@10 against exact search, for 1M and 10M vectors streamed through the index the way
`cli.py index` streams a cache, never held whole in memory.

Vectors: unit vectors shaped like real embeddings (clusters that overlap, in a low-dimensional
subspace, plus a little noise; as in benchmarks/index.py), generated chunk by chunk from a seed
per chunk and written to a float16 file beside the index: that file stands in for the cache
search re-scores candidates from. Queries: noisy copies of database vectors. Exact top-10 is
computed in the same streamed pass (a running top-k per query), so ground truth costs no memory.

Each kind is planned by `IndexOptions.plan` under --max-memory-gb (what `cli.py index` does),
built with `new_index` / `train_index` / `fill_index` in chunks of 65,536 rows, written, and read
back as search reads it (ivf's lists memory-mapped; FAISS reads ivfpq's into memory). A query is what `search` does: the index's
top k (ivfpq: its top `rerank` candidates, re-scored exactly from the vector file). 1 client:
queries one at a time, FAISS on all cores; 8 clients: 8 processes doing the same, one FAISS
thread each, each with the index loaded as search loads it (a multi-worker server).

peak MB: the building process's peak resident memory (VmHWM; in brackets what the process held
after its imports, before building);
search MB: resident memory after loading the index for search.

A real pool: `--run RUN` builds the same kinds over the run's whole cache with `build_index` and
queries them through `Searcher` (re-scoring included) with the run's test captions.

usage: python benchmarks/index_scale.py --n 10000000 [--dim 256] [--kinds auto,ivfpq] [--max-memory-gb 4]
       python benchmarks/index_scale.py --run runs/NAME --kinds auto,ivfpq
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import shlex
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medembed.serve.index import (  # noqa: E402
    IndexOptions,
    fill_index,
    new_index,
    search_index,
    train_index,
    tune,
)

CHUNK = 65536


class Collection:
    """n unit vectors of `dim`, chunk i drawn from seed (seed, i): any chunk can be made again alone."""

    def __init__(self, n: int, dim: int, clusters: int, latent: int, spread: float, seed: int):
        rng = np.random.default_rng(seed)
        self.n, self.dim, self.seed, self.latent, self.spread = n, dim, seed, latent, spread
        self.basis = np.linalg.qr(rng.standard_normal((dim, latent)))[0].T.astype(np.float32)
        centres = rng.standard_normal((clusters, latent)).astype(np.float32)
        self.centres = centres / np.linalg.norm(centres, axis=1, keepdims=True)

    def chunk(self, i: int) -> np.ndarray:
        rng = np.random.default_rng((self.seed, i))
        m = min(CHUNK, self.n - i * CHUNK)
        z = self.centres[rng.integers(0, len(self.centres), m)]
        z = z + np.float32(self.spread / np.sqrt(self.latent)) * rng.standard_normal((m, self.latent), dtype=np.float32)
        x = z @ self.basis + np.float32(0.1 / np.sqrt(self.dim)) * rng.standard_normal((m, self.dim), dtype=np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    def chunks(self):
        for i in range((self.n + CHUNK - 1) // CHUNK):
            yield self.chunk(i)


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def rss_mb() -> float:
    return _status_mb("VmRSS")


def peak_mb() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited across exec)."""
    return _status_mb("VmHWM")


def write_and_truth(coll: Collection, queries: np.ndarray, k: int, path: Path) -> np.ndarray:
    """Write the vectors (float16) to `path` and return each query's exact top-k rows, in one pass."""
    best_s = np.full((len(queries), k), -np.inf, np.float32)
    best_r = np.zeros((len(queries), k), np.int64)
    with open(path, "wb") as f:
        for i, x in enumerate(coll.chunks()):
            f.write(x.astype(np.float16).tobytes())
            s = queries @ x.T
            top = np.argpartition(-s, k - 1, axis=1)[:, :k] if s.shape[1] > k else np.arange(s.shape[1])[None].repeat(len(s), 0)
            cand_s = np.concatenate([best_s, np.take_along_axis(s, top, 1)], 1)
            cand_r = np.concatenate([best_r, top + i * CHUNK], 1)
            order = np.argsort(-cand_s, 1, kind="stable")[:, :k]
            best_s, best_r = np.take_along_axis(cand_s, order, 1), np.take_along_axis(cand_r, order, 1)
    return best_r


def make_queries(coll: Collection, q: int, noise: float, seed: int) -> np.ndarray:
    first = coll.chunk(0)  # rows are independent draws: copies of the first chunk's rows are copies of the collection's
    rng = np.random.default_rng(seed + 1)
    x = first[rng.choice(len(first), size=q, replace=False)]
    x = x + np.float32(noise / np.sqrt(coll.dim)) * rng.standard_normal(x.shape, dtype=np.float32)
    return np.ascontiguousarray(x / np.linalg.norm(x, axis=1, keepdims=True), dtype=np.float32)


def build(coll: Collection, opts: IndexOptions, work: Path, out=None):
    """Plan, train, fill and write one index; in a child process `out` receives its results and peak memory."""
    base = rss_mb()
    plan = opts.plan(coll.n, coll.dim)
    t0 = time.perf_counter()
    index = new_index(plan.kind, coll.dim, plan.params)
    if "train_size" in plan.params:
        need, sample, i = plan.params["train_size"], [], 0
        while sum(len(s) for s in sample) < need:  # independent rows: the first chunks are a uniform sample
            sample.append(coll.chunk(i))
            i += 1
        train_index(index, plan.kind, np.concatenate(sample)[:need])
        del sample
    t_train = time.perf_counter() - t0
    fill_index(index, coll.chunks())
    t_build = time.perf_counter() - t0
    path = work / f"{plan.kind}.faiss"
    faiss.write_index(index, str(path))
    del index
    result = plan, path, t_train, t_build, peak_mb(), base
    if out is not None:
        out.put(result)
    return result


def build_apart(coll: Collection, opts: IndexOptions, work: Path):
    """`build` in a fresh process, so its peak memory is the build's own (imports included, shown apart)."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=build, args=(coll, opts, work, out))
    proc.start()
    result = out.get()
    proc.join()
    return result


class Searcher:
    """What `search` does per query: the index's top k, or its top `rerank` re-scored from the vectors."""

    def __init__(self, index, rerank: int, vectors: np.ndarray):
        self.index, self.rerank, self.vectors = index, rerank, vectors

    def __call__(self, q: np.ndarray, k: int) -> np.ndarray:
        _, rows = search_index(self.index, q, max(k, self.rerank))
        if not self.rerank:
            return rows[:, :k]
        out = []
        for qi, r in zip(q, rows):
            r = r[r >= 0]
            exact = self.vectors[np.sort(r)].astype(np.float32) @ qi
            out.append(np.sort(r)[np.argsort(-exact, kind="stable")[:k]])
        return np.array(out)


def qps(search: Searcher, queries: np.ndarray, k: int) -> float:
    """Queries/s of one client asking one query at a time."""
    search(queries[:5], k)  # warm-up
    t0 = time.perf_counter()
    for q in queries:
        search(q[None], k)
    return len(queries) / (time.perf_counter() - t0)


def _client(path: str, params: dict, vectors: tuple, queries: np.ndarray, k: int, barrier, out) -> None:
    """One client process: the index loaded as search loads it, one FAISS thread, queries one by one."""
    faiss.omp_set_num_threads(1)
    index = tune(faiss.read_index(path, faiss.IO_FLAG_MMAP if "pq_bytes" not in params and "nprobe" in params else 0),
                 params)
    search = Searcher(index, int(params.get("rerank", 0)), np.memmap(vectors[0], dtype=np.float16, mode="r",
                                                                      shape=vectors[1]))
    search(queries[:5], k)
    barrier.wait()
    t0 = time.perf_counter()
    for q in queries:
        search(q[None], k)
    out.put(time.perf_counter() - t0)


def qps_clients(path: Path, params: dict, vectors: tuple, queries: np.ndarray, k: int, clients: int) -> float:
    """Queries/s of `clients` processes each asking its share of the queries (a multi-worker server)."""
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(clients), ctx.Queue()
    procs = [ctx.Process(target=_client, args=(str(path), params, vectors, part, k, barrier, out))
             for part in np.array_split(queries, clients)]
    for p in procs:
        p.start()
    times = [out.get() for _ in procs]
    for p in procs:
        p.join()
    return len(queries) / max(times)


def recall(rows: np.ndarray, exact: np.ndarray, k: int) -> float:
    return float(np.mean([len(set(a[:k]) & set(b[:k])) / k for a, b in zip(rows.tolist(), exact.tolist())]))


def real_pool(run_dir: str, kinds: list[str], max_memory_gb: float, k: int) -> None:
    """The same kinds over a real run's whole pool (every split of its cache), through `build_index` and
    `Searcher` as `cli.py index` and `search` use them; queries: the run's test captions (cached
    features through the run's text head), exact = the run's exact scan, query bank included."""
    from medembed.cache.reader import load_split
    from medembed.serve.index import build_index
    from medembed.serve.search import Searcher

    exact = Searcher(run_dir, use_index=False)
    test = next(s for s in exact.pool.splits if s.split == "test")
    queries = exact.model.texts(load_split(test.path, with_views=False).caption_features)
    want = [[h.image_id for h in exact.images(q[None], k).hits] for q in queries]
    n = exact.pool.n_images
    print(f"{run_dir}: pool of {n:,} images (all splits), {len(queries)} test captions as queries, k={k}\n")
    print("| kind | parameters | build s | bytes/vector | q/s 1 client | recall@10 vs exact |")
    print("|---|---|--:|--:|--:|--:|")
    for asked in kinds:
        path, meta = build_index(run_dir, IndexOptions(kind=asked, max_memory_gb=max_memory_gb, overwrite=True))
        indexed = Searcher(run_dir)  # takes the index just built (the most recent)
        assert indexed.index is not None and indexed.index[1].kind == meta.kind
        t0 = time.perf_counter()
        got = [[h.image_id for h in indexed.images(q[None], k).hits] for q in queries]
        q1 = len(queries) / (time.perf_counter() - t0)
        r = np.mean([len(set(a) & set(b)) / k for a, b in zip(got, want)])
        shown = ", ".join(f"{a} {b}" for a, b in meta.params.items() if a != "seed") or "exact"
        print(f"| {(asked + ' → ') if asked == 'auto' else ''}{meta.kind} | {shown} | {meta.build_seconds:.0f} "
              f"| {meta.index_bytes / meta.ntotal:,.0f} | {q1:,.0f} | {r:.3f} |", flush=True)
        path.unlink()
        path.with_suffix(".json").unlink()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--kinds", default="auto,ivfpq", help="comma list; auto = what `cli.py index` picks")
    ap.add_argument("--max-memory-gb", type=float, default=4.0)
    ap.add_argument("--clusters", type=int, default=0, help="0: n / 100")
    ap.add_argument("--latent", type=int, default=24)
    ap.add_argument("--spread", type=float, default=1.0)
    ap.add_argument("--query-noise", type=float, default=0.1)
    ap.add_argument("--nprobe", default="0", help="comma list of nprobe swept on each ivf/ivfpq index; 0: the default")
    ap.add_argument("--rerank", type=int, default=IndexOptions().rerank, help="ivfpq candidates re-scored exactly")
    ap.add_argument("--work", default=None, help="folder for the vector file and indexes (default: a temporary one)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--run", default=None, help="measure a real run's pool instead of synthetic vectors")
    args = ap.parse_args(argv)
    if args.run:
        real_pool(args.run, [k for k in args.kinds.split(",") if k], args.max_memory_gb, args.k)
        print("\ncommand: python benchmarks/index_scale.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])))
        return
    command = "python benchmarks/index_scale.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    coll = Collection(args.n, args.dim, args.clusters or max(1, args.n // 100), args.latent, args.spread, args.seed)
    queries = make_queries(coll, args.queries, args.query_noise, args.seed)
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        exact = write_and_truth(coll, queries, args.k, work / "vectors.f16")
        t_truth = time.perf_counter() - t0
        vectors = np.memmap(work / "vectors.f16", dtype=np.float16, mode="r", shape=(args.n, args.dim))
        print(f"{args.n:,} unit vectors x {args.dim} ({len(coll.centres):,} clusters, {args.latent}-d latent), "
              f"{args.queries} noisy-copy queries, k={args.k}, --max-memory-gb {args.max_memory_gb:g}; "
              f"FAISS {faiss.__version__}, {faiss.omp_get_max_threads()} threads; vectors + exact top-k pass "
              f"{t_truth:.0f} s\n", flush=True)
        print("| kind | parameters | build s (train) | peak MB (imports) | search MB | bytes/vector | q/s 1 client | q/s 8 clients "
              "| recall@10 vs exact |")
        print("|---|---|--:|--:|--:|--:|--:|--:|--:|")
        for asked in [k for k in args.kinds.split(",") if k]:
            opts = IndexOptions(kind=asked, max_memory_gb=args.max_memory_gb, rerank=args.rerank, seed=args.seed)
            plan, path, t_train, t_build, peak, base = build_apart(coll, opts, work)
            before = rss_mb()
            index = tune(faiss.read_index(str(path), faiss.IO_FLAG_MMAP if plan.kind == "ivf" else 0),
                         plan.params)
            search_mb = rss_mb() - before
            search = Searcher(index, int(plan.params.get("rerank", 0)), vectors)
            probes = [int(p) or plan.params["nprobe"] for p in args.nprobe.split(",")] if "nprobe" in plan.params else [0]
            built = f"{t_build:.0f} ({t_train:.0f})"
            for nprobe in dict.fromkeys(probes):
                params = {k: v for k, v in plan.params.items() if k != "seed"}
                if nprobe:
                    tune(index, {"nprobe": nprobe})
                    params["nprobe"] = f"{nprobe}" + (" (default)" if nprobe == plan.params["nprobe"] else "")
                rows = np.concatenate([search(q[None], args.k) for q in queries])
                r = recall(rows, exact, args.k)
                q1 = qps(search, queries, args.k)
                live = {k: v for k, v in plan.params.items()} | ({"nprobe": nprobe} if nprobe else {})
                q8 = qps_clients(path, live, (str(work / "vectors.f16"), (args.n, args.dim)), queries, args.k, 8)
                label = (f"{asked} → " if asked == "auto" else "") + plan.kind
                print(f"| {label} | {', '.join(f'{k} {v}' for k, v in params.items()) or 'exact'} | {built} "
                      f"| {peak:,.0f} ({base:,.0f}) | {search_mb:,.0f} | {path.stat().st_size / args.n:.1f} | {q1:,.0f} | {q8:,.0f} | {r:.3f} |",
                      flush=True)
                built = "〃"
            del index, search
            path.unlink()
    print(f"\ncommand: {command}")


if __name__ == "__main__":
    main()
