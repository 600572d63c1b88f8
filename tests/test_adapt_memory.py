"""Adapt within --max-memory-gb: a training cache larger than the whole budget trains, streamed from
disk, with the process's measured peak under the budget; a budget nothing fits is refused in one line
before anything is read."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from medembed.adapt.config import AdaptConfig
from medembed.adapt.memory import plan_memory
from medembed.cache.schema import shard_file, split_file
from medembed.cache.writer import write_joined, write_split
from medembed.common.memory import GB
from medembed.common.planning import MemoryBudgetError
from tests.peak_memory import run_cli
from tests.synthetic_features import correlated_split

SHARD_PAIRS = 65536
SHARDS = 9  # 589,824 pairs of 768-d image and 384-d caption features: 1.27 GiB as float16, 2.53 GiB as float32
BUDGET_GB = 1.25



@pytest.fixture(scope="module")
def big_cache(tmp_path_factory) -> Path:
    """train.h5 joined from shards (as a sharded extraction leaves it) without ever holding it whole."""
    folder = tmp_path_factory.mktemp("big") / "synthetic" / "toy"
    shards = []
    for i in range(SHARDS):
        part = correlated_split(SHARD_PAIRS, 768, 384, latent=32, noise=0.5, seed=i, dtype=torch.float16)
        part.image_ids = [f"s{i}_{k:06d}" for k in range(SHARD_PAIRS)]
        shards.append(write_split(folder / shard_file("train", i, SHARDS), part))
        del part
    write_joined(folder / split_file("train"), shards, {"backbone": "synthetic", "dataset": "synthetic", "split": "train",
                                                        "dtype": "float16", "n_records": SHARDS * SHARD_PAIRS})
    valid = correlated_split(1000, 768, 384, latent=32, noise=0.5, seed=99, split="valid", dtype=torch.float16)
    write_split(folder / split_file("valid"), valid)
    return folder


def _cache_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("train*.h5"))


@pytest.mark.slow
def test_a_cache_larger_than_the_budget_trains_streamed_under_it(big_cache, tmp_path):
    # the features alone, as stored, are larger than the whole budget (the files hold ids and captions too)
    assert SHARDS * SHARD_PAIRS * (768 + 384) * 2 > BUDGET_GB * GB and _cache_bytes(big_cache) > BUDGET_GB * GB
    config = AdaptConfig(features_dir=str(big_cache), out=str(tmp_path / "run"), head="linear", dim=32, ensemble=1,
                         batch_size=2048, max_memory_gb=BUDGET_GB)
    plan = plan_memory(config, big_cache / split_file("train"), big_cache / split_file("valid"))
    assert plan.stream and plan.total <= BUDGET_GB * GB and plan.chunk_rows < SHARDS * SHARD_PAIRS

    run = tmp_path / "run"
    args = ["adapt", "--features", str(big_cache), "--out", str(run), "--head", "linear", "--dim", "32",
            "--ensemble", "1", "--epochs", "1", "--batch-size", "2048", "--max-memory-gb", str(BUDGET_GB)]
    done, peak = run_cli(args, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert 0 < peak <= BUDGET_GB * GB, f"peak {peak / GB:.2f} GiB above the {BUDGET_GB} GiB budget"
    summary = json.loads((run / "summary.json").read_text())
    mem = summary["memory"]
    assert mem["streamed"] and mem["budget_bytes"] == int(BUDGET_GB * GB) and 0 < mem["peak_rss_bytes"] <= peak
    assert "train streamed from disk in chunks of" in done.stdout and "measured peak" in done.stdout
    # every pair was seen once, and what was learnt is real (chance R@10 on 1,000 images: 1%)
    assert summary["n_train_pairs"] == SHARDS * SHARD_PAIRS
    assert summary["valid"]["t2i_R@10"] > 20 and summary["valid"]["i2t_R@10"] > 20


def test_a_budget_nothing_fits_is_refused_in_one_line(big_cache, tmp_path):
    config = AdaptConfig(features_dir=str(big_cache), out=str(tmp_path / "x"), max_memory_gb=0.5)
    with pytest.raises(MemoryBudgetError, match=r"training needs at least .* even with the training split streamed"):
        plan_memory(config, big_cache / split_file("train"), big_cache / split_file("valid"))
    from medembed.cli import main

    r = CliRunner().invoke(main, ["adapt", "--features", str(big_cache), "--out", str(tmp_path / "x"),
                                  "--max-memory-gb", "0.5"])
    assert r.exit_code == 1 and "Traceback" not in r.output
    (line,) = r.output.strip().splitlines()
    assert re.search(r"training needs at least [\d.]+ GiB even with the training split streamed \(process .*\), "
                     r"above --max-memory-gb 0.5; raise it to at least [\d.]+$", line), line
    assert not (tmp_path / "x" / "config.json").exists()  # refused before the run started
    # the closed form holds train in memory: refused with its own reason
    cca = AdaptConfig(features_dir=str(big_cache), out=str(tmp_path / "y"), head="cca", max_memory_gb=2)
    with pytest.raises(MemoryBudgetError, match=r"--head cca\) holds the training split in memory"):
        plan_memory(cca, big_cache / split_file("train"), big_cache / split_file("valid"))
