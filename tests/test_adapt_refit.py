"""adapt --refit: valid chooses the epoch and the query bank, then fresh heads train on train + valid
for exactly that many epochs and are the ones kept; the choice itself is the plain run's."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from medembed.adapt import checkpoint as ckpt
from medembed.adapt.config import AdaptConfig
from medembed.adapt.trainer import SELECTION, train
from medembed.cli import main
from tests.synthetic_features import write_synthetic_features


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    return write_synthetic_features(tmp_path_factory.mktemp("refit") / "features", n_train=300, n_eval=80,
                                    captions_per_image=2, n_concepts=5, concept_rate=0.3)


def _config(features, out, **kw) -> AdaptConfig:
    return AdaptConfig(features_dir=str(features), out=str(out), head="mlp", dim=32, ensemble=2, epochs=8,
                       batch_size=64, patience=3, **kw)


def test_refit_trains_the_chosen_epochs_on_train_and_valid(features, tmp_path):
    plain = train(_config(features, tmp_path / "plain"), progress=False)
    refit = train(_config(features, tmp_path / "refit", refit=True), progress=False)
    # the choice is the plain run's: same epoch, same valid numbers, same bank, same chosen heads
    assert refit["best_epoch"] == plain["best_epoch"] and refit["valid"] == plain["valid"]
    assert refit["querybank"] == plain["querybank"]
    chosen, _ = ckpt.read_verified(tmp_path / "refit" / SELECTION)
    want, _ = ckpt.read_verified(tmp_path / "plain" / ckpt.BEST)
    assert chosen.keys() == want.keys() and all(torch.equal(chosen[k], want[k]) for k in want)
    # the heads kept were trained on both splits for exactly the chosen number of epochs
    assert refit["refit"]["epochs"] == refit["best_epoch"] and refit["refit"]["images"] == 300 + 80
    kept, _ = ckpt.read_verified(tmp_path / "refit" / ckpt.BEST)
    assert any(not torch.equal(kept[k], want[k]) for k in want)
    saved = json.loads((tmp_path / "refit" / ckpt.SUMMARY).read_text())
    assert saved["refit"] == refit["refit"] and json.loads((tmp_path / "refit" / ckpt.CONFIG).read_text())["refit"]


def test_refit_on_the_command_line_says_what_it_kept(features, tmp_path):
    r = CliRunner().invoke(main, ["adapt", "--features", str(features), "--out", str(tmp_path / "run"), "--head", "mlp",
                                  "--dim", "16", "--ensemble", "1", "--epochs", "3", "--refit"])
    assert r.exit_code == 0, r.output
    assert "refit: the heads kept were trained on train + valid (380 images) for the" in r.output
    r = CliRunner().invoke(main, ["adapt", "--features", str(features), "--out", str(tmp_path / "cca"), "--head", "cca",
                                  "--refit"])
    assert r.exit_code != 0 and "--refit has no effect on --head cca" in r.output
