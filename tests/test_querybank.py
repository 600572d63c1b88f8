"""Query-bank normalisation: hand-computed hubness and corrected ranks, the choice on valid, and
search, the search index and eval ranking with the same setting."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from medembed.adapt.config import AdaptConfig
from medembed.adapt.run import QUERYBANK, load_adapter_run
from medembed.adapt.run_querybank import BANK_ROWS, BankOffsets, bank_features, bank_offsets
from medembed.adapt.trainer import train
from medembed.cache.reader import load_split
from medembed.cache.schema import split_file
from medembed.common.querybank import BankSide, QueryBank, bank_sample, choose, hubness
from medembed.common.ranking import retrieval_ranks
from medembed.common.tensors import unit
from medembed.evaluate.pipeline import EvalOptions, run_eval
from medembed.serve.index import IndexOptions, StaleIndexError, build_index, load_index
from medembed.serve.search import Searcher
from tests.synthetic_features import write_synthetic_features


def test_hubness_and_corrected_ranks_by_hand():
    gallery = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    bank = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    h = hubness(gallery, bank, (1, 2, 10))
    # cosines to the bank: image 0 [1, .8, 0], image 1 [0, .6, 1]; k = 10 is capped at the 3 bank rows
    assert h[1].tolist() == pytest.approx([1.0, 1.0])
    assert h[2].tolist() == pytest.approx([0.9, 0.8])
    assert h[10].tolist() == pytest.approx([1.8 / 3, 1.6 / 3])
    # a caption exactly between the two images: a tie under plain cosine (ties count against the query,
    # so both captions rank 2); with beta 0.5 the less hubby image 1 scores .7071 - .40 > .7071 - .45
    s = math.sqrt(0.5)
    captions = torch.tensor([[s, s], [s, s]])
    caption_image = torch.tensor([0, 1])
    t2i, _ = retrieval_ranks(gallery, captions, caption_image)
    assert t2i.tolist() == [2, 2]
    t2i, _ = retrieval_ranks(gallery, captions, caption_image, image_offset=-0.5 * h[2])
    assert t2i.tolist() == [2, 1]


def test_offset_ranks_equal_a_brute_force_ranking():
    g = torch.Generator().manual_seed(0)
    images, captions = unit(torch.randn(37, 6, generator=g)), unit(torch.randn(74, 6, generator=g))
    caption_image = torch.randperm(74, generator=g) % 37
    image_offset, caption_offset = 0.3 * torch.randn(37, generator=g), 0.3 * torch.randn(74, generator=g)
    t2i, i2t = retrieval_ranks(images, captions, caption_image, chunk=8, image_offset=image_offset,
                               caption_offset=caption_offset)
    scores_t = captions @ images.T + image_offset  # [M, N] what a text query ranks images by
    want_t2i = [(scores_t[c] >= scores_t[c, caption_image[c]]).sum().item() for c in range(74)]
    scores_i = images @ captions.T + caption_offset  # [N, M]
    want_i2t = []
    for r in range(37):
        own = caption_image == r
        best = scores_i[r, own].max()
        want_i2t.append(int((scores_i[r] >= best).sum() - (scores_i[r, own] >= best).sum() + 1))
    assert t2i.tolist() == want_t2i and i2t.tolist() == want_i2t


def _crowded_split(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images crowded around one direction with noisy captions: the geometry where some items sit
    near very many queries (hubs) and a bank-discounted score ranks better."""
    g = torch.Generator().manual_seed(seed)
    u = torch.zeros(16)
    u[0] = 1
    images = unit(3 * u + torch.randn(n, 16, generator=g) / 4)
    captions = unit(images + 0.1 * torch.randn(n, 16, generator=g))
    return images, captions


