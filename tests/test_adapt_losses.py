"""Each loss against values worked out by hand on 2-3 pairs, masking of sibling positives, and
that every loss actually goes down when a head is trained with it."""
import math

import pytest
import torch

from medembed.adapt.heads import build_head
from medembed.adapt.losses import InfoNCELoss, MarginLoss, SigLIPLoss, build_loss

# unit vectors chosen so every cosine is a round number:
# cos(img_i, txt_j) = [[1, 0.6], [0, 0.8]]
IMG2 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
TXT2 = torch.tensor([[1.0, 0.0], [0.6, 0.8]])

# three pairs, the first two are two captions of one image:
# cos = [[1, 0.8, 0], [1, 0.8, 0], [0, 0.6, 1]]
IMG3 = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
TXT3 = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
SIBLINGS = torch.tensor([[True, True, False], [True, True, False], [False, False, True]])


def value(t: torch.Tensor) -> float:
    return t.detach().item()


def sp(x: float) -> float:
    """softplus: log(1 + e^x), the per-entry cost that both cross-entropy and sigmoid losses reduce to here."""
    return math.log1p(math.exp(x))


def test_infonce_two_pairs_by_hand():
    loss = InfoNCELoss(init_temperature=1.0, learn_temperature=False)  # logits = cosines
    # rows (image -> texts): [1, 0.6] target 0; [0, 0.8] target 1
    rows = sp(0.6 - 1) + sp(0 - 0.8)
    # columns (text -> images): [1, 0] target 0; [0.6, 0.8] target 1
    cols = sp(0 - 1) + sp(0.6 - 0.8)
    expected = 0.5 * (rows / 2 + cols / 2)
    assert value(loss(IMG2, TXT2)) == pytest.approx(expected, abs=1e-6)


def test_infonce_scales_logits_by_inverse_temperature():
    loss = InfoNCELoss(init_temperature=0.5, learn_temperature=False)  # logits = 2 * cosines
    expected = 0.25 * (sp(2 * (0.6 - 1)) + sp(2 * (0 - 0.8)) + sp(2 * (0 - 1)) + sp(2 * (0.6 - 0.8)))
    assert value(loss(IMG2, TXT2)) == pytest.approx(expected, abs=1e-6)
    assert loss.temperature == pytest.approx(0.5)


def test_infonce_masks_second_caption_of_same_image():
    loss = InfoNCELoss(init_temperature=1.0, learn_temperature=False)
    # rows: image0 vs [1, (masked 0.8), 0] -> t0; image1 vs [(masked 1), 0.8, 0] -> t1; image2 vs [0, 0.6, 1] -> t2
    rows = sp(0 - 1) + sp(0 - 0.8) + math.log(1 + math.exp(-1) + math.exp(0.6 - 1))
    # cols: text0 vs [1, (masked 1), 0] -> i0; text1 vs [(masked .8), .8, .6] -> i1; text2 vs [0, 0, 1] -> i2
    cols = sp(0 - 1) + sp(0.6 - 0.8) + math.log(1 + 2 * math.exp(-1))
    expected = 0.5 * (rows / 3 + cols / 3)
    masked = value(loss(IMG3, TXT3, SIBLINGS))
    assert masked == pytest.approx(expected, abs=1e-6)
    # without the mask the sibling caption counts as a negative and the value differs
    assert value(loss(IMG3, TXT3)) > masked + 0.1


def test_margin_two_pairs_by_hand():
    loss = MarginLoss(margin=0.2)
    pull = ((1 - 1) + (1 - 0.8)) / 2
    push = (max(0.6 - 0.2, 0) + max(0 - 0.2, 0)) / 2
    assert value(loss(IMG2, TXT2)) == pytest.approx(pull + push, abs=1e-6)


def test_margin_treats_siblings_as_positives():
    loss = MarginLoss(margin=0.2)
    # positives (0,0)=1 (0,1)=.8 (1,0)=1 (1,1)=.8 (2,2)=1; negatives (0,2)=0 (1,2)=0 (2,0)=0 (2,1)=.6
    pull = (0 + 0.2 + 0 + 0.2 + 0) / 5
    push = (0 + 0 + 0 + (0.6 - 0.2)) / 4
    assert value(loss(IMG3, TXT3, SIBLINGS)) == pytest.approx(pull + push, abs=1e-6)
    unmasked_push = (max(0.8 - 0.2, 0) + max(1 - 0.2, 0) + 0.4) / 6
    assert value(loss(IMG3, TXT3)) == pytest.approx((0 + 0.2 + 0) / 3 + unmasked_push, abs=1e-6)


