"""On the real roco-rad cache (default backbone): the linear head, trained with the other defaults
(4 heads), keeps the recall it reached (valid R@10 44.7 / 45.8, test 38.8 / 39.2) within about four
points. The cache is extracted on first use; skipped only without the real data."""
import json
from pathlib import Path

import pytest

from medembed.adapt.run import load_adapter_run
from medembed.cache.reader import load_split
from medembed.cache.schema import split_file
from medembed.common.ranking import recall_summary
from tests.conftest import real_cache

ROCO = Path(__file__).resolve().parents[1] / "features" / "roco-rad" / "effnet-lite0-ms+minilm"


@pytest.mark.slow
def test_linear_infonce_head_keeps_its_recall(roco_linear_run):
    assert real_cache("roco-rad") == ROCO
    summary = json.loads((roco_linear_run / "summary.json").read_text())
    assert summary["valid"]["t2i_R@10"] >= 40 and summary["valid"]["i2t_R@10"] >= 41, summary["valid"]
    # the saved run generalises to the untouched test split
    run = load_adapter_run(roco_linear_run)
    test = load_split(ROCO / split_file("test"), with_views=False)
    r = recall_summary(run.embed_images(test.image_features), run.embed_texts(test.caption_features), test.caption_image)
    assert r["t2i_R@10"] >= 35 and r["i2t_R@10"] >= 35, r
