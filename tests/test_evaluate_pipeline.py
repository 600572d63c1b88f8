"""`run_eval`, `search` and their CLI commands on synthetic caches with trained runs: the files a user
reads, their numbers cross-checked against the metric functions, and search against a known answer."""
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
from medembed.common import ranking
from medembed.evaluate import retrieval
from medembed.evaluate.detection import DetectionConfig
from medembed.evaluate.fewshot import FewShotConfig
from medembed.evaluate.pipeline import EvalOptions, run_eval
from medembed.model.embedding import model_from_run
from medembed.serve import search as search_mod
from tests.synthetic_features import write_synthetic_features

REQUIRED_KEYS = ["t2i_R@1", "t2i_R@5", "t2i_R@10", "i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_medr", "i2t_medr",
                 "pool_images", "pool_captions", "zeroshot_concept_map", "fewshot_map@1", "fewshot_map@16", "concept_f1"]


def _fast_options(**kw) -> EvalOptions:
    return EvalOptions(fewshot=FewShotConfig(ks=(1, 4, 16), seeds=1, max_concepts=3, methods=("logreg", "prototype")),
                       detection=DetectionConfig(max_iter=10), **kw)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Synthetic train/valid/test (2 captions per image, 8 concepts) and a closed-form (cca) run."""
    root = tmp_path_factory.mktemp("evalruns")
    features = write_synthetic_features(root / "features", n_train=300, n_eval=120, n_concepts=8,
                                        captions_per_image=2, image_dim=24, text_dim=16, noise=0.6)
    train(AdaptConfig(features_dir=str(features), out=str(root / "runs" / "cca"), dim=16, head="cca"), progress=False)
    return {"features": features, "cca": root / "runs" / "cca", "root": root}


@pytest.fixture(scope="module")
def linear_run(runs) -> Path:
    """A trained (gradient) run beside the closed-form one: seconds, so only the slow tests use it."""
    out = runs["root"] / "runs" / "linear"
    train(AdaptConfig(features_dir=str(runs["features"]), out=str(out), dim=16, head="linear", epochs=10, batch_size=64,
                      lr=3e-3), progress=False)
    return out


@pytest.mark.slow
def test_run_eval_writes_report_and_matches_metric_functions(runs, linear_run, tmp_path):
    result = run_eval([linear_run, runs["cca"]], split="test", ks=[1, 5, 10], out_dir=tmp_path / "ev",
                      options=_fast_options())
    out = tmp_path / "ev"
    assert list(result["columns"]) == ["chance", "closed-form", "linear", "cca"]
    record = json.loads((out / "metrics-linear.json").read_text())
    assert record["schema_version"] == 2 and record["split"] == "test" and record["run_ref"] == str(linear_run)
    assert record["scored"]["features"] == str(runs["features"] / split_file("test"))
    assert record["scored"]["backbone"] == "synthetic" and record["scored"]["pool_images"] == 120
    assert set(record["sections"]) == {"retrieval", "zeroshot", "fewshot", "detection"}
    metrics = record["metrics"]
    for key in REQUIRED_KEYS:
        assert key in metrics, key
    assert json.loads((out / "metrics-cca.json").read_text())["metrics"]["t2i_R@1"] == pytest.approx(
        result["columns"]["cca"]["t2i_R@1"])
    # the first run's retrieval numbers are exactly what the metric function gives on its embeddings,
    # ranked with the run's query bank (and cosine_* with plain cosine)
    run, test = load_adapter_run(linear_run), load_split(runs["features"] / split_file("test"))
    img, txt = run.embed_images(test.image_features), run.embed_texts(test.caption_features)
    image_offset, caption_offset = model_from_run(run).offsets(img, txt)
    direct = ranking.summarize(ranking.ranks(img, txt, test.caption_image, image_offset=image_offset,
                                                 caption_offset=caption_offset), (1, 5, 10))
    plain = retrieval.compute(img, txt, test.caption_image, ks=(1, 5, 10))
    for key in ("t2i_R@1", "i2t_R@5", "t2i_medr", "i2t_meanr"):
        assert metrics[key] == pytest.approx(direct[key], abs=1e-4)
    for key in ("t2i_R@1", "t2i_R@5", "i2t_R@1", "i2t_R@10"):
        assert metrics.get(f"cosine_{key}", metrics[key]) == pytest.approx(plain[key], abs=1e-4)
    assert (metrics["pool_images"], metrics["pool_captions"]) == (120, 240)
    # chance is the closed form; trained and closed-form heads are far above it on this learnable set
    chance = result["columns"]["chance"]
    assert chance["t2i_R@1"] == pytest.approx(100 / 120)
    for name in ("closed-form", "linear", "cca"):
        col = result["columns"][name]
        assert col["t2i_R@10"] > 5 * chance["t2i_R@10"], name
        assert col["zeroshot_concept_auroc"] > 60, name
        assert col["concept_f1"] > chance["concept_f1"], name
    # the report puts every column side by side; plots and example grids exist as PNGs
    report = (out / "report.md").read_text()
    assert "| metric | chance | closed-form | linear | cca |" in report
    assert "120 images, 240 captions" in report
    # the closed-form column is the one `adapt --head cca` fits (setting chosen on valid): same numbers
    # by plain cosine (the cca run also ranks with its query bank; its plain recall is cosine_*)
    cca = result["columns"]["cca"]
    assert result["columns"]["closed-form"]["t2i_R@10"] == pytest.approx(cca.get("cosine_t2i_R@10", cca["t2i_R@10"]))
    assert "chosen on valid" in report
    for name in ("recall_at_k.png", "fewshot.png", "example_text2image_1.png", "example_image2text_1.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    header = (out / "zeroshot_concepts.csv").read_text().splitlines()[0]
    assert header.startswith("concept_id,name,positives,closed-form_auroc")
    assert json.loads((out / "comparison.json").read_text())["columns"]["cca"]["t2i_R@1"] == pytest.approx(
        result["columns"]["cca"]["t2i_R@1"], abs=1e-6)


@pytest.mark.slow
def test_eval_cli_default_out_and_table(runs):
    from medembed.cli import main

    args = ["eval", "--run", str(runs["cca"]), "--k", "1,5,1000", "--skip", "fewshot,detection", "--examples", "0",
            "--no-closed-form"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    # K beyond the 120-image pool is capped there, and the output says so
    assert "t2i_R@120" in res.output and "t2i_R@1000" not in res.output and "closed-form" not in res.output
    assert "--k 1000 is more than the 120 images of the pool: capped at R@120" in res.output
    out = runs["cca"] / "eval-test"
    metrics = json.loads((out / "metrics-cca.json").read_text())["metrics"]
    assert metrics["t2i_R@120"] == 100.0
    assert "fewshot_map@1" not in metrics and "concept_f1" not in metrics
    assert str(out / "report.md") in res.output
    # the same evaluation again is refused, and the first one is left as it was
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 1 and "already holds an evaluation; pass --overwrite" in res.output
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # --overwrite replaces the folder whole: nothing of the earlier evaluation stays beside the new one
    (out / "recall_at_k.png").rename(out / "stale-plot.png")
    res = CliRunner().invoke(main, [*args, "--overwrite", "--k", "1,5"])
    assert res.exit_code == 0, res.output
    assert not (out / "stale-plot.png").exists() and (out / "recall_at_k.png").exists()
    assert "t2i_R@120" not in json.loads((out / "metrics-cca.json").read_text())["metrics"]


def test_eval_cli_rejects_bad_k(runs):
    from medembed.cli import main

    res = CliRunner().invoke(main, ["eval", "--run", str(runs["cca"]), "--k", "0,5"])
    assert res.exit_code != 0 and "positive integers" in res.output


class _LookupBackbone:
    """Stands in for the run's backbone: a caption known to the cache encodes to its cached features."""

    def __init__(self, split, image_row: int = 0):
        self.features = {c: split.caption_features[i] for i, c in enumerate(split.captions)}
        self.image = split.image_features[image_row]

    def encode_texts(self, texts):
        return torch.stack([self.features[t] for t in texts])

    def preprocess(self, pil):
        return torch.zeros(3, 4, 4)

    def encode_images(self, pixels):
        return self.image[None].repeat(pixels.shape[0], 1)


