"""End to end on the real caches: `cli.py adapt` then `cli.py eval` through click, numbers well above chance.

The caches come from the extract pipeline with the default backbone, built on first use; the tests
skip, saying why, only when ../shared/data lacks the dataset.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

REPO = Path(__file__).resolve().parents[1]


def _cache(dataset: str) -> Path:
    """Extracted on first use (`tests.conftest.real_cache`); skips only when the real data is absent."""
    from tests.conftest import real_cache

    return real_cache(dataset)


def _adapt_then_eval(features: Path, tmp_path: Path, *extra: str) -> tuple[dict, str, Path]:
    from medembed.cli import main

    run = tmp_path / "run"
    res = CliRunner().invoke(main, ["adapt", "--features", str(features), "--out", str(run), "--epochs", "10"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(main, ["eval", "--run", str(run), "--k", "1,5,10", "--out", str(tmp_path / "ev"), *extra])
    assert res.exit_code == 0, res.output
    comparison = json.loads((tmp_path / "ev" / "comparison.json").read_text())
    return comparison["columns"], res.output, tmp_path / "ev"


@pytest.mark.slow
def test_roco_rad_adapt_then_eval(tmp_path):
    from medembed.cache.reader import read_attrs

    features = _cache("roco-rad")
    columns, output, out = _adapt_then_eval(features, tmp_path, "--fewshot-seeds", "1")
    run, chance, closed = columns["run"], columns["chance"], columns["closed-form"]
    assert run["pool_images"] == read_attrs(features / "test.h5")["n_images"]  # the whole test split
    assert run["t2i_R@10"] > 3 * chance["t2i_R@10"]
    assert run["i2t_R@10"] > 3 * chance["i2t_R@10"]
    assert closed["t2i_R@10"] > 3 * chance["t2i_R@10"]
    # CT, ultrasound, plain x-ray and angiogram have >= 5 test images; MRI is never tagged, PET once
    assert run["zeroshot_modality_classes"] == 4
    assert run["zeroshot_modality_acc"] > chance["zeroshot_modality_acc"]
    assert run["fewshot_map@16"] > chance["fewshot_map@16"]
    assert run["concept_f1"] > chance["concept_f1"]
    report = (out / "report.md").read_text()
    assert "MRI (C0024485)" in report and "plain x-ray (C1306645" in report
    assert "t2i_R@1" in output and "report:" in output


@pytest.mark.slow
def test_flickr8k_five_captions_per_image(tmp_path):
    columns, _, out = _adapt_then_eval(_cache("flickr8k-1k"), tmp_path)
    run, chance = columns["run"], columns["chance"]
    assert run["pool_captions"] == 5 * run["pool_images"]
    assert run["t2i_R@10"] > 3 * chance["t2i_R@10"]
    assert run["i2t_R@10"] > 3 * chance["i2t_R@10"]
    assert "zeroshot_concept_map" not in run  # no concept labels in flickr8k
    assert "no concept labels" in (out / "report.md").read_text()
