"""adapt --refit: valid chooses the epoch and the query bank, then fresh heads train on train + valid
for exactly that many epochs and are the ones kept; the choice itself is the plain run's."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from medembed.adapt import checkpoint as ckpt
from medembed.adapt.config import AdaptConfig
from medembed.adapt.memory import GB, plan_memory
from medembed.adapt.run import load_adapter_run
from medembed.adapt.trainer import SELECTION, train
from medembed.cache.reader import load_split
from medembed.cache.schema import split_file
from medembed.cli import main
from medembed.common.planning import MemoryBudgetError
from medembed.evaluate import detection
from medembed.evaluate.pipeline import EvalOptions, run_eval
from medembed.model.embedding import model_from_run
from tests.synthetic_features import write_synthetic_features


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    return write_synthetic_features(tmp_path_factory.mktemp("refit") / "features", n_train=300, n_eval=80,
                                    captions_per_image=2, n_concepts=5, concept_rate=0.3)


def _config(features, out, **kw) -> AdaptConfig:
    return AdaptConfig(**{**dict(features_dir=str(features), out=str(out), head="mlp", dim=32, ensemble=2, epochs=8,
                                 batch_size=64, patience=3), **kw})


def test_refit_trains_the_chosen_epochs_on_train_and_valid(features, tmp_path):
    plain = train(_config(features, tmp_path / "plain", refit=False), progress=False)
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


def test_eval_chooses_a_refit_runs_detection_settings_with_its_selection_heads(features, tmp_path):
    """The refit heads have trained on valid, so the concept detectors' settings are chosen with the
    heads valid chose (selection.safetensors), then applied with the refit heads' train embeddings."""
    train(_config(features, tmp_path / "plain", refit=False), progress=False)
    train(_config(features, tmp_path / "refit", refit=True), progress=False)
    options = EvalOptions(sections=("detection",), closed_form=False, examples=0, progress=False)
    got = run_eval([tmp_path / "refit", tmp_path / "plain"], out_dir=tmp_path / "eval", options=options)["columns"]
    refit_m, plain_m = got["refit"], got["plain"]
    assert refit_m["concept_f1_tuned_apart"] == 1.0 and plain_m["concept_f1_tuned_apart"] == 0.0

    splits = {s: load_split(features / split_file(s), with_views=False) for s in ("train", "valid", "test")}
    refit, chooser = load_adapter_run(tmp_path / "refit"), load_adapter_run(tmp_path / "plain")  # same heads as selection
    assert torch.equal(refit.selection().embed_images(splits["valid"].image_features),
                       chooser.embed_images(splits["valid"].image_features))
    emb = {s: refit.embed_images(x.image_features) for s, x in splits.items()}
    want = detection.compute(emb["train"], splits["train"].concepts, emb["test"], splits["test"].concepts,
                             valid=(emb["valid"], splits["valid"].concepts),
                             tuning=tuple(chooser.embed_images(splits[s].image_features) for s in ("train", "valid")))
    assert refit_m["concept_f1"] == pytest.approx(want["concept_f1"])
    assert refit_m["concept_f1_threshold"] == pytest.approx(want["concept_f1_threshold"])
    # ranking another dataset's pool, the run's valid was never trained on: no selection heads involved
    elsewhere = write_synthetic_features(tmp_path / "elsewhere", n_train=120, n_eval=40, captions_per_image=2,
                                         n_concepts=5, concept_rate=0.3)
    assert model_from_run(refit.with_features(elsewhere)).chooser is None
    assert model_from_run(refit).chooser is not None and model_from_run(chooser).chooser is None


def test_the_default_refits_when_train_and_valid_fit_the_budget(features, tmp_path):
    """refit None (the default) refits when the plan has room for train + valid beside the run, and
    says why not otherwise; --refit asked for by name refuses in one line instead. (Wide heads, so
    that the refit's second set of heads is the plan's largest phase.)"""
    roomy = plan_memory(_config(features, tmp_path / "p", dim=512), features / split_file("train"), features / split_file("valid"))
    assert roomy.refit and "then refit on train + valid" in roomy.describe()
    without = plan_memory(_config(features, tmp_path / "p", dim=512, refit=False), features / split_file("train"), features / split_file("valid"))
    assert not without.refit and without.total < roomy.total
    between = (without.total + roomy.total) / 2 / GB  # the run fits, its refit does not
    tight = _config(features, tmp_path / "tight", dim=512, max_memory_gb=between)
    assert not plan_memory(tight, features / split_file("train"), features / split_file("valid")).refit
    summary = train(tight, progress=False)
    assert "refit" not in summary and "does not fit --max-memory-gb" in summary["refit_skipped"]
    assert not (tmp_path / "tight" / SELECTION).exists()
    with pytest.raises(MemoryBudgetError, match="--refit holds train \\+ valid in memory"):
        train(_config(features, tmp_path / "asked", dim=512, max_memory_gb=between, refit=True), progress=False)
    assert train(_config(features, tmp_path / "default"), progress=False)["refit"]["images"] == 380
    r = CliRunner().invoke(main, ["adapt", "--features", str(features), "--out", str(tmp_path / "lit"), "--unlock",
                                  "text:1", "--refit"])
    assert r.exit_code != 0 and "a run with --unlock or --unfreeze-every does not refit" in r.output