def test_search_text_finds_the_captions_image(runs, tmp_path):
    test = load_split(runs["features"] / split_file("test"))
    run = load_adapter_run(runs["cca"])
    r = ranking.ranks(run.embed_images(test.image_features), run.embed_texts(test.caption_features), test.caption_image)
    j = int(torch.nonzero(r.t2i == 1)[0])  # a caption whose own image the run ranks first
    results = search_mod.search(runs["cca"], text=test.captions[j], k=5, split="test", backbone=_LookupBackbone(test),
                                out=tmp_path / "grid.png")
    hits = results.hits
    assert [x.rank for x in hits] == [1, 2, 3, 4, 5]
    assert hits[0].image_id == test.image_ids[int(test.caption_image[j])]
    assert results.via == "exact scan" and results.notes == []
    assert all(a.score >= b.score for a, b in zip(hits, hits[1:]))
    assert (tmp_path / "grid.png").read_bytes()[:4] == b"\x89PNG"


def test_search_image_ranks_captions(runs, tmp_path):
    from PIL import Image

    test = load_split(runs["features"] / split_file("test"))
    run = load_adapter_run(runs["cca"])
    r = ranking.ranks(run.embed_images(test.image_features), run.embed_texts(test.caption_features), test.caption_image)
    row = int(torch.nonzero(r.i2t == 1)[0])  # an image whose own caption the run ranks first
    image = tmp_path / "q.png"
    Image.new("RGB", (8, 8)).save(image)
    results = search_mod.search(runs["cca"], image=image, k=3, split="test", backbone=_LookupBackbone(test, row),
                                out=tmp_path / "grid.png")
    assert len(results.hits) == 3
    assert results.hits[0].image_id == test.image_ids[row]
    assert results.hits[0].caption in [c for c, i in zip(test.captions, test.caption_image.tolist()) if i == row]
    assert (tmp_path / "grid.png").exists()
    # without --split the pool is every split: more candidates can only raise the best score
    everywhere = search_mod.search(runs["cca"], image=image, k=3, backbone=_LookupBackbone(test, row))
    assert everywhere.hits[0].score >= results.hits[0].score
    assert {x.split for x in everywhere.hits} <= {"train", "valid", "test"}


