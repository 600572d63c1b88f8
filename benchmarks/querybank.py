"""Query-bank normalisation, measured on trained runs: test recall with plain cosine and with the
setting each run chose on valid (`common.querybank`), per run and as mean ± std over the runs of a
lever.

    python benchmarks/querybank.py LABEL=RUN[,RUN...] [LABEL=RUN,...]

A run without `querybank.json` (trained before query banks, or with --no-querybank) gets one chosen
now, exactly as `cli.py adapt` chooses it after training. Prints a Markdown table: per lever, test
R@1/5/10 both ways with plain cosine -> with the bank, and the difference in mean recall.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from medembed.adapt.run import QUERYBANK
from medembed.adapt.run_querybank import calibrate
from medembed.cache.reader import find_splits, load_split
from medembed.common.ranking import ranks, summarize
from medembed.common.recall_keys import DEFAULT_KS, DIRECTIONS, recall_key
from medembed.model.embedding import model_from_run
from medembed.model.runs import open_run

KEYS = tuple(recall_key(d, k) for d in DIRECTIONS for k in DEFAULT_KS)


def measure(run_dir: Path) -> dict:
    if not (run_dir / QUERYBANK).exists():
        calibrate(run_dir)
    run = open_run(run_dir)
    model = model_from_run(run)
    test = load_split(find_splits(run.features_dir)["test"], with_views=False)
    img, txt = model.images(test.image_features), model.texts(test.caption_features)
    plain = summarize(ranks(img, txt, test.caption_image))
    image_offset, caption_offset = model.offsets(img, txt)
    bank = summarize(ranks(img, txt, test.caption_image, image_offset=image_offset, caption_offset=caption_offset))
    return {"plain": [plain[k] for k in KEYS], "bank": [bank[k] for k in KEYS], "setting": model.ranking}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("levers", nargs="+", help="LABEL=RUN[,RUN...]")
    args = p.parse_args()
    head = ["lever", "runs", *KEYS, "mean recall", "difference"]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for spec in args.levers:
        label, _, runs = spec.partition("=")
        got = [measure(Path(r)) for r in runs.split(",") if r]
        plain, bank = np.array([g["plain"] for g in got]), np.array([g["bank"] for g in got])
        cells = [f"{a:.1f} → {b:.1f}" for a, b in zip(plain.mean(0), bank.mean(0))]
        diff = bank.mean(1) - plain.mean(1)
        sd = diff.std(ddof=1) if len(diff) > 1 else 0.0
        print(f"| {label} | {len(got)} | " + " | ".join(cells)
              + f" | {plain.mean():.2f} → {bank.mean():.2f} | {diff.mean():+.2f} ± {sd:.2f} (per run "
              + ", ".join(f"{d:+.2f}" for d in diff) + ") |", flush=True)
        for r, g in zip(runs.split(","), got):
            print(f"<!-- {r}: {g['setting']} -->")


if __name__ == "__main__":
    main()
