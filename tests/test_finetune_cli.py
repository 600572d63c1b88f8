"""`cli.py adapt --unfreeze-every` end to end on the tiny random backbone."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from medembed.cache.reader import read_attrs
from medembed.cache.schema import split_file
from medembed.extract.extraction import ExtractConfig, extract
from tests.conftest import make_imageclef2023


@pytest.mark.slow
def test_adapt_with_one_unfreeze_cycle_refreshes_the_cache(tmp_path):
    from medembed.cli import main

    data = make_imageclef2023(tmp_path / "d", {"train": 24, "valid": 8, "test": 8})
    extracted = extract(ExtractConfig(data=str(data), backbone="tiny-clip", out=str(tmp_path / "f"), batch_size=8,
                                    workers=0, progress=False))
    old_dir = tmp_path / "f" / "d" / "tiny-clip"
    old_bytes = (old_dir / split_file("train")).read_bytes()
    r = CliRunner().invoke(main, ["adapt", "--features", str(old_dir), "--head", "linear", "--epochs", "2",
                                  "--batch-size", "8", "--dim", "16", "--out", str(tmp_path / "run"),
                                  "--unfreeze-every", "1", "--unlock", "1", "--backbone-lr", "1e-3"])
    assert r.exit_code == 0, r.output
    assert (old_dir / split_file("train")).read_bytes() == old_bytes  # the old cache stays as it was
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["mode"] == "periodic" and len(summary["cycles"]) == 1
    new_dirs = [p for p in (tmp_path / "f" / "d").iterdir() if p.name.startswith("tiny-clip+ft-")]
    assert len(new_dirs) == 1
    new_attrs = read_attrs(new_dirs[0] / split_file("train"))
    assert new_attrs["weights_sha256"] != read_attrs(old_dir / split_file("train"))["weights_sha256"]
    # a kept cycle leaves the fine-tuned model in the run folder; a rolled-back one says so instead
    kept = (tmp_path / "run" / "finetuned.safetensors").exists()
    assert kept != any("rolled back" in n for n in summary["notes"]), summary["notes"]
    assert ("checkpoint:" in r.output) == kept and "cycle 1 (raw)" in r.output
    assert extracted.splits[0].images == 24