def test_choice_on_valid_raises_recall_and_never_lowers_it():
    bank_img, bank_txt = _crowded_split(300, 1)
    img, txt = _crowded_split(120, 2)
    setting, plain, after = choose(img, txt, torch.arange(120), bank_img, bank_txt)
    assert setting.images == BankSide(10, 0.25) and setting.captions == BankSide(10, 0.75)
    assert after["t2i_R@1"] == pytest.approx(100 * 70 / 120) and plain["t2i_R@1"] == pytest.approx(100 * 65 / 120)
    assert after["mean_recall"] > plain["mean_recall"] + 5
    # with beta 0 in the grid, a side is kept only where it raises that direction's valid recall
    for d, side in (("t2i", setting.images), ("i2t", setting.captions)):
        gain = sum(after[f"{d}_R@{k}"] - plain[f"{d}_R@{k}"] for k in (1, 5, 10))
        assert gain > 0 if side.active else gain == 0
    assert QueryBank.from_dict(json.loads(json.dumps(setting.to_dict()))) == setting
    # spread-out data with clean captions: nothing to correct, plain cosine kept
    g = torch.Generator().manual_seed(3)
    spread = unit(torch.randn(60, 16, generator=g))
    setting, plain, after = choose(spread, spread, torch.arange(60), spread, spread)
    assert not setting.active and after == plain


@pytest.fixture(scope="module")
def bank_run(tmp_path_factory) -> Path:
    """A trained run on a synthetic cache whose query bank is set to discount both galleries."""
    root = tmp_path_factory.mktemp("querybank")
    features = write_synthetic_features(root / "features", n_train=160, n_eval=60, captions_per_image=2)
    summary = train(AdaptConfig(features_dir=str(features), out=str(root / "run"), head="linear", dim=16, epochs=3,
                                ensemble=1, refit=False), progress=False)
    chosen = json.loads((root / "run" / QUERYBANK).read_text())
    assert summary["querybank"]["setting"] == chosen["setting"]
    # eval of the valid split ranks exactly as the choice measured it, with and without the bank
    valid = run_eval([root / "run"], split="valid", out_dir=root / "eval-valid", options=EvalOptions(
        closed_form=False, examples=0, progress=False, sections=("retrieval",)))["metrics"]
    for k, v in chosen["valid"].items():
        if k != "mean_recall":
            assert valid[k] == pytest.approx(v, abs=1e-4), k
            assert valid.get(f"cosine_{k}", valid[k]) == pytest.approx(chosen["valid_plain"][k], abs=1e-4), k
    # whatever valid chose, set a strong correction of both sides so the checks below see it act
    forced = QueryBank(BankSide(5, 1.0), BankSide(5, 1.0), "train", str(features.resolve()))
    (root / "run" / QUERYBANK).write_text(json.dumps({**chosen, "setting": forced.to_dict()}))
    # what search and eval add to the cosines is the formula: -beta x mean of the k best bank cosines
    run = load_adapter_run(root / "run")
    bank, test = load_split(features / split_file("train")), load_split(features / split_file("test"))
    img, txt = run.embed_images(test.image_features), run.embed_texts(test.caption_features)
    bank_img, bank_txt = run.embed_images(bank.image_features), run.embed_texts(bank.caption_features)
    want_img = -(img @ bank_txt.T).topk(5, dim=1).values.mean(1)
    want_cap = -(txt @ bank_img.T).topk(5, dim=1).values.mean(1)
    got_img, got_cap = bank_offsets(run)(img, txt)
    torch.testing.assert_close(got_img, want_img, atol=1e-5, rtol=0)
    torch.testing.assert_close(got_cap, want_cap, atol=1e-5, rtol=0)
    return root / "run"


