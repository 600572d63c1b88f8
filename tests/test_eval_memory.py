"""eval within --max-memory-gb: planned from the cache headers before a feature is read; an evaluation
that fits runs with its measured peak under the plan; one that does not is refused in one line,
before anything is written."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from medembed.adapt.config import AdaptConfig
from medembed.adapt.trainer import train
from medembed.cache.schema import split_file
from medembed.cli import main
from medembed.common.memory import GB
from medembed.common.planning import MemoryBudgetError
from medembed.evaluate.memory import PoolFiles, plan_eval_memory
from tests.peak_memory import run_cli
from tests.synthetic_features import correlated_split, write_cache

POOL = 20_000  # test images with a caption each and 20 concepts: 768 + 384 float16 features


@pytest.fixture(scope="module")
def pool_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("eval-memory")
    features = root / "features"
    for name, n, seed in (("train", 4000, 0), ("valid", 1000, 1), ("test", POOL, 2)):
        write_cache(correlated_split(n, 768, 384, latent=32, noise=0.5, seed=seed, split=name, n_concepts=20,
                                     concept_rate=0.1), features / split_file(name), dtype="float16")
    train(AdaptConfig(features_dir=str(features), out=str(root / "run"), head="linear", dim=64, ensemble=1, epochs=2),
          progress=False)
    return root / "run"


def _plan(run: Path, budget: float = 64.0):
    features = json.loads((run / "config.json").read_text())["features_dir"]
    f = Path(features)
    return plan_eval_memory(budget, [PoolFiles(f / split_file("test"), f / split_file("train"), f / split_file("valid"), [64])], True, True, 256)


@pytest.mark.slow
def test_an_evaluation_runs_under_its_plan(pool_run, tmp_path):
    plan = _plan(pool_run)
    budget = round(plan.total / GB + 0.05, 2)  # the plan, rounded up: no room beyond it
    out = tmp_path / "eval"
    done, peak = run_cli(["eval", "--run", str(pool_run), "--out", str(out), "--max-memory-gb", str(budget)],
                         timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "memory: planned peak" in done.stderr and f"of --max-memory-gb {budget:g}" in done.stderr
    print(f"planned {plan.total / GB:.2f} GiB, measured peak {peak / GB:.2f} GiB")
    assert 0 < peak <= plan.total, f"measured peak {peak / GB:.2f} GiB above the plan {plan.total / GB:.2f} GiB"
    metrics = json.loads((out / "metrics-run.json").read_text())["metrics"]
    assert metrics["pool_images"] == POOL and metrics["t2i_R@10"] > 1  # chance: 0.025%


def test_an_evaluation_that_does_not_fit_is_refused_in_one_line(pool_run, tmp_path):
    plan = _plan(pool_run)
    # the plan grows with the pool: its split and the embeddings of every image and caption
    assert plan.held["test split"] > POOL * (768 + 384) * 2 and plan.phases["scoring a column"] > POOL * 2 * 65 * 4
    with pytest.raises(MemoryBudgetError, match=r"evaluating it needs about .* raise it to at least [\d.]+, "
                                                r"evaluate a compact run"):
        _plan(pool_run, 1.0)
    out = tmp_path / "refused"
    r = CliRunner().invoke(main, ["eval", "--run", str(pool_run), "--out", str(out), "--max-memory-gb", "1"])
    assert r.exit_code == 1 and "Traceback" not in r.output
    (line,) = r.output.strip().splitlines()
    assert re.search(r"test\.h5: evaluating it needs about [\d.]+ GiB \(.*\), above --max-memory-gb 1; raise it to at "
                     r"least [\d.]+, evaluate a compact run \(`cli.py compact --dims 256`\), or leave out what learns "
                     r"from train \(--skip, --no-closed-form\)$", line), line
    assert not out.exists()
