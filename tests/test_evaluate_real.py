"""End to end on the real caches: the default `cli.py adapt` then `cli.py eval` through click.

These guard the quality reached, not just "above chance": each bound sits a few points below what
the default recipe measured (BENCHMARKS.md), so a change that loses about five points fails here.
The caches come from the extract pipeline with the default backbone, built on first use; the tests
skip, saying why, only when ../shared/data lacks the dataset.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

# roco-rad test (454 images) with the default recipe (concept texts, ranked with its query bank, refit
# on train + valid) measured R@10 48.5 / 48.2, R@1 10.8 / 10.8, modality accuracy from concept prompts
# 95.0%, concept F1 27.2, few-shot mAP@16 30.8 (3 seeds, BENCHMARKS.md); flickr8k-1k test (85 images,
# 425 captions) R@10 93.6 / 90.6 (3 seeds). The floors sit about 4 points below.
ROCO_FLOOR = {"t2i_R@10": 44.5, "i2t_R@10": 44.0, "t2i_R@1": 7.0, "i2t_R@1": 7.0, "zeroshot_modality_acc": 91.0,
              "concept_f1": 23.0, "fewshot_map@16": 26.5}
FLICKR_FLOOR = {"t2i_R@10": 90.0, "i2t_R@10": 86.0}
RECALL = [f"{d}_R@{k}" for d in ("t2i", "i2t") for k in (1, 5, 10)]


def _cache(dataset: str) -> Path:
    """Extracted on first use (`tests.conftest.real_cache`); skips only when the real data is absent."""
    from tests.conftest import real_cache

    return real_cache(dataset)


def _adapt_then_eval(features: Path, tmp_path: Path, *extra: str) -> tuple[dict, str, Path]:
    from medembed.cli import main

    run = tmp_path / "run"
    res = CliRunner().invoke(main, ["adapt", "--features", str(features), "--out", str(run)])
    assert res.exit_code == 0, res.output
    return _eval(run, tmp_path, *extra)


def _eval(run: Path, tmp_path: Path, *extra: str) -> tuple[dict, str, Path]:
    from medembed.cli import main

    res = CliRunner().invoke(main, ["eval", "--run", str(run), "--k", "1,5,10", "--out", str(tmp_path / "ev"), *extra])
    assert res.exit_code == 0, res.output
    comparison = json.loads((tmp_path / "ev" / "comparison.json").read_text())
    return comparison["columns"], res.output, tmp_path / "ev"


@pytest.mark.slow
def test_roco_rad_default_recipe_keeps_its_quality(roco_default_run, tmp_path):
    """The default `cli.py adapt` (the session's run, tests/conftest.py), evaluated by `cli.py eval`."""
    from medembed.cache.reader import read_attrs
    from medembed.cache.schema import split_file

    features = _cache("roco-rad")
    columns, output, out = _eval(roco_default_run, tmp_path, "--fewshot-seeds", "1")
    run, chance = columns["run"], columns["chance"]
    assert run["pool_images"] == read_attrs(features / split_file("test"))["n_images"] == 454  # the whole test split
    for key, floor in ROCO_FLOOR.items():
        assert run[key] >= floor, (key, run[key], floor)
        assert run[key] > 3 * chance[key] or key == "fewshot_map@16", (key, run[key], chance[key])
    # the query bank chosen on valid ranks the run (plain cosine where valid chose no correction), and
    # ranks the test split no worse than plain cosine (+1.2 mean recall on seed 0); the heads kept are
    # the refit's, and the concept detectors' settings were chosen with the heads valid chose
    assert (roco_default_run / "querybank.json").exists()
    assert json.loads((roco_default_run / "summary.json").read_text())["refit"]["images"] == 3722 + 463
    assert run["concept_f1_tuned_apart"] == 1.0
    bank, plain = (sum(run.get(f"{p}{k}", run[k]) for k in RECALL) / 6 for p in ("", "cosine_"))
    assert bank >= plain, (bank, plain)
    # CT, ultrasound, plain x-ray and angiogram have >= 5 test images; MRI is never tagged, PET once
    assert run["zeroshot_modality_classes"] == 4
    report = (out / "report.md").read_text()
    assert "MRI (C0024485)" in report and "plain x-ray (C1306645" in report
    assert "t2i_R@1" in output and "report:" in output


@pytest.mark.slow
def test_flickr8k_five_captions_per_image(tmp_path):
    columns, _, out = _adapt_then_eval(_cache("flickr8k-1k"), tmp_path)
    run = columns["run"]
    assert run["pool_captions"] == 5 * run["pool_images"] == 425
    for key, floor in FLICKR_FLOOR.items():
        assert run[key] >= floor, (key, run[key], floor)
    assert "zeroshot_concept_map" not in run  # no concept labels in flickr8k
    assert "no concept labels" in (out / "report.md").read_text()
