"""Training on synthetic caches: gradients reach only the heads, resume is bit-exact, every head
kind saves and loads alike, the closed-form baseline beats chance, the CLI works end to end."""
import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from medembed.adapt.closed_form import fit_closed_form
from medembed.adapt.config import AdaptConfig
from medembed.adapt.data import MemorySource, iter_batches
from medembed.adapt.heads import EnsembleHead, Standardize, build_head, fit_input_stats
from medembed.adapt.losses import build_loss
from medembed.adapt.run import load_adapter_run
from medembed.adapt.state import Schedule
from medembed.adapt.trainer import param_groups, train
from medembed.cache.reader import load_split
from medembed.cache.schema import split_file
from medembed.common.ranking import recall_summary
from tests.synthetic_features import correlated_split, write_synthetic_features


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    d = tmp_path_factory.mktemp("feat") / "synthetic" / "toy"
    return write_synthetic_features(d, n_train=240, n_eval=120, captions_per_image=2, n_concepts=6, views=2,
                                    image_dim=48, text_dim=32, noise=0.5)


def small(features, out, **kw) -> AdaptConfig:
    """A few epochs of a small run, without the refit (tests/test_adapt_refit.py): these tests check what
    training chose, saved and measured on valid, which a refit replaces by heads valid never scored."""
    base = dict(features_dir=str(features), out=str(out), dim=16, epochs=4, batch_size=32, lr=3e-3, threads=1,
                refit=False)
    return AdaptConfig(**{**base, **kw})


def test_lr_schedule_by_hand():
    schedule = Schedule([1.0, 0.1], warmup=4, total=20)
    assert schedule.lr(0, 1.0) == pytest.approx(0.25)
    assert schedule.lr(3, 1.0) == pytest.approx(1.0)
    assert schedule.lr(12, 1.0) == pytest.approx(0.5)  # half-way down the cosine
    assert schedule.lr(20, 1.0) == pytest.approx(0.0)
    opt = torch.optim.SGD([{"params": [torch.zeros(1, requires_grad=True)]},
                           {"params": [torch.zeros(1, requires_grad=True)]}], lr=1.0)
    schedule.apply(opt, 12)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.5, 0.05])  # each group from its own peak


def test_standardize_matches_numpy():
    x = torch.randn(1000, 5) * torch.tensor([1.0, 2, 3, 4, 0]) + 7
    s = Standardize(5).fit(x.half(), chunk=128)
    ref = x.half().double().numpy()
    np.testing.assert_allclose(s.mean.numpy(), ref.mean(0), rtol=1e-5)
    np.testing.assert_allclose(s.std.numpy()[:4], ref.std(0, ddof=1)[:4], rtol=1e-4)
    assert s.std[4] == 1.0  # constant column: centred, not divided by zero


def test_only_head_parameters_receive_gradients():
    split = correlated_split(64, 12, 8, captions_per_image=2)
    hi, ht = build_head("mlp", 12, 8), build_head("mlp", 8, 8)
    fit_input_stats(hi, [split.image_features])
    fit_input_stats(ht, [split.caption_features])
    loss_fn = build_loss("infonce")
    groups = param_groups([hi, ht], loss_fn, weight_decay=0.1, lr=1e-3)
    optimised = {id(p) for g in groups for p in g["params"]}
    trainable = {id(p) for m in (hi, ht, loss_fn) for p in m.parameters()}
    assert optimised == trainable  # nothing else is stepped
    frozen = {k: v.clone() for k, v in hi.state_dict().items() if "norm_in" in k}

    batch = next(iter_batches(MemorySource(split).block, 32, torch.Generator().manual_seed(0)))
    images, texts = batch.images.clone(), batch.texts.clone()
    loss = loss_fn(hi(images), ht(texts), batch.positives)
    loss.backward()
    assert images.grad is None and texts.grad is None  # cached features are constants
    for m in (hi, ht):
        for name, p in m.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        assert all(b.grad is None for b in m.buffers())
    torch.optim.AdamW([p for g in groups for p in g["params"]], lr=0.1).step()
    for k, v in hi.state_dict().items():
        if "norm_in" in k:
            assert torch.equal(v, frozen[k])  # standardisation is a buffer, never trained


