"""What a compact embedding costs in recall: a run's 4,096-d embeddings projected to 128-1,024 dims and
stored as float16 or int8, against the full float32 embeddings, on the run's valid and test splits.

The projection is `cli.py compact`'s (`adapt.compact.fit_projection`): the top eigenvectors of the
second-moment matrix of the run's train image and caption embeddings together (no centring, so inner
products keep their meaning; one map for both sides). Projected vectors are re-normalised. int8 stores each dimension scaled by its largest absolute train value / 127. The query
bank ranks as the run does: its bank (train) and gallery are projected and quantised the same way,
with the run's k and beta.

usage: python benchmarks/compact.py --run runs/NAME [--dims 128,256,512,1024]
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medembed.adapt.compact import fit_projection  # noqa: E402
from medembed.adapt.run import load_adapter_run  # noqa: E402
from medembed.cache.reader import load_split  # noqa: E402
from medembed.cache.schema import split_file  # noqa: E402
from medembed.common.querybank import offsets  # noqa: E402
from medembed.common.ranking import retrieval_ranks, summarize_ranks  # noqa: E402
from medembed.common.recall_keys import MEAN_RECALL, recall_key  # noqa: E402
from medembed.common.tensors import unit  # noqa: E402


def embed(run, split: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    s = load_split(Path(run.features_dir) / split_file(split), with_views=False)
    with torch.no_grad():
        return run.embed_images(s.image_features.float()), run.embed_texts(s.caption_features.float()), s.caption_image


def store(x: torch.Tensor, kind: str, scale: torch.Tensor | None) -> torch.Tensor:
    if kind == "float32":
        return x
    if kind == "float16":
        return x.half().float()
    return torch.clamp(torch.round(x / scale), -127, 127) * scale


def score(img, txt, caption_image, bank_img, bank_txt, setting) -> dict[str, float]:
    img_off, cap_off = offsets(setting, img, txt, bank_img, bank_txt) if setting is not None else (None, None)
    t2i, i2t = retrieval_ranks(img, txt, caption_image, image_offset=img_off, caption_offset=cap_off)
    return summarize_ranks(t2i, i2t, img.shape[0], txt.shape[0])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--dims", default="128,256,512,1024")
    ap.add_argument("--stores", default="float16,int8")
    args = ap.parse_args(argv)
    run = load_adapter_run(args.run)
    setting = run.querybank
    train_img, train_txt, _ = embed(run, "train")
    splits = {s: embed(run, s) for s in ("valid", "test")}
    print(f"{args.run}: {train_img.shape[1]}-d embeddings; query bank: {setting.to_dict() if setting else 'off'}\n")
    print("| embedding | bytes/image | valid mean recall | test mean recall | Δ test | test R@1 t2i / i2t | test R@10 t2i / i2t |")
    print("|---|--:|--:|--:|--:|--:|--:|")
    full = {s: score(*v, train_img, train_txt, setting) for s, v in splits.items()}

    def row(label: str, nbytes: int, res: dict) -> None:
        t = res["test"]
        print(f"| {label} | {nbytes:,} | {res['valid'][MEAN_RECALL]:.2f} | {t[MEAN_RECALL]:.2f} | "
              f"{t[MEAN_RECALL] - full['test'][MEAN_RECALL]:+.2f} | {t[recall_key('t2i', 1)]:.1f} / {t[recall_key('i2t', 1)]:.1f} | "
              f"{t[recall_key('t2i', 10)]:.1f} / {t[recall_key('i2t', 10)]:.1f} |", flush=True)

    row(f"full {train_img.shape[1]}-d float32", 4 * train_img.shape[1], full)
    for dims in [int(d) for d in args.dims.split(",")]:
        p, _ = fit_projection(run, dims)
        train_p = unit(torch.cat([train_img, train_txt]) @ p)
        scale = train_p.abs().amax(0) / 127
        for kind in args.stores.split(","):
            def compact(x: torch.Tensor, p=p, kind=kind, scale=scale) -> torch.Tensor:
                return store(unit(x @ p), kind, scale)

            res = {s: score(compact(i), compact(t), ci, compact(train_img), compact(train_txt), setting)
                   for s, (i, t, ci) in splits.items()}
            row(f"{dims}-d {kind}", dims * (2 if kind == "float16" else 1), res)
    print("\ncommand: python benchmarks/compact.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])))


if __name__ == "__main__":
    main()