def test_search_and_index_rank_as_eval_does(bank_run, tmp_path):
    run = load_adapter_run(bank_run)
    test = load_split(run.features_dir / split_file("test"))
    result = run_eval([bank_run], split="test", out_dir=tmp_path / "eval", options=EvalOptions(
        closed_form=False, examples=0, progress=False, sections=("retrieval",)))
    metrics = result["metrics"]
    assert any(abs(metrics[f"{d}_R@{k}"] - metrics[f"cosine_{d}_R@{k}"]) > 0 for d in ("t2i", "i2t") for k in (1, 5))
    searcher = Searcher(bank_run, "test", use_index=False)
    queries = run.embed_texts(test.caption_features)
    ranks = []
    for c in range(test.n_captions):
        hits = searcher.images(queries[c][None], k=test.n_images).hits
        ranks.append(1 + next(i for i, h in enumerate(hits) if h.image_row == int(test.caption_image[c])))
    t2i_r1 = 100 * np.mean(np.array(ranks) <= 1)
    t2i_r5 = 100 * np.mean(np.array(ranks) <= 5)
    assert (t2i_r1, t2i_r5) == (pytest.approx(metrics["t2i_R@1"]), pytest.approx(metrics["t2i_R@5"]))
    # the index holds the offsets as one more coordinate: the same hits and scores as the exact scan
    _, meta = build_index(bank_run, IndexOptions(split="test", kind="flat"))
    assert meta.dim == run.dim + 1 and meta.querybank["images"] == {"k": 5, "beta": 1.0}
    indexed = Searcher(bank_run, "test")
    for c in (0, 7, 19):
        exact, via_index = searcher.images(queries[c][None], k=10), indexed.images(queries[c][None], k=10)
        assert via_index.via == "flat index"
        assert [h.image_row for h in via_index.hits] == [h.image_row for h in exact.hits]
        assert [h.score for h in via_index.hits] == pytest.approx([h.score for h in exact.hits], abs=1e-5)
    # an image query ranks images by plain cosine on both paths
    image_query = run.embed_images(test.image_features[:1])
    plain = (run.embed_images(test.image_features) @ image_query[0]).topk(5).indices.tolist()
    assert [h.image_row for h in searcher.images(image_query, 5, by="image").hits] == plain
    assert [h.image_row for h in indexed.images(image_query, 5, by="image").hits] == plain
    # a changed setting makes the index stale
    record = json.loads((bank_run / QUERYBANK).read_text())
    record["setting"]["images"]["beta"] = 0.5
    (bank_run / QUERYBANK).write_text(json.dumps(record))
    with pytest.raises(StaleIndexError, match="query bank"):
        load_index(bank_run, "test", "flat")


def test_no_querybank_ranks_by_plain_cosine(tmp_path):
    features = write_synthetic_features(tmp_path / "features", n_train=80, n_eval=30)
    summary = train(AdaptConfig(features_dir=str(features), out=str(tmp_path / "run"), head="linear", dim=8, epochs=1,
                                ensemble=1, querybank=False), progress=False)
    assert "querybank" not in summary and not (tmp_path / "run" / QUERYBANK).exists()
    assert load_adapter_run(tmp_path / "run").querybank is None
    result = run_eval([tmp_path / "run"], split="test", out_dir=tmp_path / "eval", options=EvalOptions(
        closed_form=False, examples=0, progress=False, sections=("retrieval",)))
    assert not any(k.startswith("cosine_") for k in result["metrics"])


def test_export_carries_the_offsets_search_ranks_with(bank_run, tmp_path):
    pytest.importorskip("pyarrow", reason="parquet files need pyarrow")
    import pandas as pd

    from medembed.serve.export import ExportOptions, export_embeddings

    summary = export_embeddings(bank_run, ExportOptions(split="test", out=str(tmp_path / "export")))
    manifest = json.loads((Path(summary.out) / "export.json").read_text())
    assert manifest["querybank"] == load_adapter_run(bank_run).querybank.to_dict()
    meta = pd.read_parquet(Path(summary.out) / "metadata" / "metadata_0.parquet")
    searcher = Searcher(bank_run, "test", use_index=False)
    np.testing.assert_allclose(meta["image_offset"].to_numpy(), searcher.image_offsets.numpy(), atol=1e-6)
    first = meta["caption_row"].to_numpy()
    np.testing.assert_allclose(meta["caption_offset"].to_numpy(), searcher.caption_offsets[torch.from_numpy(first.copy())].numpy(), atol=1e-6)


