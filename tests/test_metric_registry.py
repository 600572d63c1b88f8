"""A metric is one module plus one line in `evaluate.metrics.METRICS`: a toy metric defined here, and
registered only by adding it to that tuple, is scored for every column (chance included), reported
under its own section in the metrics JSON, comparison.json, report.md and the console table, and
left out by `eval --skip` like any built-in section."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from medembed.adapt.config import AdaptConfig
from medembed.adapt.run import load_adapter_run
from medembed.adapt.trainer import train
from medembed.cache.reader import load_split
from medembed.cache.schema import split_file
from medembed.evaluate import metrics as registry
from medembed.evaluate.metric import ColumnInputs, Metric, Needs, Scores
from medembed.evaluate.pipeline import EvalOptions, run_eval
from medembed.evaluate.report import format_summary
from tests.synthetic_features import write_synthetic_features


# --- the toy metric module: everything a new metric needs --------------------------------------------
def _mean_cosine(inputs: ColumnInputs, _settings: None) -> Scores:
    """Mean cosine (in %) between each caption's embedding and its own image's."""
    own = inputs.images()[inputs.test.caption_image.long()]
    return Scores({"mean_cosine": 100 * float((own * inputs.texts()).sum(1).mean())})


def _mean_cosine_chance(inputs: ColumnInputs, _settings: None) -> Scores:
    """Random directions: the expected cosine is 0."""
    return Scores({"mean_cosine": 0.0})


METRIC = Metric(section="mean_cosine", title="Mean cosine", keys=r"mean_cosine", score=_mean_cosine,
                chance=_mean_cosine_chance, needs=Needs(texts=True))
# -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cca_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("registry")
    features = write_synthetic_features(root / "features", n_train=120, n_eval=60, n_concepts=4, captions_per_image=2,
                                        image_dim=16, text_dim=12, noise=0.6)
    train(AdaptConfig(features_dir=str(features), out=str(root / "run"), dim=8, head="cca"), progress=False)
    return root / "run"


@pytest.fixture
def registered(monkeypatch) -> Metric:
    """The one line that adds the metric (here for this test only)."""
    monkeypatch.setattr(registry, "METRICS", (*registry.METRICS, METRIC))
    return METRIC


def test_the_registry_lists_the_built_in_sections_in_report_order():
    assert registry.sections() == ("retrieval", "zeroshot", "fewshot", "detection")
    assert registry.optional_sections() == ("zeroshot", "fewshot", "detection")
    assert EvalOptions().sections == registry.sections()


def test_a_registered_metric_is_scored_and_reported_everywhere(registered, cca_run, tmp_path):
    assert "mean_cosine" in EvalOptions().sections  # asked for by default, like every registered metric
    out = tmp_path / "ev"
    result = run_eval([cca_run], out_dir=out, options=EvalOptions(sections=("retrieval", "mean_cosine"), examples=0,
                                                                  progress=False))
    record = json.loads((out / "metrics-run.json").read_text())
    assert record["sections"]["mean_cosine"] == ["mean_cosine"]
    run = load_adapter_run(cca_run)
    test = load_split(Path(run.features_dir) / split_file("test"))
    img, txt = run.embed_images(test.image_features), run.embed_texts(test.caption_features)
    expected = 100 * float((img[torch.as_tensor(test.caption_image).long()] * txt).sum(1).mean())
    assert record["metrics"]["mean_cosine"] == pytest.approx(expected, abs=1e-3)
    comparison = json.loads((out / "comparison.json").read_text())
    assert list(comparison["columns"]) == ["chance", "closed-form", "run"]
    assert comparison["columns"]["chance"]["mean_cosine"] == 0.0  # the chance column is filled
    assert comparison["sections"]["chance"]["mean_cosine"] == ["mean_cosine"]
    assert comparison["columns"]["closed-form"]["mean_cosine"] > 0
    report = (out / "report.md").read_text()
    assert "## Mean cosine" in report
    assert f"| mean_cosine | 0.0 | {comparison['columns']['closed-form']['mean_cosine']:.1f} | " \
           f"{record['metrics']['mean_cosine']:.1f} |" in report
    assert report.index("## Concept detection") < report.index("## Mean cosine")  # registry order
    assert any(line.startswith("mean_cosine ") for line in format_summary(result).splitlines())


def test_skip_and_help_come_from_the_registry(registered, cca_run, tmp_path):
    from medembed.cli import main

    runner = CliRunner()
    assert "mean_cosine" in runner.invoke(main, ["eval", "--help"]).output
    bad = runner.invoke(main, ["eval", "--run", str(cca_run), "--skip", "nonsense", "--out", str(tmp_path / "x")])
    assert bad.exit_code != 0 and "unknown sections nonsense (zeroshot, fewshot, detection, mean_cosine)" in bad.output
    out = tmp_path / "skipped"
    res = runner.invoke(main, ["eval", "--run", str(cca_run), "--skip", "mean_cosine,zeroshot,fewshot,detection",
                               "--no-closed-form", "--examples", "0", "--out", str(out)])
    assert res.exit_code == 0, res.output
    record = json.loads((out / "metrics-run.json").read_text())
    assert "mean_cosine" not in record["metrics"] and list(record["sections"]) == ["retrieval"]
    assert "| mean_cosine |" not in (out / "report.md").read_text()


def test_a_key_outside_the_declared_ones_is_refused(monkeypatch, cca_run, tmp_path):
    """`keys` is a contract: a metric cannot overwrite another section's numbers."""
    stray = Metric(section="stray", keys=r"stray_\w+", score=lambda inputs, _: Scores({"t2i_R@1": 0.0}),
                   chance=lambda inputs, _: Scores({"t2i_R@1": 0.0}))
    monkeypatch.setattr(registry, "METRICS", (*registry.METRICS, stray))
    with pytest.raises(ValueError, match="'stray' produced t2i_R@1"):
        run_eval([cca_run], out_dir=tmp_path / "ev", options=EvalOptions(sections=("retrieval", "stray"), examples=0,
                                                                         closed_form=False, progress=False))
