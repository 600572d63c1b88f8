"""The search page over a pool of millions of images, within `--max-memory-gb`.

    python benchmarks/serve_scale.py --n 10000000 --work /work/serve-bench

Writes a synthetic pool of `--n` images (one caption each; 256-d image and caption features stored
float16, correlated through a 64-d latent) as shard files of 1M images joined into one test.h5
without copying, as a sharded extraction leaves it, plus small train and valid splits; fits a
closed-form run (256-d) on train; builds its index over the pool with `--kind auto`. Then, in a
fresh process that holds nothing else, opens the pool as `cli.py serve` does (`--max-memory-gb`, 8 GiB
by default: a pool whose embeddings do not fit is streamed),
serves it under uvicorn and sends text queries from 1 and 8 concurrent clients through
`/api/search/text` (k 10), first through the index, then a few exact scans. The pool has no text
encoder: a query's text names a cached caption whose features stand in for the encoded text, so the
numbers are the server's and the search's (a real query adds one MiniLM forward). Prints one
markdown table and the serving process's peak memory (VmHWM). Files are kept in --work, so a second
run reuses the cache, the run and the index.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the other benchmarks, as modules

from adapt_stream import pairs as stream_pairs  # noqa: E402

from medembed.cache import schema  # noqa: E402
from medembed.cache.reader import CachedSplit  # noqa: E402
from medembed.cache.writer import write_joined, write_split  # noqa: E402

SHARD = 1_000_000
IMAGE_DIM = TEXT_DIM = 256


def pairs(n: int, seed: int, split: str, first: int = 0) -> CachedSplit:
    """n correlated pairs of 256-d features, the pool's image paths recorded (`adapt_stream.pairs`)."""
    return stream_pairs(n, seed, split, first, image_dim=IMAGE_DIM, text_dim=TEXT_DIM, noise=0.7, world_seed=7,
                        locations=True)


