"""Real data: extract a whole roco-rad split (454 images) with the default offline backbone."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from medembed.cache.reader import load_split
from medembed.cache.schema import split_file
from tests.conftest import shared_dataset

MODALITIES = {"C0040405": "CT", "C1306645": "x-ray", "C0041618": "ultrasound", "C0002978": "angiogram"}


@pytest.mark.slow
def test_extract_real_roco_split(tmp_path):
    data = shared_dataset("roco-rad")
    from medembed.cli import main

    r = CliRunner().invoke(main, ["extract", "--data", str(data), "--splits", "test", "--out", str(tmp_path),
                                  "--batch-size", "64", "--workers", "2"])
    assert r.exit_code == 0, r.output
    assert "test" in r.output and "454" in r.output and "img/s" in r.output
    s = load_split(tmp_path / "roco-rad" / "effnet-lite0-ms+minilm" / split_file("test"))
    assert s.n_images == 454 and s.n_captions == 454
    assert s.image_features.shape == (454, 1792) and s.caption_features.shape == (454, 384)
    assert torch.isfinite(s.image_features).all() and torch.isfinite(s.caption_features).all()
    assert s.attrs["dataset"] == "roco-rad" and not s.attrs["synthetic"]
    assert s.concepts.shape == (454, len(s.concept_ids)) and s.concepts.nnz > 454

    # Frozen ImageNet features already separate imaging modalities: an image's nearest neighbour
    # carries the same modality label far more often than the label frequencies alone would give.
    dense = s.concept_dense()
    cols = [s.concept_ids.index(c) for c in MODALITIES]
    single = dense[:, cols].sum(1) == 1
    labels = dense[single][:, cols].argmax(1)
    x = torch.nn.functional.normalize(s.image_features[torch.from_numpy(single)], dim=1)
    sims = x @ x.T
    sims.fill_diagonal_(-2)
    nn_labels = labels[sims.argmax(1).numpy()]
    agreement = float((nn_labels == labels).mean())
    prior = float(sum((np.bincount(labels) / len(labels)) ** 2))
    assert len(labels) >= 100
    assert agreement > prior + 0.25, (agreement, prior)
