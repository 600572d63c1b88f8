"""Batches: which texts count as positives of which images, views, concept texts, streaming."""
import numpy as np
import scipy.sparse as sp
import torch

from medembed.adapt.data import (
    Block,
    ConceptTexts,
    MemorySource,
    StreamSource,
    caption_keys,
    caption_neighbours,
    hard_negative_order,
    iter_batches,
    read_concepts,
)
from medembed.cache.schema import split_file
from tests.synthetic_features import correlated_split, write_cache


def _block(captions, caption_image, n_images=3, views=None):
    # caption k's feature is (k, 0): lets a test recover which caption landed where in a shuffled batch
    feats = torch.stack([torch.tensor([float(k), 0.0]) for k in range(len(captions))])
    images = torch.stack([torch.tensor([float(i), 1.0]) for i in range(n_images)])
    return Block(images, views, feats, torch.tensor(caption_image), caption_keys(captions), torch.arange(n_images))


def test_caption_keys_fold_case_and_spaces():
    k = caption_keys(["Axial CT.", "axial  ct.", "Chest X-ray", " AXIAL CT. "]).tolist()
    assert k[0] == k[1] == k[3] and k[2] != k[0]
    # chunk by chunk (a streamed split) gives the same keys as all at once
    many = [f"caption {i % 97}" for i in range(1000)]
    assert torch.equal(torch.cat([caption_keys(many[s : s + 64]) for s in range(0, 1000, 64)]), caption_keys(many))
    assert len(set(caption_keys(many).tolist())) == 97


def test_positives_cover_same_image_and_identical_captions():
    captions = ["left lung mass", "mass in the left lung", "Axial CT.", "axial ct."]
    block = _block(captions, [0, 0, 1, 2])
    # by hand, indexed by caption: 0,1 share image 0; 2,3 are the same words under images 1 and 2
    expected = torch.tensor([
        [1, 1, 0, 0],
        [1, 1, 0, 0],
        [0, 0, 1, 1],
        [0, 0, 1, 1],
    ], dtype=torch.bool)
    (batch,) = list(iter_batches(block, 4, torch.Generator().manual_seed(3)))
    order = batch.texts[:, 0].long()  # caption index of each batch row
    assert sorted(order.tolist()) == [0, 1, 2, 3]
    assert torch.equal(batch.positives, expected[order][:, order])
    assert torch.equal(batch.images[:, 0].long(), torch.tensor([0, 0, 1, 2])[order])


def test_concept_texts_are_positives_for_every_image_labelled_with_them():
    labels = sp.csr_matrix(np.array([[1, 0], [1, 1], [0, 0]], dtype=np.float32))  # concept 0 on images 0,1
    ctf = torch.tensor([[[10.0, 0.0]], [[20.0, 0.0]]])  # one template each; value tells the concept
    concepts = ConceptTexts(labels, ["effusion", "fracture"], ctf)
    assert concepts.n_pairs == 3
    block = _block(["a", "b", "c"], [0, 1, 2])
    (batch,) = list(iter_batches(block, 16, torch.Generator().manual_seed(0), concepts=concepts, concept_ratio=1.0))
    assert batch.texts.shape[0] == 6  # 3 captions + all 3 concept pairs
    image_of = batch.images[:, 0].long()
    text_val = batch.texts[:, 0]
    for i in range(6):
        for j in range(6):
            if text_val[j] == 10:  # "effusion": images 0 and 1
                want = image_of[i].item() in (0, 1)
            elif text_val[j] == 20:  # "fracture": image 1
                want = image_of[i].item() == 1
            else:  # caption k belongs to image k
                want = image_of[i].item() == int(text_val[j])
            assert batch.positives[i, j].item() == want, (i, j)


def test_unnamed_concepts_are_not_used_as_texts():
    labels = sp.csr_matrix(np.array([[1, 1]], dtype=np.float32))
    concepts = ConceptTexts(labels, ["", "effusion"], torch.zeros(2, 1, 2))
    assert concepts.n_pairs == 1
    rows, cols = concepts.pairs_of(torch.tensor([0]))
    assert rows.tolist() == [0] and cols.tolist() == [0]  # column 0 of the named concepts: "effusion"


