"""Long steps say what they are doing and how far they are, on stderr, and nothing when progress is
off: the closed-form fit (eigendecompositions and a 54-setting grid: minutes on wide features) and
the few-shot probes, alone and inside eval."""
from __future__ import annotations

from pathlib import Path

import pytest

from medembed.adapt.closed_form import CCA_GRID, fit_cca_on_valid
from tests.synthetic_features import correlated_split, write_synthetic_features


def test_the_closed_form_fit_names_each_step_on_stderr_and_keeps_quiet_without_progress(capsys):
    train = correlated_split(120, captions_per_image=2, seed=0)
    valid = correlated_split(40, seed=1, split="valid")
    shown = fit_cca_on_valid(train, valid, 8, progress=True)
    err = capsys.readouterr().err
    assert "closed form" in err and "moments of 240 train pairs" in err
    assert "eigendecompositions of the 48 + 32-wide covariances" in err
    assert f"ridge {CCA_GRID['reg'][-1]:g}: solving, then scoring 6 weightings on 40 valid images" in err
    quiet = fit_cca_on_valid(train, valid, 8)
    assert capsys.readouterr().err == ""
    # the bar changes nothing it fits
    assert (shown.reg, shown.power, shown.valid) == (quiet.reg, quiet.power, pytest.approx(quiet.valid))


def test_the_few_shot_probes_name_each_step_and_keep_quiet_without_progress(capsys):
    from medembed.common.tensors import unit
    from medembed.evaluate import fewshot

    train = correlated_split(200, n_concepts=4, seed=0)
    test = correlated_split(80, n_concepts=4, seed=2, split="test")
    config = fewshot.FewShotConfig(ks=(1, 4), seeds=2)
    args = (unit(train.image_features), train.concepts, unit(test.image_features), test.concepts)
    shown = fewshot.compute(*args, config=config, progress=True)
    err = capsys.readouterr().err
    concepts = int(shown["fewshot_concepts"])
    assert concepts >= 1 and "few-shot" in err
    for k in (1, 4):
        for method in config.methods:
            assert f"{k}-shot {method}: {concepts} concepts x 2 seed(s)" in err
    assert fewshot.compute(*args, config=config) == pytest.approx(shown)
    assert capsys.readouterr().err == ""


def test_eval_shows_the_closed_form_fit_and_the_few_shot_probes(tmp_path: Path, capsys):
    from medembed.adapt.config import AdaptConfig
    from medembed.adapt.trainer import train
    from medembed.evaluate.pipeline import EvalOptions, run_eval

    features = write_synthetic_features(tmp_path / "features", n_train=200, n_eval=80, n_concepts=4)
    train(AdaptConfig(features_dir=str(features), out=str(tmp_path / "run"), head="linear", dim=8, epochs=1, ensemble=1),
          progress=False)
    capsys.readouterr()
    sections = ("retrieval", "fewshot")
    run_eval([tmp_path / "run"], out_dir=tmp_path / "eval", options=EvalOptions(sections=sections, examples=0))
    err = capsys.readouterr().err
    assert "eigendecompositions of the 48 + 32-wide covariances" in err
    assert err.index("eigendecompositions") < err.index("eval closed-form: fitted")
    assert "-shot logreg: " in err and err.index("-shot logreg: ") < err.index("eval closed-form: fewshot")
    run_eval([tmp_path / "run"], out_dir=tmp_path / "quiet",
             options=EvalOptions(sections=sections, examples=0, progress=False))
    assert capsys.readouterr().err == ""
