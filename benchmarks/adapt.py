"""Adapter benchmarks; prints Markdown tables and the exact command that produced them.

  throughput  seconds per epoch over N synthetic cached pairs (768 -> 512, batch 1024), next to the
              time of plain GEMMs doing the same FLOPs in the same process (how close the loop runs
              to the machine's matmul speed)
  roco        on the roco-rad cache: wall time to the best valid epoch and test R@1/5/10 both ways
              for every loss x head with the CLI defaults (cca: closed form)
  levers      what each knob gives on roco-rad test recall, averaged over seeds: concept texts,
              views (when the cache has them), dropout, weight decay, weight averaging, ensembles, margin vs
              InfoNCE at small batch

usage: python benchmarks/adapt.py [--part throughput,roco,levers] [--features DIR] [--pairs N] [--seeds K]
                                  [--views-features DIR]
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medembed.adapt.config import AdaptConfig  # noqa: E402
from medembed.adapt.run import load_adapter_run  # noqa: E402
from medembed.adapt.trainer import train  # noqa: E402
from medembed.cache.reader import CachedSplit, load_split  # noqa: E402
from medembed.cache.schema import split_file  # noqa: E402
from medembed.common.ranking import recall_summary  # noqa: E402
from medembed.common.recall_keys import DEFAULT_KS, DIRECTIONS, MEAN_RECALL, recall_key  # noqa: E402

DEFAULT_FEATURES = ROOT / "features" / "roco-rad" / "effnet-lite0+minilm"


# ---------------------------------------------------------------- throughput

def big_synthetic(n: int, dim_in: int, seed: int, split: str) -> CachedSplit:
    """n correlated float16 pairs built chunk by chunk (a float64 draw of 1M x 768 would need 6 GB)."""
    g = torch.Generator().manual_seed(seed)
    world = torch.Generator().manual_seed(99)
    a, b = torch.randn(64, dim_in, generator=world) / 8, torch.randn(64, dim_in, generator=world) / 8
    img = torch.empty(n, dim_in, dtype=torch.float16)
    txt = torch.empty(n, dim_in, dtype=torch.float16)
    for s in range(0, n, 65536):
        z = torch.randn(min(65536, n - s), 64, generator=g)
        img[s : s + z.shape[0]] = (z @ a + 0.5 * torch.randn(z.shape[0], dim_in, generator=g)).half()
        txt[s : s + z.shape[0]] = (z @ b + 0.5 * torch.randn(z.shape[0], dim_in, generator=g)).half()
    return CachedSplit(split=split, image_ids=[], image_features=img, caption_features=txt,
                       caption_image=torch.arange(n), captions=[], attrs={"backbone": "synthetic", "synthetic": True})


def epoch_flops(head: str, n: int, batch: int, din: int, d: int) -> float:
    """Multiply-adds x 2 of one epoch: forward, weight gradients (the cached inputs need none),
    activation gradients between layers, and the B x B similarity matrix forward and backward."""
    if head == "linear":
        per_tower = 2 * din * d * 2  # forward + weight grad
    elif head == "mlp":
        per_tower = 2 * din * d * 2 + 2 * d * d * 3  # proj fwd+wgrad; fc fwd+wgrad+input grad
    else:
        raise ValueError(head)
    sim = 2 * batch * d * 3  # per pair: one row of S = I T^T forward, two products backward
    return n * (2 * per_tower + sim)


def gemm_seconds(flops: float, batch: int, din: int, d: int, threads: int) -> float:
    """Time of plain [batch x din] @ [din x d] float32 GEMMs adding up to `flops`."""
    torch.set_num_threads(threads)
    x, w = torch.randn(batch, din), torch.randn(din, d)
    per = 2 * batch * din * d
    for _ in range(5):
        x @ w
    reps = 50
    t0 = time.perf_counter()
    for _ in range(reps):
        x @ w
    dt = (time.perf_counter() - t0) / reps
    return flops / per * dt


def part_throughput(pairs: int, heads: list[str], threads: int) -> str:
    din, d, batch = 768, 512, 1024
    train_split = big_synthetic(pairs, din, 0, "train")
    valid = big_synthetic(2000, din, 1, "valid")
    rows = ["| head | pairs | batch | s/epoch | pairs/s | GEMM s (same FLOPs) | ratio | TFLOP/epoch |", "|---|---|---|---|---|---|---|---|"]
    for head in heads:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = AdaptConfig(features_dir="synthetic", out=f"{tmp}/run", head=head, dim=d, batch_size=batch, epochs=1,
                              threads=threads, patience=1, refit=False)
            train(cfg, splits=(train_split, valid), progress=False)
            row = json.loads((Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()[0])
        sec = row["train_seconds"]
        flops = epoch_flops(head, pairs, batch, din, d)
        g = gemm_seconds(flops, batch, din, d, threads)
        rows.append(f"| {head} | {pairs:,} | {batch} | {sec:.1f} | {pairs / sec:,.0f} | {g:.1f} | {sec / g:.2f} | {flops / 1e12:.2f} |")
    return "\n".join(rows)


# ---------------------------------------------------------------- roco-rad

def test_recall(run_dir: Path, test: CachedSplit) -> dict:
    run = load_adapter_run(run_dir)
    return recall_summary(run.embed_images(test.image_features), run.embed_texts(test.caption_features), test.caption_image)


def run_once(features: Path, tmp: Path, name: str, test: CachedSplit, **kw) -> tuple[dict, dict]:
    # the heads valid chose, as these rows were measured (before the refit became the default)
    cfg = AdaptConfig(features_dir=str(kw.pop("features_dir", features)), out=str(tmp / name), **{"refit": False, **kw})
    t0 = time.perf_counter()
    summary = train(cfg, progress=False)
    summary["wall"] = time.perf_counter() - t0
    return summary, test_recall(tmp / name, test)


def fmt_recall(r: dict) -> str:
    return " | ".join(f"{r[recall_key(d, k)]:.1f}" for d in DIRECTIONS for k in DEFAULT_KS)


def part_roco(features: Path, tmp: Path, test: CachedSplit) -> str:
    rows = ["| head | loss | best epoch | s to best | s total | test t2i R@1 | R@5 | R@10 | test i2t R@1 | R@5 | R@10 |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    combos = [(h, lo) for h in ("linear", "mlp", "residual") for lo in ("infonce", "margin", "siglip")] + [("cca", "infonce")]
    for head, loss in combos:
        s, r = run_once(features, tmp, f"{head}_{loss}", test, head=head, loss=loss)
        best = "closed form" if head == "cca" else f"{s['best_epoch']}/{s['epochs_run']}"
        rows.append(f"| {head} | {loss if head != 'cca' else '-'} | {best} | {s['seconds_to_best']:.1f} | "
                    f"{s['seconds']:.1f} | {fmt_recall(r)} |")
        print(rows[-1], flush=True)
    return "\n".join(rows)


def part_levers(features: Path, tmp: Path, test: CachedSplit, seeds: int, has_views: bool,
                views_features: Path | None, with_ensemble: bool = True) -> str:
    variants: list[tuple[str, dict]] = [
        ("default (mlp, infonce, dim 1024, input dropout 0.6, weight decay 0.5, ema 0.98)", {}),
        ("+ concept texts", {"augment": "concepts"}),
        ("no input dropout", {"input_dropout": 0.0}),
        ("weight decay 0.1", {"weight_decay": 0.1}),
        ("weight decay 1.0", {"weight_decay": 1.0}),
        ("no weight average (ema 0)", {"ema": 0.0}),
        ("weight decay 0.1, no weight average", {"weight_decay": 0.1, "ema": 0.0}),
        ("dim 256", {"dim": 256}),
        *([("ensemble 4", {"ensemble": 4})] if with_ensemble else []),
        ("infonce, batch 16", {"batch_size": 16, "lr": 5e-4}),
        ("margin, batch 16", {"batch_size": 16, "lr": 5e-4, "loss": "margin"}),
        ("infonce, batch 8", {"batch_size": 8, "lr": 2.5e-4}),
        ("margin, batch 8", {"batch_size": 8, "lr": 2.5e-4, "loss": "margin"}),
    ]
    if has_views:
        variants.insert(2, ("no views (cache has them)", {"use_views": False}))
    if views_features is not None:
        variants.insert(2, (f"+ views ({views_features})", {"features_dir": views_features}))
        if with_ensemble:
            variants.insert(3, ("+ views + ensemble 4", {"features_dir": views_features, "ensemble": 4}))
        variants.insert(3, ("+ views + concept texts", {"features_dir": views_features, "augment": "concepts"}))
    rows = ["| variant | seeds | s total | test t2i R@1 | R@5 | R@10 | test i2t R@1 | R@5 | R@10 | mean recall |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for name, kw in variants:
        rs, secs = [], []
        for seed in range(seeds):
            s, r = run_once(features, tmp, f"lever_{len(rows)}_{seed}", test, seed=seed, **kw)
            rs.append(r)
            secs.append(s["seconds"])
        mean = {k: float(np.mean([r[k] for r in rs])) for k in rs[0]}
        rows.append(f"| {name} | {seeds} | {np.mean(secs):.1f} | {fmt_recall(mean)} | {mean[MEAN_RECALL]:.1f} |")
        print(rows[-1], flush=True)
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", default="throughput,roco,levers")
    ap.add_argument("--features", type=Path, default=DEFAULT_FEATURES)
    ap.add_argument("--pairs", type=int, default=1_000_000)
    ap.add_argument("--heads", default="linear,mlp", help="heads for the throughput part")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--views-features", type=Path, default=None,
                    help="a features folder of the same backbone whose train split has augmented views (levers part)")
    ap.add_argument("--no-ensemble", action="store_true", help="levers: leave out the (10x slower) 4-head ensembles")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    parts = args.part.split(",")
    print(f"command: python benchmarks/adapt.py {shlex.join(sys.argv[1:])}")
    print(f"torch {torch.__version__}, {args.threads} threads, device cpu\n")
    if "throughput" in parts:
        print(f"## throughput: {args.pairs:,} synthetic pairs, 768 -> 512, batch 1024, one epoch\n")
        print(part_throughput(args.pairs, args.heads.split(","), args.threads) + "\n", flush=True)
    if "roco" in parts or "levers" in parts:
        if not (args.features / split_file("train")).exists():
            print(f"{args.features}: no roco-rad cache; run `python cli.py extract --data ../shared/data/roco-rad` first")
            return
        test = load_split(args.features / split_file("test"), with_views=False)
        has_views = load_split(args.features / split_file("train")).view_features is not None
        with tempfile.TemporaryDirectory() as tmp:
            if "roco" in parts:
                print(f"## roco-rad ({args.features.name}): every loss x head, CLI defaults, test pool {test.n_images}\n")
                print(part_roco(args.features, Path(tmp), test) + "\n", flush=True)
            if "levers" in parts:
                print(f"## roco-rad levers (mean over {args.seeds} seeds; test pool {test.n_images})\n")
                print(part_levers(args.features, Path(tmp), test, args.seeds, has_views, args.views_features,
                                  not args.no_ensemble) + "\n", flush=True)


if __name__ == "__main__":
    main()
