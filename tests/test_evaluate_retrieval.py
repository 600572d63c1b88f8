"""Retrieval metrics against hand-computed ranks: several captions per image, ties, K beyond the pool,
and chance levels checked against an exhaustive enumeration of random orders."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from medembed.common import ranking
from medembed.evaluate import retrieval

# images I0=(1,0), I1=(0,1), I2=(.6,.8); captions t0,t1 -> I0, t2 -> I1, t3 -> I2
IMAGES = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
TEXTS = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6], [0.6, 0.8]])
CAPTION_IMAGE = torch.tensor([0, 0, 1, 2])


def test_ranks_with_several_captions_per_image():
    r = ranking.ranks(IMAGES, TEXTS, CAPTION_IMAGE)
    # t0: own I0 scores 1 (best) -> 1; t1: own I0 scores 0, I1=1 and I2=.8 above -> 3;
    # t2: own I1 scores .6, I0=.8 and I2=.96 above -> 3; t3: own I2 scores 1 -> 1
    assert r.t2i.tolist() == [1, 3, 3, 1]
    # I0: best own caption t0 scores 1 -> 1; I1: own t2 scores .6, t1=1 and t3=.8 above -> 3; I2: t3 -> 1
    assert r.i2t.tolist() == [1, 3, 1]
    m = ranking.summarize(r, ks=(1, 2, 5))
    assert m["t2i_R@1"] == pytest.approx(50.0)
    assert m["t2i_R@2"] == pytest.approx(50.0)
    assert m["i2t_R@1"] == pytest.approx(200 / 3)
    assert m["i2t_R@5"] == pytest.approx(100.0)
    assert m["t2i_meanr"] == pytest.approx(2.0)
    assert m["i2t_meanr"] == pytest.approx(5 / 3)
    assert m["i2t_medr"] == 1.0
    assert (m["pool_images"], m["pool_captions"]) == (3, 4)


def test_ties_count_against_the_query():
    same_images = torch.ones(3, 2)
    same_texts = torch.ones(4, 2)
    r = ranking.ranks(same_images, same_texts, CAPTION_IMAGE)
    assert r.t2i.tolist() == [3, 3, 3, 3]  # every image ties with the own one: last place
    # I0 has 2 captions, ties with the 2 others -> rank 3; I1, I2 tie with 3 negatives -> rank 4
    assert r.i2t.tolist() == [3, 4, 4]
    m = ranking.summarize(r, ks=(1,))
    assert m["t2i_R@1"] == 0.0 and m["i2t_R@1"] == 0.0


def test_k_larger_than_pool_and_an_uncaptioned_image():
    m = retrieval.compute(IMAGES, TEXTS, CAPTION_IMAGE, ks=(10, 1000))
    assert m["t2i_R@10"] == 100.0 and m["i2t_R@1000"] == 100.0
    # I2 has no caption: no K retrieves it, its rank is pool + 1
    r = ranking.ranks(IMAGES, TEXTS[:3], CAPTION_IMAGE[:3])
    assert r.i2t.tolist()[2] == 4
    assert ranking.summarize(r, ks=(3, 100))["i2t_R@100"] == pytest.approx(200 / 3)
    assert retrieval.chance(CAPTION_IMAGE[:3], 3, ks=(100,))["i2t_R@100"] == pytest.approx(200 / 3)


def test_caption_rows_outside_the_pool_are_rejected():
    with pytest.raises(ValueError, match="outside the 3 images"):
        ranking.ranks(IMAGES, TEXTS, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="3 rows but there are 4"):
        ranking.ranks(IMAGES, TEXTS, torch.tensor([0, 1, 2]))


def test_small_memory_budget_gives_identical_ranks():
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(300, 8, generator=g), torch.randn(600, 8, generator=g)
    rows = torch.arange(600) % 300
    big = ranking.ranks(img, txt, rows, memory_mb=512)
    tiny = ranking.ranks(img, txt, rows, memory_mb=0.01)  # 16-row chunks
    assert ranking.chunk_rows(600, 0.01) == 16
    assert torch.equal(big.t2i, tiny.t2i) and torch.equal(big.i2t, tiny.i2t)


def _enumerated_i2t(counts: list[int], ks: list[int]) -> tuple[dict[int, float], float, float]:
    """Exact chance by listing every order of the captions: P(hit@K), median and mean rank."""
    m = sum(counts)
    owner = [i for i, c in enumerate(counts) for _ in range(c)]
    ranks = []
    for perm in itertools.permutations(range(m)):
        for image in range(len(counts)):
            ranks.append(next(pos + 1 for pos, cap in enumerate(perm) if owner[cap] == image))
    ranks = np.array(ranks)
    hit = {k: float((ranks <= k).mean()) for k in ks}
    median = min(r for r in range(1, m + 1) if (ranks <= r).mean() >= 0.5)
    return hit, float(median), float(ranks.mean())


def test_chance_matches_exhaustive_enumeration():
    counts = [2, 1, 1, 1]  # 5 captions, the first image has two
    caption_image = torch.tensor([0, 0, 1, 2, 3])
    ks = [1, 2, 3, 10]
    c = retrieval.chance(caption_image, 4, ks)
    hit, median, mean = _enumerated_i2t(counts, ks)
    for k in ks:
        assert c[f"i2t_R@{k}"] == pytest.approx(100 * hit[k])
    assert c["i2t_medr"] == median
    assert c["i2t_meanr"] == pytest.approx(mean)
    # text -> image: the own image is uniform over 4
    assert [c[f"t2i_R@{k}"] for k in ks] == pytest.approx([25.0, 50.0, 75.0, 100.0])
    assert c["t2i_medr"] == 2.0 and c["t2i_meanr"] == 2.5


def test_chance_hand_values():
    # image with 2 of 4 captions: P(hit@1) = 2/4, P(hit@2) = 1 - C(2,2)/C(4,2) = 5/6
    c = retrieval.chance(torch.tensor([0, 0, 1, 1]), 2, [1, 2])
    assert c["i2t_R@1"] == pytest.approx(50.0)
    assert c["i2t_R@2"] == pytest.approx(100 * 5 / 6)
    assert c["i2t_meanr"] == pytest.approx(5 / 3)  # (M+1)/(c+1)
    # an image without captions is never found
    c = retrieval.chance(torch.tensor([0, 0]), 2, [1])
    assert c["i2t_R@1"] == pytest.approx(50.0)
    assert c["i2t_meanr"] == pytest.approx((1.0 + 3.0) / 2)


def test_top_k_streams_over_pool_blocks():
    g = torch.Generator().manual_seed(1)
    pool, queries = torch.randn(5000, 8, generator=g), torch.randn(3, 8, generator=g)
    scores, rows = ranking.top_k(queries, pool, 7, memory_mb=0.001)  # 1024-row blocks
    full = (queries @ pool.T).topk(7, dim=1)
    assert torch.equal(rows, full.indices)
    assert torch.allclose(scores, full.values)
    scores, rows = ranking.top_k(queries, pool[:4], 10)  # k capped at the pool
    assert rows.shape == (3, 4)


def test_recall_curve_is_monotone_and_reaches_100():
    r = ranking.ranks(IMAGES, TEXTS, CAPTION_IMAGE)
    curve = retrieval.recall_curve(r.t2i, [1, 2, 3, 4], r.pool_images)
    assert curve == pytest.approx([50.0, 50.0, 100.0, 100.0])
    assert math.isclose(curve[-1], 100.0)


def _noisy_pair(n: int, captions_per_image: int = 1, noise: float = 1.5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(n, 32, generator=g)
    caption_image = torch.arange(n).repeat_interleave(captions_per_image)
    txt = img[caption_image] + noise * torch.randn(len(caption_image), 32, generator=g)
    return torch.nn.functional.normalize(img, dim=1), torch.nn.functional.normalize(txt, dim=1), caption_image


def _brute_ranks(img: torch.Tensor, txt: torch.Tensor, caption_image: torch.Tensor):
    """1-based ranks by sorting every score row (ties against the query), independently of the library."""
    s = (txt @ img.T).numpy()
    t2i = np.array([1 + (s[q] >= s[q, caption_image[q]]).sum() - 1 for q in range(len(txt))])
    own = {i: np.nonzero(caption_image.numpy() == i)[0] for i in range(img.shape[0])}
    i2t = np.array([min(1 + (s[:, i] >= s[c, i]).sum() - 1 for c in own[i]) for i in range(img.shape[0])])
    return t2i, i2t


def test_recall_at_a_share_of_a_2000_pool_is_recall_at_10_and_20():
    img, txt, caption_image = _noisy_pair(2000)
    r = ranking.ranks(img, txt, caption_image)
    at_k = ranking.summarize(r, ks=(10, 20))
    shares = retrieval.fraction_recalls(r)
    t2i, i2t = _brute_ranks(img, txt, caption_image)
    assert 5 < shares["t2i_R@0.5%"] < 95  # a real ranking, neither trivial nor hopeless
    assert shares["t2i_R@0.5%"] == at_k["t2i_R@10"] == pytest.approx(100 * (t2i <= 10).mean())
    assert shares["t2i_R@1%"] == at_k["t2i_R@20"] == pytest.approx(100 * (t2i <= 20).mean())
    assert shares["i2t_R@0.5%"] == at_k["i2t_R@10"] == pytest.approx(100 * (i2t <= 10).mean())
    assert shares["i2t_R@1%"] == at_k["i2t_R@20"]
    chance = retrieval.chance_at_fractions(caption_image, 2000)
    assert chance["t2i_R@0.5%"] == pytest.approx(0.5) and chance["t2i_R@1%"] == pytest.approx(1.0)


def test_recall_at_a_share_between_whole_ks_is_linear():
    img, txt, caption_image = _noisy_pair(454, captions_per_image=2, noise=1.2)
    r = ranking.ranks(img, txt, caption_image)
    t2i, i2t = _brute_ranks(img, txt, caption_image)
    shares = retrieval.fraction_recalls(r)
    k = 0.005 * 454  # 2.27 of the images
    want = 100 * ((t2i <= 2).mean() + (k - 2) * ((t2i <= 3).mean() - (t2i <= 2).mean()))
    assert shares["t2i_R@0.5%"] == pytest.approx(want)
    k = 0.01 * 908  # i2t ranks among the 908 captions: 9.08
    want = 100 * ((i2t <= 9).mean() + (k - 9) * ((i2t <= 10).mean() - (i2t <= 9).mean()))
    assert shares["i2t_R@1%"] == pytest.approx(want)


def test_a_pool_above_2000_is_also_scored_on_2000_item_subsets():
    img, txt, caption_image = _noisy_pair(2600, captions_per_image=2)
    assert retrieval.subset_recalls(img[:2000], txt[:4000], caption_image[:4000], (10,)) == {}  # not above 2,000
    got = retrieval.subset_recalls(img, txt, caption_image, (1, 10), draws=4)
    # by hand: the same four subsets, each ranked on its own by brute force
    gen = torch.Generator().manual_seed(0)
    values = []
    for _ in range(4):
        keep = torch.randperm(2600, generator=gen)[:2000].sort().values
        new = torch.full((2600,), -1)
        new[keep] = torch.arange(2000)
        rows = (new[caption_image] >= 0).nonzero().squeeze(1)
        t2i, _ = _brute_ranks(img[keep], txt[rows], new[caption_image[rows]])
        values.append(100 * (t2i <= 10).mean())
    assert got["t2i_R@10_of2000"] == pytest.approx(np.mean(values))
    assert got["t2i_R@10_of2000_std"] == pytest.approx(np.std(values, ddof=1), rel=1e-4) and got["t2i_R@10_of2000_std"] > 0
    assert got["t2i_R@0.5%_of2000"] == pytest.approx(got["t2i_R@10_of2000"])  # on 2,000 items: the same K
    whole = ranking.summarize(ranking.ranks(img, txt, caption_image), ks=(10,))["t2i_R@10"]
    assert got["t2i_R@10_of2000"] > whole  # a smaller pool is easier at the same K
