"""extract within --max-memory-gb: the plan sizes the parts a split is assembled in, the process stays
under it, the parts join into the cache an unbudgeted extraction writes, and what cannot fit (a batch,
a --shard) is refused in one line before an image is read."""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from medembed.cli import main
from medembed.common.memory import GB
from medembed.extract.backbones import create_backbone
from medembed.extract.datasets import load_dataset
from medembed.extract.memory import plan_extract_memory
from tests.conftest import make_imageclef2023
from tests.peak_memory import run_cli

BATCH = 16


def _plan(data: Path, budget_gb: float = 64.0):
    ds = load_dataset(data)
    return plan_extract_memory(create_backbone("tiny-clip", device="cpu"), budget_gb=budget_gb,
                               n_dataset_records=len(ds.records), captions_per_image=1.0, batch_size=BATCH, workers=0,
                               views=1, dtype="float16", records_per_file=262_144)


def _args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["extract", "--data", str(data), "--backbone", "tiny-clip", "--workers", "0", "--batch-size", str(BATCH),
            "--views", "1", "--out", str(out), *extra]


def _datasets(path: Path) -> dict[str, np.ndarray]:
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return out


@pytest.mark.slow
def test_a_split_is_assembled_in_parts_sized_to_the_budget_under_its_plan(tmp_path):
    data = make_imageclef2023(tmp_path / "data", {"train": 80, "valid": 16})
    free = _plan(data)
    # room for 40 records beyond what is always held: parts of 32 (whole batches), so train takes 3 parts
    budget = (sum(free.held.values()) + 40 * free.per_record) / GB
    plan = _plan(data, budget)
    assert plan.records_per_file == 32 and plan.fits == 32
    done, peak = run_cli(_args(data, tmp_path / "budget", "--max-memory-gb", f"{budget:.9f}"), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "written in 3 parts, joined" in done.stdout, done.stdout
    assert "train: memory: parts of up to 32 images; planned peak" in done.stdout, done.stdout
    print(f"planned {plan.total / GB:.2f} GiB, measured peak {peak / GB:.2f} GiB")
    assert 0 < peak <= plan.total, f"measured peak {peak / GB:.2f} GiB above the plan {plan.total / GB:.2f} GiB"

    whole = CliRunner().invoke(main, _args(data, tmp_path / "whole"))  # the default budget: one file
    assert whole.exit_code == 0, whole.output
    parts, one = (_datasets(next((tmp_path / o).rglob("train.h5"))) for o in ("budget", "whole"))
    assert parts.keys() == one.keys() and {"images/features", "images/view_features", "captions/features"} <= set(one)
    for name in one:  # features, views, captions, ids, locations, concepts: the same, bit for bit
        assert np.array_equal(parts[name], one[name]), name


def test_what_cannot_fit_is_refused_in_one_line_before_reading_an_image(tmp_path):
    data = make_imageclef2023(tmp_path / "data", {"train": 80, "valid": 16})
    free = _plan(data)
    tight = (sum(free.held.values()) + 2 * free.per_record) / GB  # not one batch of 16
    res = CliRunner().invoke(main, _args(data, tmp_path / "a", "--max-memory-gb", f"{tight:.9f}"))
    lines = res.output.strip().splitlines()
    assert res.exit_code == 1 and len(lines) == 1 and "Traceback" not in res.output, res.output
    assert lines[0].startswith("Error: extract needs ") and f"for one batch of {BATCH} images" in lines[0]
    assert "above --max-memory-gb" in lines[0] and not (tmp_path / "a").exists()

    # shard 1/2 holds 48 train records (3 of the 5 batches) where parts of 32 fit: the shard count that
    # would fit is named
    budget = float(f"{(sum(free.held.values()) + 40 * free.per_record) / GB:.9f}")
    res = CliRunner().invoke(main, _args(data, tmp_path / "b", "--max-memory-gb", f"{budget:.9f}", "--shard", "1/2"))
    lines = res.output.strip().splitlines()
    assert res.exit_code == 1 and len(lines) == 1, res.output
    assert lines[0] == (f"Error: --shard 1/2: 48 images of split train in one shard; --max-memory-gb {budget:g} "
                        "assembles at most 32: use 3 or more shards, or a larger --max-memory-gb")
    assert not list((tmp_path / "b").rglob("*.h5"))