def test_views_are_sampled_per_image():
    n = 5
    views = torch.stack([torch.full((n, 2), 100.0 * (v + 1)) for v in range(3)], dim=1)  # [n, 3, 2]
    views += torch.arange(n, dtype=torch.float32)[:, None, None]
    block = _block([str(i) for i in range(n)], list(range(n)), n_images=n, views=views)
    seen = set()
    for seed in range(20):
        for batch in iter_batches(block, n, torch.Generator().manual_seed(seed)):
            img_row = batch.texts[:, 0].long()
            offset = (batch.images[:, 0] - img_row).round()  # 0 = original view, 100/200/300 = views
            assert set(offset.tolist()) <= {0.0, 100.0, 200.0, 300.0}
            seen |= set(offset.tolist())
    assert seen == {0.0, 100.0, 200.0, 300.0}
    # without views only the original features are used
    (batch,) = list(iter_batches(block, n, torch.Generator().manual_seed(0), use_views=False))
    assert torch.equal(batch.images[:, 0], batch.texts[:, 0])


def test_stream_source_covers_every_caption_once(tmp_path):
    split = correlated_split(50, 6, 4, captions_per_image=2)
    path = write_cache(split, tmp_path / split_file("train"))
    source = StreamSource(path, chunk_rows=16)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for block in source.blocks(gen):
        assert block.caption_features.shape[0] <= 16
        # features read back for each caption must be those of its own image
        glob = block.image_rows[block.caption_image]
        assert torch.allclose(block.image_features[block.caption_image].float(), split.image_features[glob])
        rows.append(glob)
    assert sorted(torch.cat(rows).tolist()) == sorted(split.caption_image.tolist())
    mem = MemorySource(split)
    assert (source.image_dim, source.text_dim, source.n_captions) == (mem.image_dim, mem.text_dim, mem.n_captions)


def test_read_concepts_matches_full_load(tmp_path):
    split = correlated_split(40, 6, 4, n_concepts=5, templates=3)
    path = write_cache(split, tmp_path / split_file("train"))
    labels, names, ctf = read_concepts(path)
    assert names == split.concept_names
    assert (labels != split.concepts).nnz == 0 and labels.nnz == split.concepts.nnz > 0
    assert torch.allclose(ctf, split.concept_text_features)


def test_hard_negatives_are_the_nearest_captions_of_other_images():
    # captions on a circle: caption k at angle k * 10 degrees; 0 and 1 belong to image 0, 4 and 5 read alike
    ang = torch.deg2rad(torch.arange(8) * 10.0)
    feats = torch.stack([ang.cos(), ang.sin()], 1)
    captions = ["a", "b", "c", "d", "same words", "Same  words", "g", "h"]
    block = Block(torch.randn(7, 3), None, feats, torch.tensor([0, 0, 1, 2, 3, 4, 5, 6]), caption_keys(captions),
                  torch.arange(7))
    nb = caption_neighbours(block, m=2)
    # by hand: 0's nearest are 1 (own image: left out), then 2, 3; 4's are 5 (same words: left out), 3, then 6 (at 20 deg) vs 2 (20 deg): tie
    assert nb[0].tolist() == [2, 3]
    assert nb[1].tolist() == [2, 3]  # 0 is its own image
    assert nb[4, 0].item() == 3 and nb[4, 1].item() in (2, 6)
    assert 5 not in nb[4].tolist() and 4 not in nb[5].tolist()

    gen = torch.Generator().manual_seed(0)
    batches = hard_negative_order(nb, batch_size=6, k=2, gen=gen)
    rows = torch.cat(batches).reshape(-1, 3)  # groups of anchor + 2 neighbours
    assert rows.shape[0] == 3 and sorted(len(b) for b in batches) == [3, 6]
    for anchor, *others in rows.tolist():
        assert set(others) <= set(nb[anchor].tolist())
    assert len(set(rows[:, 0].tolist())) == 3  # distinct anchors

    # through iter_batches: the pairs keep their own images and the positives mask
    out = list(iter_batches(block, 6, torch.Generator().manual_seed(0), neighbours=nb, hard_negatives=2))
    assert sum(b.texts.shape[0] for b in out) == 9
    for b in out:
        assert b.positives.diagonal().all()