def test_siglip_two_pairs_by_hand():
    loss = SigLIPLoss()
    with torch.no_grad():
        loss.logit_scale.fill_(math.log(2.0))
        loss.bias.fill_(-1.0)
    # logits = 2 cos - 1 = [[1, 0.2], [-1, 0.6]]; labels [[+1, -1], [-1, +1]]; cost softplus(-label * logit)
    expected = (sp(-1) + sp(0.2) + sp(-1) + sp(-0.6)) / 2
    assert value(loss(IMG2, TXT2)) == pytest.approx(expected, abs=1e-6)


def test_siglip_labels_siblings_positive():
    loss = SigLIPLoss()
    with torch.no_grad():
        loss.logit_scale.fill_(0.0)  # t = 1
        loss.bias.fill_(0.0)
    cos = [[1, 0.8, 0], [1, 0.8, 0], [0, 0.6, 1]]
    labels = [[1, 1, -1], [1, 1, -1], [-1, -1, 1]]
    expected = sum(sp(-labels[i][j] * cos[i][j]) for i in range(3) for j in range(3)) / 3
    assert value(loss(IMG3, TXT3, SIBLINGS)) == pytest.approx(expected, abs=1e-6)


def test_losses_ignore_embedding_scale():
    for kind in ("infonce", "margin", "siglip"):
        fn = build_loss(kind)
        assert value(fn(3 * IMG2, 0.5 * TXT2)) == pytest.approx(value(fn(IMG2, TXT2)), abs=1e-6)


def test_mismatched_batches_are_rejected():
    with pytest.raises(ValueError, match="must match"):
        InfoNCELoss()(IMG2, TXT3)


@pytest.mark.parametrize("kind", ["infonce", "margin", "siglip"])
def test_each_loss_decreases_when_training_heads(kind):
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(64, 8, generator=gen)
    img = z @ torch.randn(8, 24, generator=gen) + 0.1 * torch.randn(64, 24, generator=gen)
    txt = z @ torch.randn(8, 16, generator=gen) + 0.1 * torch.randn(64, 16, generator=gen)
    torch.manual_seed(0)
    hi, ht = build_head("linear", 24, 16), build_head("linear", 16, 16)
    fn = build_loss(kind)
    opt = torch.optim.Adam([*hi.parameters(), *ht.parameters(), *fn.parameters()], lr=1e-2)
    values = []
    for _ in range(30):
        loss = fn(hi(img), ht(txt))
        opt.zero_grad()
        loss.backward()
        opt.step()
        values.append(value(loss))
    assert values[-1] < 0.7 * values[0], values


def test_graded_targets_by_hand():
    from medembed.adapt.losses import graded_targets

    # image 0 has concepts {a, b}, image 1 {b}, image 2 {c}: Jaccard(0,1) = 1/2, nothing else overlaps
    labels = torch.tensor([[1, 1, 0], [0, 1, 0], [0, 0, 1]], dtype=torch.bool)
    t = graded_targets(labels, 0.2)
    assert torch.allclose(t, torch.tensor([[0.8, 0.2, 0.0], [0.2, 0.8, 0.0], [0.0, 0.0, 1.0]]))
    # InfoNCE with these targets: by hand, cross-entropy against the soft rows, both directions
    from medembed.adapt.losses import InfoNCELoss

    img = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    txt = torch.tensor([[0.8, 0.6], [0.0, 1.0], [1.0, 0.0]])
    loss_fn = InfoNCELoss(init_temperature=1.0, learn_temperature=False)
    logits = img @ txt.T  # unit rows, scale 1
    ce = lambda lg, tg: -(tg * torch.log_softmax(lg, 1)).sum(1).mean()  # noqa: E731
    want = 0.5 * (ce(logits, t) + ce(logits.T, t.T))
    assert float(loss_fn(img, txt, soft=t)) == pytest.approx(float(want), abs=1e-6)
    assert float(loss_fn(img, txt, soft=torch.eye(3))) == pytest.approx(float(loss_fn(img, txt)), abs=1e-6)


def test_concept_loss_by_hand():
    from medembed.adapt.losses import ConceptLoss

    prompts = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # two concepts' prompt embeddings
    loss_fn = ConceptLoss(torch.zeros(2, 1, 2), prior=torch.tensor([0.5, 0.5]), init_scale=2.0)  # bias 0
    emb = torch.tensor([[3.0, 0.0], [0.0, 1.0]])  # unit: (1, 0) and (0, 1)
    targets = torch.tensor([[1, 0], [1, 1]])
    # logits = 2 * cos: [[2, 0], [0, 2]]; BCE per cell averaged over the 4 cells
    sp = torch.nn.functional.softplus
    want = (sp(torch.tensor(-2.0)) + sp(torch.tensor(0.0)) + sp(torch.tensor(0.0)) + sp(torch.tensor(-2.0))) / 4
    assert float(loss_fn([emb], targets, prompts)) == pytest.approx(float(want), abs=1e-6)
    assert float(loss_fn([emb, emb], targets, prompts)) == pytest.approx(float(want), abs=1e-6)  # mean over inputs
