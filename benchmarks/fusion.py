"""Concept-overlap fusion, measured on trained runs (a lever of the quality study, not a product feature).

    python benchmarks/fusion.py RUN [RUN ...] [--features features/roco-rad/effnet-lite0-ms+minilm]

For every run: the image's named concepts are predicted by k-nearest-neighbour propagation over the
train images (softmax-weighted votes of their labels), the caption's by the same vote over the train
images nearest to the caption embedding (or over the nearest train captions); the retrieval score
becomes cos(text, image) + w * cos(p_caption, p_image). Because both terms are inner products of unit
vectors, the fused score is the inner product of [text, sqrt(w) p_caption] and [image, sqrt(w) p_image],
so it ranks with the same exact retrieval code. The setting (source, k, w) is chosen on valid mean
recall; test is scored once with it. Prints a Markdown table: per run, test R@1/5/10 both ways before
and after, and the mean difference over runs (mean +- std).
"""
from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import numpy as np
import torch

from medembed.adapt.run import load_adapter_run
from medembed.cache.reader import load_split
from medembed.cache.schema import split_file
from medembed.common.recall_keys import DEFAULT_KS, DIRECTIONS, recall_key
from medembed.common.tensors import unit
from medembed.evaluate import retrieval
from medembed.evaluate.detection import Neighbours, knn_vote
from medembed.model.embedding import model_from_run

REPO = Path(__file__).resolve().parents[1]
KEYS = tuple(recall_key(d, k) for d in DIRECTIONS for k in DEFAULT_KS)
SHARPNESS = 10.0


def _mean_recall(m: dict) -> float:
    return float(np.mean([m[k] for k in KEYS]))


def study(run_dir: Path, features: Path) -> dict:
    model = model_from_run(load_adapter_run(run_dir))
    splits = {s: load_split(features / split_file(s), with_views=False) for s in ("train", "valid", "test")}
    emb = {s: (unit(model.images(d.image_features)), unit(model.texts(d.caption_features))) for s, d in splits.items()}
    labels = splits["train"].concepts.tocsr().astype(np.float32)
    caption_labels = labels[splits["train"].caption_image.numpy()]

    def scored(split: str, source: str, k: int, w: float) -> dict:
        img, txt = emb[split]
        p_img = knn_vote(Neighbours.of(emb["train"][0], img, k), labels, k, SHARPNESS)
        if source == "captions":
            p_txt = knn_vote(Neighbours.of(emb["train"][1], txt, k), caption_labels, k, SHARPNESS)
        else:
            p_txt = knn_vote(Neighbours.of(emb["train"][0], txt, k), labels, k, SHARPNESS)
        root = w ** 0.5
        return retrieval.compute(torch.cat([img, root * unit(p_img)], 1), torch.cat([txt, root * unit(p_txt)], 1),
                                 splits[split].caption_image)

    grid = list(itertools.product(("images", "captions"), (10, 30), (0.1, 0.2, 0.4)))
    valid = {cell: _mean_recall(scored("valid", *cell)) for cell in grid}
    best = max(valid, key=valid.get)
    base_valid = _mean_recall(retrieval.compute(*emb["valid"], splits["valid"].caption_image))
    base = retrieval.compute(*emb["test"], splits["test"].caption_image)
    fused = scored("test", *best)
    return {"run": str(run_dir), "setting": best, "valid_base": base_valid, "valid_fused": valid[best],
            "base": {k: base[k] for k in KEYS}, "fused": {k: fused[k] for k in KEYS}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+")
    p.add_argument("--features", default=str(REPO / "features" / "roco-rad" / "effnet-lite0-ms+minilm"))
    args = p.parse_args()
    results = [study(Path(r), Path(args.features)) for r in args.runs]
    head = ["run", "chosen on valid (source, k, w)", "valid mean recall", *KEYS]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in results:
        cells = [f"{r['base'][k]:.1f} → {r['fused'][k]:.1f}" for k in KEYS]
        print(f"| {Path(r['run']).name} | {r['setting']} | {r['valid_base']:.1f} → {r['valid_fused']:.1f} | "
              + " | ".join(cells) + " |")
    diff = np.array([[r["fused"][k] - r["base"][k] for k in KEYS] for r in results])
    sd = diff.std(0, ddof=1) if len(results) > 1 else np.zeros(len(KEYS))
    print("| difference, mean ± std | | | " + " | ".join(f"{m:+.1f} ± {s:.1f}" for m, s in zip(diff.mean(0), sd)) + " |")


if __name__ == "__main__":
    main()
