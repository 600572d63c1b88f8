"""--concept-pretrain: the image head first learns to classify each image's named concepts, then the
contrastive epochs start from it."""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from medembed.adapt.config import AdaptConfig
from medembed.adapt.heads import build_heads, fit_input_stats
from medembed.adapt.pretrain import pretrain_image_head
from medembed.adapt.trainer import train
from medembed.cli import main
from tests.synthetic_features import correlated_split, write_synthetic_features


def _probe_auc(head, split, cols) -> float:
    """Mean over concepts of how well a fixed linear read-out (least squares on the head's output)
    separates images with the concept from those without: the share of (positive, negative) pairs
    ordered right."""
    with torch.no_grad():
        x = head(split.image_features.float())
    y = torch.from_numpy(split.concepts[:, cols].toarray() > 0).float()
    w = torch.linalg.lstsq(torch.cat([x, torch.ones(len(x), 1)], 1), y).solution
    scores = torch.cat([x, torch.ones(len(x), 1)], 1) @ w
    aucs = []
    for c in range(y.shape[1]):
        pos, neg = scores[y[:, c] > 0, c], scores[y[:, c] == 0, c]
        aucs.append(float((pos[:, None] > neg[None, :]).float().mean()))
    return float(np.mean(aucs))


def test_pretraining_teaches_the_image_head_the_concepts():
    train_split = correlated_split(300, n_concepts=6, seed=0, concept_rate=0.3)
    held = correlated_split(150, n_concepts=6, seed=5, concept_rate=0.3)
    config = {**AdaptConfig(features_dir="x", out="y", dim=8, ensemble=2).to_dict(), "image_dim": 48, "text_dim": 32}

    def fresh():
        head, _ = build_heads(config)
        fit_input_stats(head, iter([train_split.image_features]))
        return head

    before, after = fresh(), fresh()
    state = {k: v.clone() for k, v in after.state_dict().items()}
    record = pretrain_image_head(after, train_split, 30, lr=3e-3, weight_decay=0.0, batch_size=64, min_positives=5,
                                 seed=0, device=torch.device("cpu"))
    torch.manual_seed(0)
    reference = torch.rand(3)
    torch.manual_seed(0)
    pretrain_image_head(fresh(), train_split, 1, lr=3e-3, weight_decay=0.0, batch_size=64, min_positives=5, seed=0,
                        device=torch.device("cpu"))
    assert torch.equal(torch.rand(3), reference)  # the caller's random stream is left as it was
    assert record.concepts == 6 and record.images == 300 and record.epochs == 30
    assert record.last_loss < record.first_loss - 0.05  # measured 0.62 -> 0.50
    assert any(not torch.equal(after.state_dict()[k], state[k]) for k in state)
    after.eval(), before.eval()
    cols = np.arange(6)
    # on unseen images, the pre-trained head's output separates the concepts better than a fresh one
    assert _probe_auc(after, held, cols) > _probe_auc(before, held, cols) + 0.025  # measured 0.946 vs 0.899
    # the same seed trains the same head
    again = fresh()
    pretrain_image_head(again, train_split, 30, lr=3e-3, weight_decay=0.0, batch_size=64, min_positives=5, seed=0,
                        device=torch.device("cpu"))
    assert all(torch.equal(again.state_dict()[k], after.state_dict()[k]) for k in state)
    with pytest.raises(ValueError, match="needs concepts with at least 1000 training images"):
        pretrain_image_head(fresh(), train_split, 1, lr=1e-3, weight_decay=0.0, batch_size=64, min_positives=1000,
                            seed=0, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="needs concept labels"):
        pretrain_image_head(fresh(), replace(train_split, concepts=None), 1, lr=1e-3, weight_decay=0.0, batch_size=64,
                            min_positives=1, seed=0, device=torch.device("cpu"))


def test_a_pretrained_run_records_it_and_the_cli_checks_it(tmp_path):
    features = write_synthetic_features(tmp_path / "f", n_train=200, n_eval=60, n_concepts=5, concept_rate=0.3)
    summary = train(AdaptConfig(features_dir=str(features), out=str(tmp_path / "run"), dim=16, ensemble=2, epochs=3,
                                batch_size=64, concept_pretrain=4, refit=False), progress=False)
    assert summary["concept_pretrain"]["epochs"] == 4 and summary["concept_pretrain"]["concepts"] == 5
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["concept_pretrain"] == summary["concept_pretrain"]
    r = CliRunner().invoke(main, ["adapt", "--features", str(features), "--out", str(tmp_path / "cca"), "--head", "cca",
                                  "--concept-pretrain", "3"])
    assert r.exit_code != 0 and "--concept-pretrain has no effect on --head cca" in r.output