def test_search_uses_a_built_index_and_agrees_with_the_scan(runs, tmp_path):
    import shutil

    from medembed.serve.index import IndexOptions, build_index

    run_dir = Path(shutil.copytree(runs["cca"], tmp_path / "cca"))  # the index stays out of the shared run
    test = load_split(runs["features"] / split_file("test"))
    build_index(run_dir, IndexOptions(split="test", kind="flat"))
    backbone = _LookupBackbone(test)
    via_index = search_mod.search(run_dir, text=test.captions[3], k=6, split="test", backbone=backbone)
    via_scan = search_mod.search(run_dir, text=test.captions[3], k=6, split="test", backbone=backbone, use_index=False)
    assert via_index.via == "flat index" and via_scan.via == "exact scan"
    assert [x.image_id for x in via_index.hits] == [x.image_id for x in via_scan.hits]
    assert [x.score for x in via_index.hits] == pytest.approx([x.score for x in via_scan.hits], abs=1e-5)


def test_search_cli_prints_ranked_results(runs, monkeypatch):
    from medembed.cli import main

    test = load_split(runs["features"] / split_file("test"))
    monkeypatch.setattr(search_mod, "run_backbone", lambda run, device="cpu": _LookupBackbone(test))
    res = CliRunner().invoke(main, ["search", "--run", str(runs["cca"]), "--text", test.captions[0], "-k", "4",
                                    "--split", "test"])
    assert res.exit_code == 0, res.output
    lines = res.output.strip().splitlines()
    assert lines[0].startswith("rank") and len(lines) == 5
    assert lines[1].split()[0] == "1"
    res = CliRunner().invoke(main, ["search", "--run", str(runs["cca"])])
    assert res.exit_code != 0 and "exactly one of --text or --image" in res.output


def test_eval_refuses_a_cache_from_another_backbone(runs, tmp_path):
    """A run trained on one backbone's features must not silently score another backbone's."""
    import shutil

    import h5py

    from medembed.cli import main

    features = tmp_path / "features"
    shutil.copytree(runs["features"], features)
    run_dir = tmp_path / "run"
    shutil.copytree(runs["cca"], run_dir, ignore=shutil.ignore_patterns("eval-*"))
    cfg = json.loads((run_dir / "config.json").read_text())
    cfg["features_dir"] = str(features)
    (run_dir / "config.json").write_text(json.dumps(cfg))
    with h5py.File(features / split_file("test"), "r+") as f:
        trained_on = f.attrs["backbone"]
        f.attrs["backbone"] = "some-other-backbone"
    r = CliRunner().invoke(main, ["eval", "--run", str(run_dir), "--skip", "zeroshot,fewshot,detection"])
    assert r.exit_code == 1
    assert f"backbone: cache has some-other-backbone, this run has {trained_on}" in r.output
    assert str(features / split_file("test")) in r.output


def test_tampered_or_foreign_checkpoints_are_refused(runs, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(runs["cca"], run_dir)
    best = run_dir / "best.safetensors"
    data = bytearray(best.read_bytes())
    data[-3] ^= 0xFF  # one flipped byte inside the last weight
    best.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"best\.safetensors: checkpoint content does not match its recorded sha256"):
        load_adapter_run(run_dir)
    best.write_bytes(b"\x80\x04\x95 a pickle is never loaded")
    with pytest.raises(ValueError, match=r"best\.safetensors: not a readable safetensors checkpoint"):
        load_adapter_run(run_dir)
