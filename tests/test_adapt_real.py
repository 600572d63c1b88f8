"""On the real roco-rad cache (default backbone): InfoNCE heads must retrieve far above chance
within a CI-sized budget. The cache is extracted on first use; skipped only without the real data."""
from pathlib import Path

import pytest

from medembed.adapt.config import AdaptConfig
from medembed.adapt.recall import recall_summary
from medembed.adapt.run import load_run, train
from medembed.cache.reader import load_split
from tests.conftest import real_cache

ROCO = Path(__file__).resolve().parents[1] / "features" / "roco-rad" / "effnet-lite0+minilm"


def _need_cache() -> None:
    """Extracts the cache on first use; skips (with the reason) only when ../shared/data/roco-rad is absent."""
    assert real_cache("roco-rad") == ROCO


@pytest.mark.slow
@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_infonce_heads_reach_three_times_chance(tmp_path, head):
    _need_cache()
    cfg = AdaptConfig(features_dir=str(ROCO), out=str(tmp_path / head), loss="infonce", head=head, epochs=6)
    summary = train(cfg, progress=False)
    valid = load_split(ROCO / "valid.h5", with_views=False)
    chance = 100 * 10 / valid.n_images  # one caption per image: 10 of N images
    assert summary["valid"]["t2i_R@10"] >= 3 * chance, summary["valid"]
    assert summary["valid"]["i2t_R@10"] >= 3 * chance, summary["valid"]
    # and the saved run generalises to the untouched test split
    run = load_run(tmp_path / head)
    test = load_split(ROCO / "test.h5", with_views=False)
    r = recall_summary(run.embed_images(test.image_features), run.embed_texts(test.caption_features), test.caption_image)
    test_chance = 100 * 10 / test.n_images
    assert r["t2i_R@10"] >= 3 * test_chance and r["i2t_R@10"] >= 3 * test_chance, r