def test_a_foreign_pool_ranks_with_its_own_bank_or_plain_cosine(bank_run, tmp_path):
    from medembed.adapt.run_querybank import bank_for
    from medembed.common.ranking import ranks
    from medembed.model.embedding import model_from_run

    run = load_adapter_run(bank_run)
    own, own_ranking = bank_for(run.with_features(run.features_dir))  # its own cache, found again: its own bank
    assert own.setting == run.querybank and own_ranking.endswith("chosen on valid")

    # another dataset with train, valid and test: its train split is the bank, k/beta chosen on its valid
    other = write_synthetic_features(tmp_path / "other", n_train=150, n_eval=50, captions_per_image=2, noise=0.8,
                                     latent=8)
    pointed = run.with_features(other)
    offsets, ranking = bank_for(pointed)
    train, valid, test = (load_split(other / split_file(s)) for s in ("train", "valid", "test"))
    bank_img, bank_txt = run.embed_images(train.image_features), run.embed_texts(train.caption_features)
    want, _, _ = choose(run.embed_images(valid.image_features), run.embed_texts(valid.caption_features),
                        valid.caption_image, bank_img, bank_txt, bank_features=str(other.resolve()),
                        bank_rows=BANK_ROWS)
    assert want.active, "the synthetic pool should profit from a bank; the check below needs one"
    assert offsets.setting == want and "from the pool's own dataset" in ranking
    assert model_from_run(pointed).ranking == ranking
    # its ranks, checked against a brute-force sort of cosine - beta x hubness against that train bank
    img, txt = run.embed_images(test.image_features), run.embed_texts(test.caption_features)
    img_off, cap_off = offsets(img, txt)
    got = ranks(img, txt, test.caption_image, image_offset=img_off, caption_offset=cap_off)
    hub = (img @ bank_txt.T).topk(want.images.k, dim=1).values.mean(1) if want.images.active else torch.zeros(len(img))
    scores = (txt @ img.T - want.images.beta * hub).numpy()
    brute = [int((scores[q] >= scores[q, test.caption_image[q]]).sum()) for q in range(len(txt))]  # ties: against
    assert got.t2i.tolist() == brute

    # a dataset with no train or valid split of its own: plain cosine, said so
    lone = tmp_path / "lone"
    lone.mkdir()
    (other / split_file("test")).rename(lone / split_file("test"))
    offsets, ranking = bank_for(run.with_features(lone))
    assert offsets is None and ranking.startswith("plain cosine (the pool's dataset has no train and valid split")


def test_a_large_bank_is_a_seeded_sample_read_row_by_row(bank_run, tmp_path):
    """Beyond `bank_rows` per side the bank is a fixed sample: the same rows whether the split is in
    memory (after training) or read from its file (search, index), and only those rows are read."""
    run = load_adapter_run(bank_run)
    path = run.split_files()["train"]
    whole = load_split(path, with_views=False)
    assert whole.n_images > 64 and whole.n_captions > 64
    rows_img, rows_cap = bank_sample(whole.n_images, 64), bank_sample(whole.n_captions, 64)
    assert len(rows_img) == 64 and np.all(np.diff(rows_img) > 0) and rows_img.max() < whole.n_images
    assert np.array_equal(rows_img, bank_sample(whole.n_images, 64))  # seeded: every caller draws the same
    assert bank_sample(whole.n_images, whole.n_images) is None and bank_sample(whole.n_images, 0) is None
    from_file, in_memory = bank_features(path, 64), bank_features(whole, 64)
    for got, mem, full, rows in zip(from_file, in_memory, (whole.image_features, whole.caption_features),
                                    (rows_img, rows_cap)):
        assert torch.equal(got, mem) and torch.equal(got, full[torch.from_numpy(rows)].float())
    # a setting recording 64 rows ranks against exactly those rows' embeddings
    setting = QueryBank(BankSide(10, 0.5), BankSide(10, 0.5), "train", str(Path(run.features_dir).resolve()), 64)
    offsets = BankOffsets(run, setting)
    assert torch.equal(offsets.bank_captions(), run.embed_texts(from_file[1]))
    assert torch.equal(offsets.bank_images(), run.embed_images(from_file[0]))
    img = run.embed_images(whole.image_features[:20])
    want = -0.5 * (img @ run.embed_texts(from_file[1]).T).topk(10, dim=1).values.mean(1)
    assert torch.allclose(offsets.images(img), want, atol=1e-6)
    assert QueryBank.from_dict(setting.to_dict()) == setting
    assert QueryBank.from_dict({k: v for k, v in setting.to_dict().items() if k != "bank_rows"}).bank_rows == 0