@pytest.mark.parametrize("ema", [0.0, 0.9])
def test_resume_reproduces_uninterrupted_run_bit_for_bit(features, tmp_path, ema):
    # mlp with dropout, views and concept texts: every random draw the loop makes is exercised;
    # with ema the weight averages must come back too
    kw = dict(epochs=4, augment="concepts", patience=10, ema=ema, keep_last=True)
    straight = train(small(features, tmp_path / "straight", **kw), progress=False)
    first = train(small(features, tmp_path / "resumed", **kw), stop_after_epoch=2, progress=False)
    assert first["epochs_run"] == 2
    resumed = train(small(features, tmp_path / "resumed", **kw), resume=True, progress=False)
    assert resumed["epochs_run"] == 4
    for name in ("best.safetensors", "last.safetensors"):
        a, b = load_file(str(tmp_path / "straight" / name)), load_file(str(tmp_path / "resumed" / name))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
    rows = lambda d: [{k: v for k, v in json.loads(x).items() if "seconds" not in k and k != "elapsed"}  # noqa: E731
                      for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
    assert rows("straight") == rows("resumed")
    assert straight["valid"] == resumed["valid"]


def test_resume_refuses_changed_settings_and_fresh_run_refuses_existing(features, tmp_path):
    train(small(features, tmp_path / "r", epochs=1), progress=False)
    with pytest.raises(FileExistsError, match="--resume"):
        train(small(features, tmp_path / "r", epochs=1), progress=False)
    with pytest.raises(ValueError, match="lr"):
        train(small(features, tmp_path / "r", epochs=2, lr=0.5), resume=True, progress=False)


@pytest.mark.parametrize("head", ["linear", "mlp", "residual", "cca"])
def test_every_head_saves_and_loads_the_same_way(features, tmp_path, head):
    summary = train(small(features, tmp_path / head, head=head, epochs=3), progress=False)
    run = load_adapter_run(tmp_path / head)
    assert run.config["head"] == head and run.features_dir == features.resolve()
    keys = load_file(str(tmp_path / head / "best.safetensors")).keys()
    assert all(k.startswith(("image_head.", "text_head.")) for k in keys)
    valid = load_split(features / split_file("valid"))
    img, txt = run.embed_images(valid.image_features), run.embed_texts(valid.caption_features)
    # the default ensemble: 4 heads' unit embeddings side by side, each scaled by 1/2, so a cosine
    # of two joint embeddings is the mean of the members' cosines (a closed-form cca head is one)
    members = 1 if head == "cca" else 4
    assert run.config["ensemble"] == members
    assert img.dtype == torch.float32 and img.shape == (valid.n_images, 16 * members)
    assert torch.allclose(img.norm(dim=1), torch.ones(valid.n_images), atol=1e-5)
    again = recall_summary(img, txt, valid.caption_image)
    # the loaded heads reproduce the validation numbers of the saved best epoch
    for k, v in summary["valid"].items():
        assert again[k] == pytest.approx(v, abs=1e-6), k
    chance = 100 * 10 / valid.n_images
    assert again["t2i_R@10"] > 3 * chance and again["i2t_R@10"] > 3 * chance


def test_cca_beats_chance_on_correlated_data():
    train_split = correlated_split(300, 40, 24, noise=1.0, seed=0)
    valid = correlated_split(150, 40, 24, noise=1.0, seed=1, split="valid")
    hi, ht = fit_closed_form(train_split, dim=8)
    r = recall_summary(hi(valid.image_features), ht(valid.caption_features), valid.caption_image)
    chance = 100 * 10 / 150
    assert r["t2i_R@10"] > 4 * chance and r["i2t_R@10"] > 4 * chance
    # and on unrelated features it stays near chance: the score comes from the pairing, not the fit
    shuffled = correlated_split(150, 40, 24, noise=1.0, seed=2, split="valid")
    r0 = recall_summary(hi(valid.image_features), ht(shuffled.caption_features), valid.caption_image)
    assert r0["t2i_R@10"] < 2 * chance


def test_cca_dimensions_beyond_rank_are_zero_padded():
    split = correlated_split(100, 10, 6)
    hi, ht = fit_closed_form(split, dim=12)
    assert hi(split.image_features).shape == (100, 12)
    assert torch.all(ht.weight[:, 6:] == 0)


def test_ensemble_cosine_is_mean_of_member_cosines():
    torch.manual_seed(0)
    members = [build_head("linear", 6, 4) for _ in range(3)]
    ens = EnsembleHead(members)
    a, b = torch.randn(5, 6), torch.randn(5, 6)
    cos = (ens(a) * ens(b)).sum(1)
    ref = torch.stack([torch.cosine_similarity(m(a), m(b)) for m in members]).mean(0)
    assert torch.allclose(cos, ref, atol=1e-6)


def test_streamed_training_matches_in_memory_quality(features, tmp_path, monkeypatch):
    import medembed.adapt.memory as memory

    # as if each caption took 10 MB in memory: the 480 captions do not fit 2 GiB, streamed they do
    monkeypatch.setattr(memory, "CAPTION_TEXT_BYTES", 10 << 20)
    s = train(small(features, tmp_path / "stream", max_memory_gb=2.0, chunk_rows=64, epochs=3, augment="concepts"),
              progress=False)
    assert s["memory"]["streamed"] and s["memory"]["chunk_rows"] == 64
    chance = 100 * 10 / 120
    assert s["valid"]["t2i_R@10"] > 3 * chance and s["valid"]["i2t_R@10"] > 3 * chance
    # 480 captions plus concept pairs at concept_ratio 0.5 (capped by how many labelled pairs exist)
    labels = load_split(features / split_file("train")).concepts
    assert s["n_train_pairs"] == 480 + min(labels.nnz, 240)


def test_cli_adapt_prints_table_and_resumes(features, tmp_path):
    from medembed.cli import main

    out = tmp_path / "cli_run"
    args = ["adapt", "--features", str(features), "--head", "linear", "--epochs", "2", "--dim", "8", "--out", str(out)]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "best epoch" in res.output and "i2t R@10" in res.output
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    res = CliRunner().invoke(main, ["adapt", "--out", str(out), "--resume", "--epochs", "3"])
    assert res.exit_code == 1 and "--keep-last to extend a finished run" in res.output  # last.safetensors is gone
    res = CliRunner().invoke(main, [*args[:-2], "--keep-last", "--out", str(tmp_path / "kept")])
    assert res.exit_code == 0, res.output
    out = tmp_path / "kept"
    res = CliRunner().invoke(main, ["adapt", "--out", str(out), "--resume", "--epochs", "3"])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "config.json").read_text())["epochs"] == 3
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3
    res = CliRunner().invoke(main, ["adapt", "--features", str(features), "--out", str(out)])
    assert res.exit_code != 0 and "already holds a run" in res.output
    res = CliRunner().invoke(main, ["adapt", "--features", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")])
    assert res.exit_code != 0 and "no such features folder" in res.output
    assert math.isfinite(json.loads((out / "summary.json").read_text())["valid"]["mean_recall"])


def test_ema_validates_and_saves_the_averaged_heads(features, tmp_path):
    summary = train(small(features, tmp_path / "ema", epochs=2, patience=10, ema=0.5, keep_last=True), progress=False)
    last = load_file(str(tmp_path / "ema" / "last.safetensors"))
    best = load_file(str(tmp_path / "ema" / "best.safetensors"))
    averaged = {k[len("ema_image_head.module."):]: v for k, v in last.items() if k.startswith("ema_image_head.module.")}
    raw = {k[len("image_head."):]: v for k, v in last.items() if k.startswith("image_head.")}
    assert averaged.keys() == raw.keys()
    assert any(not torch.equal(averaged[k], raw[k]) for k in raw)  # an average, not a copy of the last step
    if summary["best_epoch"] == 2:
        assert all(torch.equal(best[f"image_head.{k}"], v) for k, v in averaged.items())
    run = load_adapter_run(tmp_path / "ema")
    valid = load_split(features / split_file("valid"))
    again = recall_summary(run.embed_images(valid.image_features), run.embed_texts(valid.caption_features),
                           valid.caption_image)
    assert again["mean_recall"] == pytest.approx(summary["valid"]["mean_recall"], abs=1e-6)
