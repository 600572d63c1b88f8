"""`cli.py eval`, measured by section.

    python benchmarks/eval_sections.py roco [--run runs/roco-default]
        the whole `cli.py eval --run RUN --split test` on roco-rad as a user runs it (wall time from
        the shell, start-up included), each section's time from its progress line, and next to it the
        bare cost of the section's core computation on the same inputs: the GEMMs for retrieval and
        zero-shot, the batched logistic solve for few-shot, the neighbour GEMMs and votes for detection.

    python benchmarks/eval_sections.py scale [--sizes 1000,10000,100000]
        the same eval of one run on a synthetic split of N images and N captions with 2,000 concepts
        (train and valid the same size), in a fresh process per size: each section's time and the
        process's peak RSS.

One run each, printed as Markdown tables.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from medembed.common.recall_keys import recall_key

REPO = Path(__file__).resolve().parents[1]
T2I_R10 = recall_key("t2i", 10)  # the number each pool size reports beside its time and memory
SECTION_LINE = re.compile(r"^eval (?P<col>.+?): (?P<what>retrieval|zeroshot|fewshot|detection|fitted.*?) (?P<s>[\d.]+) s$")


def table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(x) for x in r) + " |" for r in rows]
    return "\n".join(out)


def _sections(stderr: str) -> dict[tuple[str, str], float]:
    out = {}
    for line in stderr.splitlines():
        m = SECTION_LINE.match(line.strip())
        if m:
            what = "closed-form fit" if m["what"].startswith("fitted") else m["what"]
            out[(m["col"], what)] = float(m["s"])
    return out


def _timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def bare_costs(run_dir: Path) -> dict[str, float]:
    """The core computation of each section on the run's own roco-rad embeddings."""
    from medembed.cache.reader import load_split
    from medembed.cache.schema import split_file
    from medembed.evaluate import fewshot
    from medembed.evaluate.detection import DetectionConfig, Neighbours, knn_vote
    from medembed.model.runs import open_run

    run = open_run(run_dir)
    files = {s: load_split(run.features_dir / split_file(s), with_views=False) for s in ("train", "valid", "test")}
    img = {s: run.embed_images(x.image_features) for s, x in files.items()}
    txt = run.embed_texts(files["test"].caption_features)
    named = sum(1 for n in files["test"].concept_names if n)
    prompts = torch.nn.functional.normalize(torch.randn(named, img["test"].shape[1]), dim=1)
    cfg = fewshot.FewShotConfig()
    cols = fewshot.choose_concepts(files["train"].concepts.tocsc(), files["test"].concepts.tocsc(), 16,
                                   cfg.max_concepts, cfg.min_test_positives)
    supports = fewshot.draw_supports(files["train"].concepts.tocsc(), cols, cfg.ks, cfg.seeds)
    det_cols = (files["train"].concepts.sum(0).A1 >= 3).nonzero()[0]
    y = (files["train"].concepts[:, det_cols] > 0).astype("float32").tocsr()
    k = max(k for k, _ in DetectionConfig().knn_grid)

    def votes():  # the neighbour GEMMs of valid and test against train, and one vote of each
        for q in (img["valid"], img["test"]):
            knn_vote(Neighbours.of(img["train"], q, k), y, k, 5.0)

    def solves():
        for k in cfg.ks:
            rows, ys = supports.of_k(k)
            fewshot.logreg_scores(img["train"][rows], ys, img["test"], cfg.logreg_c, cfg.logreg_iter)

    return {
        "retrieval": _timed(lambda: (txt @ img["test"].T, img["test"] @ txt.T)),
        "zeroshot": _timed(lambda: img["test"] @ prompts.T),
        "fewshot": _timed(solves),
        "detection": _timed(votes),
    }


