"""The search page, measured and pictured.

    python benchmarks/serve_page.py screenshot --run runs/roco-default [--query "..."] [--out docs/search-page.png]
        serves the run, opens the page in headless Chromium, searches, and saves a screenshot (the one
        in the README), plus one with the explanation maps switched on.

    python benchmarks/serve_page.py load [--n 100000 --clients 8 --queries 2000]
        a bounded loopback load test: a synthetic pool of N images served by uvicorn (one process),
        `clients` concurrent clients sending `queries` text queries in all, once with exact search and
        once through an HNSW index; p50 / p95 latency, queries/s and errors. The synthetic pool has no
        backbone, so a query's text is looked up to its cached caption features (what encoding a real
        query would give): the numbers are the server's and the search's, not the text encoder's.

    python benchmarks/serve_page.py text --run runs/roco-default [--clients 1 8 --queries 400]
        the real thing end to end: `cli.py serve`'s app over the run's own pool, each query a roco-rad
        test caption encoded by the run's text tower, once on PyTorch and once on ONNX Runtime; p50 /
        p95 latency and queries/s at each number of concurrent clients.
"""
from __future__ import annotations

import argparse
import json
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(app) -> tuple[object, str]:
    import uvicorn

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return server, f"http://127.0.0.1:{port}"


def screenshot(args) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from medembed.serve.page import create_app
    from medembed.serve.search import Searcher

    server, url = _start(create_app(Searcher(args.run)))
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--window-size=1280,1150"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        wait = WebDriverWait(driver, 120)
        driver.get(url)
        wait.until(lambda d: "pool" in d.find_element(By.ID, "about").text)
        driver.find_element(By.ID, "query").send_keys(args.query)
        driver.find_element(By.ID, "search-button").click()
        loaded = "return [...document.querySelectorAll('.hit img')].every(i => i.complete && i.naturalWidth > 0)"
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".hit") and d.execute_script(loaded))
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(out))
        driver.find_element(By.ID, "explain").click()
        wait.until(lambda d: "/api/explain/" in d.find_element(By.CSS_SELECTOR, ".hit img").get_attribute("src"))
        wait.until(lambda d: d.execute_script(loaded))
        driver.save_screenshot(str(out.with_name(out.stem + "-explain.png")))
        print(f"wrote {out} and {out.with_name(out.stem + '-explain.png')}")
    finally:
        driver.quit()
        server.should_exit = True


class _Lookup:
    """A backbone stand-in for a synthetic pool: a caption of the pool encodes to its cached features."""

    def __init__(self, splits):
        self.features = {c: s.caption_features[i] for s in splits for i, c in enumerate(s.captions)}

    def encode_texts(self, texts):
        return torch.stack([self.features[t] for t in texts])


def _one(url: str) -> tuple[float, bool]:
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(url, timeout=120) as r:
            ok = r.status == 200 and "hits" in json.loads(r.read())
    except Exception:  # noqa: BLE001 - a failed request is counted, not raised
        ok = False
    return time.perf_counter() - t0, ok


def _hammer(base: str, captions: list[str], clients: int, queries: int, exact: bool) -> dict:
    urls = [f"{base}/api/search/text?" + urllib.parse.urlencode({"q": captions[i % len(captions)], "k": 10,
                                                                 "exact": str(exact).lower()}) for i in range(queries)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(_one, urls))
    wall = time.perf_counter() - t0
    lat = sorted(r[0] for r in results)
    return {"p50_ms": 1000 * statistics.median(lat), "p95_ms": 1000 * lat[int(0.95 * (len(lat) - 1))],
            "qps": len(lat) / wall, "errors": sum(not r[1] for r in results)}