def prepare(work: Path, n: int) -> dict:
    features = work / "features"
    features.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    shards, count = [], -(-n // SHARD)
    for i in range(count):
        path = features / schema.shard_file("test", i, count)
        if not path.exists():
            write_split(path, pairs(min(SHARD, n - i * SHARD), seed=100 + i, split="test", first=i * SHARD))
        shards.append(path)
        print(f"  shard {i + 1}/{count} written", flush=True)
    if not (features / schema.split_file("test")).exists():
        write_joined(features / schema.split_file("test"), shards, {"backbone": "synthetic", "dataset": "synthetic", "split": "test",
                                                    "dtype": "float16", "n_records": n})
    for name, rows, seed in (("train", 20_000, 0), ("valid", 2_000, 1)):
        if not (features / schema.split_file(name)).exists():
            write_split(features / schema.split_file(name), pairs(rows, seed, name))
    wrote = time.perf_counter() - t0
    run = work / "run"
    if not (run / "summary.json").exists():
        from medembed.adapt.config import AdaptConfig
        from medembed.adapt.trainer import train

        train(AdaptConfig(features_dir=str(features), out=str(run), head="cca", dim=256), progress=False)
    from medembed.serve.index import IndexOptions, available_indexes, build_index

    t0 = time.perf_counter()
    if not available_indexes(run, "test"):
        build_index(run, IndexOptions(split="test", kind="auto"))
    built = time.perf_counter() - t0
    size = sum(p.stat().st_size for p in features.glob(f"test*{schema.FILE_SUFFIX}"))
    return {"wrote_s": wrote, "index_s": built, "cache_bytes": size}


SERVER = r"""
import json, sys, threading, time, urllib.parse, urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
import numpy as np, torch, uvicorn
from medembed.cache import schema
from medembed.cache.reader import read_rows
from medembed.common.memory import peak_rss_bytes
from medembed.serve.page import create_app
from medembed.serve.search import Searcher

run, n, clients, queries, exact_queries = sys.argv[1], int(sys.argv[2]), [int(c) for c in sys.argv[3].split(",")], int(sys.argv[4]), int(sys.argv[5])
budget = float(sys.argv[6])
test = Path(run).parent / "features" / schema.split_file("test")

class Lookup:  # a query's text names a pool caption: its cached features stand in for the encoded text
    def encode_texts(self, texts):
        return torch.from_numpy(read_rows(test, schema.CAPTION_FEATURES, [int(t[1:]) for t in texts])).float()

t0 = time.perf_counter()
searcher = Searcher(run, "test", backbone=Lookup(), max_memory_gb=budget)
searcher.warm()
opened = time.perf_counter() - t0
opened_rss = peak_rss_bytes()
server = uvicorn.Server(uvicorn.Config(create_app(searcher), host="127.0.0.1", port=0, log_level="warning"))
threading.Thread(target=server.run, daemon=True).start()
while not server.started:
    time.sleep(0.1)
port = server.servers[0].sockets[0].getsockname()[1]
rng = np.random.default_rng(0)

def one(q, exact):
    url = f"http://127.0.0.1:{port}/api/search/text?" + urllib.parse.urlencode({"q": f"c{q}", "k": 10, "exact": str(exact).lower()})
    t = time.perf_counter()
    with urllib.request.urlopen(url, timeout=600) as r:
        body = json.loads(r.read())
    return time.perf_counter() - t, body

rows = []
for exact, count, sets in ((False, queries, clients), (True, exact_queries, [1])):
    for c in sets:
        qs = rng.integers(0, n, count).tolist()
        if not exact:
            with ThreadPoolExecutor(c) as pool:  # warm-up
                list(pool.map(lambda q: one(q, exact), qs[:20]))
        t = time.perf_counter()
        with ThreadPoolExecutor(c) as pool:
            res = list(pool.map(lambda q: one(q, exact), qs))
        wall = time.perf_counter() - t
        lat = sorted(r[0] for r in res)
        own = sum(any(h["id"] == f"test{q}" for h in r[1]["hits"]) for q, r in zip(qs, res)) / len(qs)
        rows.append({"via": res[0][1]["via"], "clients": c, "queries": count, "p50_ms": 1000 * lat[len(lat) // 2],
                     "p95_ms": 1000 * lat[int(0.95 * (len(lat) - 1))], "qps": count / wall, "own_in_top10": own})
server.should_exit = True
print("RESULT", json.dumps({"open_s": opened, "plan": searcher.memory.describe(), "opened_rss": opened_rss,
      "peak": peak_rss_bytes(), "rows": rows}), flush=True)
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=10_000_000)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--clients", default="1,8")
    p.add_argument("--queries", type=int, default=400)
    p.add_argument("--exact-queries", type=int, default=3)
    p.add_argument("--max-memory-gb", type=float, default=8.0, help="the serving process's budget (serve's default: 8)")
    args = p.parse_args()
    made = prepare(args.work, args.n)
    done = subprocess.run([sys.executable, "-c", SERVER, str(args.work / "run"), str(args.n), args.clients,
                           str(args.queries), str(args.exact_queries), str(args.max_memory_gb)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(done.stderr[-3000:])
    got = json.loads(done.stdout.rsplit("RESULT", 1)[1])
    from medembed.serve.index import available_indexes

    kind = available_indexes(args.work / "run", "test")[0][1]
    print(f"\npool {args.n:,} images ({made['cache_bytes'] / 2**30:.1f} GiB of cache, written in {made['wrote_s']:.0f} s); "
          f"index {kind} built in {made['index_s']:.0f} s; serving process opened the pool in "
          f"{got['open_s']:.1f} s, {got['opened_rss'] / 2**30:.2f} GiB after opening, peak {got['peak'] / 2**30:.2f} GiB; "
          f"{got['plan']}\n")
    print("| search | clients | queries | p50 ms | p95 ms | queries/s | own image in top 10 |")
    print("|---|--:|--:|--:|--:|--:|--:|")
    for r in got["rows"]:
        print(f"| {r['via']} | {r['clients']} | {r['queries']} | {r['p50_ms']:.0f} | {r['p95_ms']:.0f} | "
              f"{r['qps']:.1f} | {100 * r['own_in_top10']:.0f}% |")


if __name__ == "__main__":
    main()