def roco(args) -> None:
    run = Path(args.run)
    out = Path(tempfile.mkdtemp(prefix="eval-bench-")) / "ev"
    cmd = [sys.executable, str(REPO / "cli.py"), "eval", "--run", str(run), "--split", "test", "--out", str(out)]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - t0
    if res.returncode:
        sys.exit(res.stderr[-2000:])
    sections = _sections(res.stderr)
    bare = bare_costs(run)
    name = run.name
    rows = []
    for what in ("retrieval", "zeroshot", "fewshot", "detection"):
        s = sections.get((name, what), float("nan"))
        rows.append([what, f"{s:.1f}", f"{bare[what]:.2f}", f"{s / max(bare[what], 1e-9):.1f}"])
    comparison = json.loads((out / "comparison.json").read_text())["columns"][name]
    print(f"`{' '.join(cmd[1:])}` on roco-rad test (454 images): **{wall:.1f} s wall** (start-up, loading, "
          f"closed-form fit {sections.get(('closed-form', 'closed-form fit'), float('nan')):.1f} s, both columns, plots)\n")
    print(table(["section (run column)", "s", "bare core s", "ratio"], rows))
    keys = (recall_key("t2i", 10), recall_key("i2t", 10), "zeroshot_modality_acc", "fewshot_map@1", "fewshot_map@16", "concept_f1")
    print("\n" + table(["metric", "value"], [[k, f"{comparison.get(k, float('nan')):.2f}"] for k in keys]))


def _scale_prepare(n: int, root: Path) -> None:
    """A synthetic split of n images (train, valid and test alike) and a closed-form run on it."""
    from medembed.adapt.config import AdaptConfig
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: tests/ holds the generator
    from medembed.adapt.trainer import train
    from tests.synthetic_features import write_synthetic_features

    features = write_synthetic_features(root / "features", n_train=n, n_eval=n, n_concepts=2000, image_dim=256,
                                        text_dim=256, latent=64, noise=4.0, concept_rate=(0.0005, 0.05),
                                        store_dtype="float16")  # as `extract` stores features
    train(AdaptConfig(features_dir=str(features), out=str(root / "run"), head="cca", dim=256), progress=False)


def _scale_eval(n: int, root: Path) -> None:
    """In a fresh process, so peak RSS is the evaluation's own (torch and all imports included), with
    the memory setting `cli.py` applies at start-up."""
    from medembed.common.memory import release_large_blocks
    from medembed.evaluate.pipeline import EvalOptions, run_eval

    release_large_blocks()

    t0 = time.perf_counter()
    res = run_eval([root / "run"], split="test", out_dir=root / "ev",
                   options=EvalOptions(closed_form=False, examples=0, progress=True))
    print(json.dumps({"n": n, "wall": time.perf_counter() - t0, T2I_R10: res["metrics"].get(T2I_R10),
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def scale(args) -> None:
    rows = []
    for n in (int(x) for x in args.sizes.split(",")):
        with tempfile.TemporaryDirectory(prefix=f"eval-scale-{n}-") as root:
            for stage in ("prepare", "eval"):
                cmd = [sys.executable, __file__, "scale-child", "--stage", stage, "--n", str(n), "--root", root]
                res = subprocess.run(cmd, capture_output=True, text=True)
                if res.returncode:
                    sys.exit(res.stderr[-3000:])
            result = json.loads(res.stdout.strip().splitlines()[-1])
            sec = _sections(res.stderr)
            times = [sec.get(("run", s), float("nan")) for s in ("retrieval", "zeroshot", "fewshot", "detection")]
            rows.append([f"{n:,}", *(f"{t:.1f}" for t in times), f"{result['wall']:.0f}",
                         f"{result['peak_rss_mb']:.0f}", f"{result[T2I_R10]:.1f}"])
            print(rows[-1], flush=True)
    print("\nsynthetic splits of N images and N captions, 2,000 concepts (frequencies 0.05% to 5%, about 21 per image), 256-d float16 features (as extracted), "
          "train and valid of N too; one closed-form run; `run_eval` of it in a fresh process, without the "
          "closed-form column and examples:\n")
    print(table(["N", "retrieval s", "zeroshot s", "fewshot s", "detection s", "eval wall s",
                 "peak RSS MiB (whole process)", "t2i R@10"], rows))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="mode", required=True)
    r = sub.add_parser("roco")
    r.add_argument("--run", default=str(REPO / "runs" / "roco-default"))
    s = sub.add_parser("scale")
    s.add_argument("--sizes", default="1000,10000,100000")
    c = sub.add_parser("scale-child")
    c.add_argument("--n", type=int, required=True)
    c.add_argument("--root", required=True)
    c.add_argument("--stage", choices=["prepare", "eval"], required=True)
    args = p.parse_args()
    if args.mode == "scale-child":
        (_scale_prepare if args.stage == "prepare" else _scale_eval)(args.n, Path(args.root))
        return
    print("command: python benchmarks/eval_sections.py " + " ".join(sys.argv[1:]) +
          f" — torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    roco(args) if args.mode == "roco" else scale(args)


if __name__ == "__main__":
    main()