def load(args) -> None:
    from medembed.adapt.config import AdaptConfig
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: tests/ holds the generator
    from medembed.adapt.trainer import train
    from medembed.cache import schema
    from medembed.cache.reader import load_split, read_strings
    from medembed.serve.index import IndexOptions, build_index
    from medembed.serve.page import create_app
    from medembed.serve.search import Searcher
    from tests.synthetic_features import write_synthetic_features

    work = Path(tempfile.mkdtemp(prefix="serve-load-"))
    try:
        features = write_synthetic_features(work / "features", n_train=5000, n_eval=args.n, image_dim=256,
                                            text_dim=256, latent=64, noise=1.0)
        train(AdaptConfig(features_dir=str(features), out=str(work / "run"), head="cca", dim=256), progress=False)
        lookup = _Lookup([load_split(features / schema.split_file("test"))])
        t0 = time.perf_counter()
        build_index(work / "run", IndexOptions(split="test", kind="hnsw"))
        index_s = time.perf_counter() - t0
        rows = []
        for exact in (True, False):
            searcher = Searcher(work / "run", "test", backbone=lookup, use_index=not exact)
            server, base = _start(create_app(searcher))
            captions = read_strings(searcher.pool.splits[0].path, schema.CAPTION_TEXT)
            _hammer(base, captions, args.clients, min(50, args.queries), exact)  # warm-up
            r = _hammer(base, captions, args.clients, args.queries, exact)
            server.should_exit = True
            rows.append(["exact scan" if exact else "hnsw index", f"{r['p50_ms']:.1f}", f"{r['p95_ms']:.1f}",
                         f"{r['qps']:.1f}", r["errors"]])
        print(f"pool {args.n:,} images (256-d), {args.clients} concurrent clients, {args.queries} queries each "
              f"setting, k 10; hnsw index built in {index_s:.0f} s\n")
        print("| search | p50 ms | p95 ms | queries/s | errors |\n|---|---|---|---|---|")
        print("\n".join("| " + " | ".join(str(x) for x in r) + " |" for r in rows))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def text(args) -> None:
    from medembed.cache import schema
    from medembed.cache.reader import read_strings
    from medembed.serve.page import create_app
    from medembed.serve.search import Searcher

    rows = []
    for runtime in ("torch", "onnx"):
        searcher = Searcher(args.run, runtime=runtime, use_index=False)
        searcher.warm()  # loaded before the clock starts
        captions = [c for s in searcher.pool.splits if s.split == "test" for c in read_strings(s.path, schema.CAPTION_TEXT)] or \
            [c for s in searcher.pool.splits for c in read_strings(s.path, schema.CAPTION_TEXT)]
        server, base = _start(create_app(searcher))
        _hammer(base, captions, 1, 20, True)  # warm-up
        for clients in args.clients:
            r = _hammer(base, captions[clients:], clients, args.queries, True)
            rows.append([runtime, clients, f"{r['p50_ms']:.1f}", f"{r['p95_ms']:.1f}", f"{r['qps']:.1f}", r["errors"]])
        server.should_exit = True
    pool = searcher.pool.n_images
    print(f"run {args.run}, pool {pool:,} images, exact scan, k 10, {args.queries} distinct caption queries per row\n")
    print("| text encoder | clients | p50 ms | p95 ms | queries/s | errors |\n|---|--:|--:|--:|--:|--:|")
    print("\n".join("| " + " | ".join(str(x) for x in r) + " |" for r in rows))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("screenshot")
    s.add_argument("--run", default=str(REPO / "runs" / "roco-default"))
    s.add_argument("--query", default="axial CT of the chest showing a pulmonary nodule")
    s.add_argument("--out", default=str(REPO / "docs" / "search-page.png"))
    ld = sub.add_parser("load")
    ld.add_argument("--n", type=int, default=100_000)
    ld.add_argument("--clients", type=int, default=8)
    ld.add_argument("--queries", type=int, default=2000)
    tx = sub.add_parser("text")
    tx.add_argument("--run", default=str(REPO / "runs" / "roco-default"))
    tx.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    tx.add_argument("--queries", type=int, default=400)
    args = p.parse_args()
    print("command: python benchmarks/serve_page.py " + " ".join(sys.argv[1:]))
    {"screenshot": screenshot, "load": load, "text": text}[args.mode](args)


if __name__ == "__main__":
    main()
