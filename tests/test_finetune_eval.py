"""`eval` and `search` take a fine-tuned checkpoint directly and score new raw images and captions
with the checkpoint's own towers: the numbers they print are the ones the checkpoint's model
computes from the image files and caption strings themselves."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from medembed.adapt.config import AdaptConfig
from medembed.adapt.run import load_adapter_run
from medembed.adapt.tuning.finetuned import FinetunedModel
from medembed.adapt.tuning.unfreeze import TuneConfig, train_with_unfreezing
from medembed.cache.reader import load_split, read_attrs
from medembed.cache.schema import split_file
from medembed.common import ranking
from medembed.evaluate.pipeline import EvalOptions, run_eval
from medembed.model.runs import open_run, run_backbone
from tests.conftest import make_imageclef2023, tiny_clip_cache


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("fteval")
    cache = tiny_clip_cache(root, {"train": 24, "valid": 8}, data_name="train-data")
    config = AdaptConfig(features_dir=str(cache), out=str(root / "run"), head="mlp", dim=16, epochs=2,
                         batch_size=8, seed=0)
    result = train_with_unfreezing(config, TuneConfig(unlock="1", every=1, epochs=1, batch_size=8, backbone_lr=1e-3,
                                                      augment=False, rollback=False), progress=False)
    # new raw data the run never saw: other images (another seed), a test split only
    new = make_imageclef2023(root / "new-data", {"test": 10}, seed=7)
    return {"root": root, "run": root / "run", "checkpoint": Path(result["checkpoint"]), "new": new}


@pytest.mark.slow
def test_eval_on_new_raw_data_scores_what_the_checkpoint_computes(finetuned, tmp_path):
    ckpt, new = finetuned["checkpoint"], finetuned["new"]
    options = EvalOptions(sections=("retrieval",), closed_form=False, examples=0, data=str(new),
                          features_root=str(tmp_path / "f"), progress=False)
    result = run_eval([ckpt], split="test", ks=[1, 3, 5], out_dir=tmp_path / "eval", options=options)

    model = FinetunedModel.load(ckpt)
    cache = tmp_path / "f" / "new-data" / model.backbone.name
    attrs = read_attrs(cache / split_file("test"))
    assert attrs["weights_sha256"] == model.backbone.provenance["weights_sha256"]  # encoded by the fine-tuned towers
    split = load_split(cache / split_file("test"))
    img = model.embed_images([new / loc for loc in split.image_locations])
    txt = model.embed_texts(split.captions)
    # another dataset with no train and valid split of its own: no query bank fits it, so plain cosine
    # (the run's training bank describes other images and captions)
    want = ranking.summarize(ranking.ranks(img, txt, split.caption_image), [1, 3, 5])
    got = result["metrics"]
    # the cache stores float16 features; ranks may only differ where two scores tie within that precision
    for key in ("t2i_R@1", "t2i_R@3", "t2i_R@5", "i2t_R@1", "i2t_R@5"):
        assert abs(got[key] - want[key]) <= 100 / 10 + 1e-6, key
    assert result["pool_images"] == 10
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "fine-tuned backbone" in report and model.backbone.name in report
    assert "ranks by plain cosine (the pool's dataset has no train and valid split" in report

    # the unfreezing run folder names the same model as its checkpoint file
    by_folder = open_run(finetuned["run"])
    assert by_folder.checkpoint == ckpt and by_folder.backbone.name == model.backbone.name


@pytest.mark.slow
def test_search_cli_takes_the_checkpoint_and_a_new_pool(finetuned, tmp_path):
    from medembed.cli import main

    ckpt, new = finetuned["checkpoint"], finetuned["new"]
    query = "A blue square, case 2."
    r = CliRunner().invoke(main, ["search", "--run", str(ckpt), "--text", query, "--data", str(new),
                                  "--features-root", str(tmp_path / "f"), "-k", "3"])
    assert r.exit_code == 0, r.output
    lines = r.output.strip().splitlines()  # progress bars of the one-off encoding come first
    header = next(i for i, line in enumerate(lines) if "rank  score" in line)
    rows = [line.split() for line in lines[header + 1:]]
    assert len(rows) == 3
    model = FinetunedModel.load(ckpt)
    split = load_split(tmp_path / "f" / "new-data" / model.backbone.name / split_file("test"))
    img = model.embed_images([new / loc for loc in split.image_locations])
    scores = img @ model.embed_texts([query]).T  # a new pool without train and valid splits: plain cosine
    best = torch.topk(scores[:, 0], 3)
    assert [float(x[1]) for x in rows] == pytest.approx(best.values.tolist(), abs=5e-3)
    assert rows[0][2] == split.image_ids[int(best.indices[0])]


def test_heads_trained_on_finetuned_features_point_to_the_checkpoint(finetuned):
    heads_only = load_adapter_run(finetuned["run"])  # config.json + best.safetensors, without the towers
    with pytest.raises(ValueError, match="finetuned.safetensors"):
        run_backbone(heads_only)


def test_index_refuses_a_finetuned_run_with_the_reason(finetuned):
    from medembed.serve.index import build_index

    with pytest.raises(ValueError, match="scans its pool exactly"):
        build_index(finetuned["run"])
