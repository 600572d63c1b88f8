"""Retrieval quality levers, measured: each row is one `cli.py adapt` command run with 3 seeds,
trained on the cache's train split (selected on valid) and scored on the untouched test split.

    python benchmarks/quality.py --rows default,base,... [--features F] [--seeds 0,1,2] [--out runs/quality]

Per row: test R@1/5/10 both ways (ranked as the run ranks: with its query bank when it has one; plain
cosine is recorded beside them as cosine_*), modality zero-shot accuracy, concept F1, few-shot mAP@16,
and the adapt command's wall time, as mean ± std over the seeds, printed as a Markdown table with the
command beside it. Results accumulate in OUT/results.jsonl, so rows can be run a few at a time.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from medembed.common.recall_keys import DEFAULT_KS, DIRECTIONS, recall_key

REPO = Path(__file__).resolve().parents[1]
ROCO = REPO / "features" / "roco-rad" / "effnet-lite0-ms+minilm"

# name -> extra `cli.py adapt` arguments. "default" is the command with no option: 4 heads with named
# concepts as extra positive texts (--augment auto), ranked with a query bank chosen on valid, then the
# heads trained again on train + valid for the epochs valid chose (the refit). Every other lever was
# measured alone, before the refit became the default (so without it: --no-refit), on one head and
# without concept texts (--augment none), as it was before those became the default; the continuous
# tower-tuning rows train on captions only.
NO_CONCEPTS = ["--augment", "none"]
NO_REFIT = ["--no-refit"]
LEVERS: dict[str, list[str]] = {
    "ensemble4": NO_CONCEPTS,
    "base": ["--ensemble", "1", *NO_CONCEPTS],
    "ensemble4-dim256": ["--dim", "256", *NO_CONCEPTS],
    "concept-loss": ["--ensemble", "1", "--concept-loss", "0.5", *NO_CONCEPTS],
    "graded": ["--ensemble", "1", "--graded", "0.1", *NO_CONCEPTS],
    "concept-texts": ["--ensemble", "1", "--augment", "concepts"],
    "concept-texts-ensemble4": ["--augment", "concepts"],
    "concept-pretrain15": ["--ensemble", "1", "--augment", "concepts", "--concept-pretrain", "15"],
    "concept-texts-ensemble4-ratio0.2": ["--augment", "concepts", "--concept-ratio", "0.2"],
    "hard-negatives3": ["--ensemble", "1", "--hard-negatives", "3"],
    "hard-negatives1": ["--ensemble", "1", "--hard-negatives", "1"],
    "lit-text2": ["--ensemble", "1", "--unlock", "text:2"],
    "lit-text2-ensemble4": ["--unlock", "text:2"],
    "unlock-image1": ["--ensemble", "1", "--unlock", "image:1"],
    "unlock-image1-lr3e-6": ["--ensemble", "1", "--unlock", "image:1", "--backbone-lr", "3e-6"],
    "unlock-image1-lr3e-5": ["--ensemble", "1", "--unlock", "image:1", "--backbone-lr", "3e-5"],
    # control: the same path with the block effectively frozen (what the path itself costs)
    "unlock-image1-lr1e-9": ["--ensemble", "1", "--unlock", "image:1", "--backbone-lr", "1e-9"],
    "unfreeze-image1": ["--ensemble", "1", "--unlock", "image:1", "--unfreeze-every", "10", "--unfreeze-epochs", "1",
                        "--backbone-lr", "3e-5", *NO_CONCEPTS],
}
ROWS: dict[str, list[str]] = {
    "default": [],
    "refit": ["--refit"],  # the default, refit asked for by name
    "no-refit": NO_REFIT,  # the default before the refit: the heads valid chose
    **{name: [*args, *NO_REFIT] for name, args in LEVERS.items()},
}
# rows made from another row's run by one more command: name -> (that row, the command's words)
DERIVED: dict[str, tuple[str, list[str]]] = {
    "distilled": ("no-refit", ["distil"]),  # the 4 heads valid chose, taught to one 1,024-d head
}
RECALL_KEYS = tuple(recall_key(d, k) for d in DIRECTIONS for k in DEFAULT_KS)
KEYS = (*RECALL_KEYS, "zeroshot_modality_acc", "concept_f1", "fewshot_map@16")


def run_row(name: str, extra: list[str], features: Path, seed: int, out: Path) -> dict:
    from medembed.common.files import slug
    from medembed.evaluate.pipeline import EvalOptions, run_eval

    run_dir = out / slug(features.name) / slug(" ".join([name, *extra[len(ROWS.get(name, [])):]])) / f"seed-{seed}"
    cmd = [sys.executable, str(REPO / "cli.py"), "adapt", "--features", str(features), "--seed", str(seed),
           "--out", str(run_dir), *extra]
    before = 0.0
    if name in DERIVED:  # the source row's run first (kept from an earlier call when there is one)
        source_row, words = DERIVED[name]
        source = run_row(source_row, [*ROWS[source_row], *extra[len(ROWS.get(name, [])):]], features, seed, out)
        source_dir = out / slug(features.name) / slug(" ".join([source_row, *extra[len(ROWS.get(name, [])):]])) / f"seed-{seed}"
        cmd = [sys.executable, str(REPO / "cli.py"), *words, "--run", str(source_dir), "--seed", str(seed),
               "--out", str(run_dir)]
        before = source["seconds"]
    if not (run_dir / "summary.json").exists():
        t0 = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if res.returncode:
            sys.exit(f"{' '.join(cmd)}\n{res.stderr[-3000:]}")
        seconds = time.perf_counter() - t0 + before
        (run_dir / "wall_seconds").write_text(f"{seconds:.1f}\n")
    seconds = float((run_dir / "wall_seconds").read_text())
    result = run_eval([run_dir], split="test", out_dir=run_dir / "eval-test", options=EvalOptions(
        closed_form=False, examples=0, progress=False, overwrite=True))
    command = " ".join(["python cli.py adapt", *extra]) if name not in DERIVED else \
        f"python cli.py adapt {' '.join(extra[len(ROWS.get(name, [])):])}".strip() + f" && python cli.py {' '.join(DERIVED[name][1])}"
    return {"row": name, "seed": seed, "features": str(features), "command": command,
            "seconds": seconds, **{k: result["metrics"].get(k) for k in KEYS},
            # recall with plain cosine: equal to the above for runs without a query bank
            **{f"cosine_{k}": result["metrics"].get(f"cosine_{k}", result["metrics"].get(k)) for k in RECALL_KEYS}}


def table(results: list[dict], rows: list[str], plain: bool = False) -> str:
    """Mean ± std per row; `plain`: the retrieval columns with plain cosine (cosine_*), as rows
    measured before query banks were."""
    if plain:
        results = [{**r, **{k: r.get(f"cosine_{k}", r[k]) for k in RECALL_KEYS}} for r in results]
    head = ["lever", "seeds", *KEYS, "adapt s", "command"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    groups = dict.fromkeys((r["row"], r["command"]) for name in rows for r in results if r["row"] == name)
    for name, command in groups:
        got = [r for r in results if r["row"] == name and r["command"] == command]
        cells = [name, str(len(got))]
        for k in (*KEYS, "seconds"):
            v = np.array([r[k] for r in got if r.get(k) is not None], dtype=float)
            cells.append(f"{v.mean():.1f} ± {v.std(ddof=1) if len(v) > 1 else 0:.1f}" if len(v) else "–")
        cells.append(f"`{command}`")
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="default", help=f"comma-separated, from {', '.join([*ROWS, *DERIVED])}")
    p.add_argument("--features", default=str(ROCO))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--out", default=str(REPO / "runs" / "quality"))
    p.add_argument("--extra", default="", help="arguments added to every row's command (e.g. a recipe under test)")
    p.add_argument("--plain", action="store_true", help="print retrieval with plain cosine (rows without a query bank)")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [r for r in args.rows.split(",") if r]
    extra = args.extra.split() if args.extra else []
    results_file = out / "results.jsonl"
    for name in rows:
        for seed in (int(s) for s in args.seeds.split(",")):
            r = run_row(name, [*ROWS.get(name, []), *extra], Path(args.features), seed, out)
            with open(results_file, "a") as f:
                f.write(json.dumps(r) + "\n")
            print(json.dumps(r), flush=True)
    results = [json.loads(line) for line in results_file.read_text().splitlines() if line.strip()]
    latest = {(r["row"], r["command"], r["seed"]): r for r in results if r["features"] == str(Path(args.features))}
    print(f"\n`python benchmarks/quality.py --rows {args.rows} --features {args.features}`\n")
    print(table(list(latest.values()), list(dict.fromkeys([*ROWS, *DERIVED, *rows])), plain=args.plain))


if __name__ == "__main__":
    main()
