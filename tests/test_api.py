"""The notebook API on a tiny-clip run: what it returns equals what the command line computes."""
from __future__ import annotations

import pytest
import torch

import medembed
from medembed.adapt.config import AdaptConfig
from medembed.adapt.trainer import train
from medembed.cache.reader import load_split
from medembed.evaluate.search import search as cli_search
from tests.conftest import tiny_clip_cache


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    cache = tiny_clip_cache(root, {"train": 24, "valid": 8, "test": 8})
    train(AdaptConfig(features_dir=str(cache), out=str(root / "run"), head="linear", dim=16, epochs=2, batch_size=8),
          progress=False)
    return root / "run"


def test_package_exposes_the_api_lazily():
    assert medembed.__version__ and callable(medembed.load_run) and callable(medembed.search)
    with pytest.raises(AttributeError):
        medembed.no_such_thing  # noqa: B018


def test_api_matches_the_command_line(run_dir, tmp_path):
    run = medembed.load_run(run_dir)
    test = load_split(run.features_dir / "test.h5")
    # a caption of the cache embeds to the same vector the run gives its cached features
    emb = medembed.embed_texts(run, test.captions[:2])
    assert emb.shape == (2, 16 * 4) and torch.allclose(emb.norm(dim=1), torch.ones(2))  # 4 heads of dim 16
    assert torch.allclose(emb, run.embed_texts(test.caption_features[:2]), atol=2e-2)
    image = run.features_dir.parents[1].parent / "data" / test.image_locations[0]
    assert torch.allclose(medembed.embed_images(run, [image]), run.embed_images(test.image_features[:1]), atol=2e-2)
    hits = medembed.search(run, test.captions[0], k=3, split="test")
    want = cli_search(run_dir, text=test.captions[0], k=3, split="test").hits
    assert [h.image_id for h in hits] == [h.image_id for h in want]
    columns = medembed.evaluate_run(run, split="test", out_dir=tmp_path / "ev", sections=("retrieval",), examples=0,
                                closed_form=False, progress=False)
    assert set(columns) == {"chance", "run"} and columns["run"]["pool_images"] == 8
