"""Periodic unfreezing on tiny-clip (CPU, seconds): what is locked stays bit-identical, what is unlocked
moves, the cached mid-layer path computes what the full towers compute, the refreshed cache goes to a
new folder under new provenance, and the one-file checkpoint rebuilds the same model."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from medembed.adapt.config import AdaptConfig
from medembed.adapt.finetune import (
    UnfreezeConfig,
    fine_tune,
    load_finetuned,
    lock_backbone,
    mark_finetuned,
    parse_unlocked,
    save_finetuned,
    tower_parameters,
    train_with_unfreezing,
)
from medembed.adapt.losses import build_loss
from medembed.adapt.midcache import top_for
from medembed.adapt.trainer import build_towers
from medembed.cache.reader import find_splits, load_split, read_attrs
from medembed.extract.backbones import create_backbone
from medembed.extract.backbones.core import sha256_state_dict
from tests.conftest import tiny_clip_cache

# tiny-clip has 2 resblocks per tower; open_clip's top-2 groups are [last block + final norm] and the projection
TOP2_IMAGE = {"visual.proj", "visual.ln_post.weight", "visual.ln_post.bias"}
TOP2_TEXT = {"text_projection", "ln_final.weight", "ln_final.bias"}


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory) -> Path:
    return tiny_clip_cache(tmp_path_factory.mktemp("ft"), {"train": 24, "valid": 8})


def _heads(cache: Path, head: str = "mlp"):
    attrs = read_attrs(find_splits(cache)["train"])
    cfg = {**AdaptConfig(features_dir=str(cache), out="-", head=head, dim=16).to_dict(),
           "image_dim": int(attrs["image_dim"]), "text_dim": int(attrs["text_dim"])}
    torch.manual_seed(0)
    return (*build_towers(cfg), torch.nn.ModuleList([build_loss("infonce")]), cfg)


def _strip(name: str) -> str:
    """image_model.visual.x -> visual.x ; text_model.tower.x -> x (the open_clip model's own names)."""
    name = name.split(".", 1)[1]
    return name[len("tower."):] if name.startswith("tower.") else name.replace("__", ".")


def test_parse_unlocked_accepts_counts_and_all_only():
    assert parse_unlocked("3") == 3 and parse_unlocked("ALL") == "all" and parse_unlocked(2) == 2
    for bad in ("0", "-1", "top"):
        with pytest.raises(ValueError):
            parse_unlocked(bad)
    with pytest.raises(ValueError, match="no frozen trunk"):
        UnfreezeConfig(unlocked_layers="all", cached_trunk=True)


def test_lock_uses_open_clip_groups():
    bb = create_backbone("tiny-clip")
    lock_backbone(bb, 2)
    unlocked = {_strip(n) for n, p in tower_parameters(bb).items() if p.requires_grad}
    expected_blocks = {n for n in unlocked if ".resblocks." in n}
    assert TOP2_IMAGE | TOP2_TEXT <= unlocked
    assert expected_blocks and all(".resblocks.1." in n for n in expected_blocks)  # block 0 stays frozen
    assert unlocked == TOP2_IMAGE | TOP2_TEXT | expected_blocks
    lock_backbone(bb, 1)  # the projections alone
    assert {_strip(n) for n, p in tower_parameters(bb).items() if p.requires_grad} == {"visual.proj", "text_projection"}
    lock_backbone(bb, "all")
    assert all(p.requires_grad for p in tower_parameters(bb).values())


@pytest.mark.parametrize("cached", [False, True], ids=["raw-images", "cached-trunk"])
def test_cycle_moves_unlocked_and_keeps_locked_bit_identical(tiny_cache, cached):
    bb = create_backbone("tiny-clip")
    image_head, text_head, losses, _ = _heads(tiny_cache)
    unlocked_names = {n for n, p in tower_parameters(bb).items() if p in set(lock_backbone(bb, 2))}
    before = {n: p.detach().clone() for n, p in tower_parameters(bb).items()}
    buffers = {n: b.clone() for n, b in bb.image_model.named_buffers()}
    head_before = {n: p.detach().clone() for n, p in image_head.named_parameters()}
    ucfg = UnfreezeConfig(epochs=1, unlocked_layers=2, batch_size=8, backbone_lr=1e-3, cached_trunk=cached)
    stats = fine_tune(bb, image_head, text_head, losses, find_splits(tiny_cache)["train"], ucfg, torch.device("cpu"))
    assert stats.path == ("cached" if cached else "raw") and stats.pairs_per_epoch == 24
    after = tower_parameters(bb)
    for name, old in before.items():
        if name in unlocked_names:
            assert not torch.equal(old, after[name]), f"{name} is unlocked but did not change"
        else:
            assert torch.equal(old, after[name]), f"{name} is locked but changed"
    assert all(torch.equal(b, buffers[n]) for n, b in bb.image_model.named_buffers())
    assert any(not torch.equal(p, head_before[n]) for n, p in image_head.named_parameters())
    assert not any(p.requires_grad for p in after.values())  # the towers are handed back frozen


@pytest.mark.slow
def test_grad_checkpointing_changes_memory_not_results(tiny_cache, monkeypatch):
    import medembed.adapt.finetune as ft

    calls = []
    real = ft.checkpoint
    monkeypatch.setattr(ft, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    results = []
    for checkpointing in (False, True):
        bb = create_backbone("tiny-clip")
        image_head, text_head, losses, _ = _heads(tiny_cache)
        ucfg = UnfreezeConfig(epochs=1, unlocked_layers=3, batch_size=8, backbone_lr=1e-3, augment=False,
                              grad_checkpointing=checkpointing)
        torch.manual_seed(0)
        fine_tune(bb, image_head, text_head, losses, find_splits(tiny_cache)["train"], ucfg, torch.device("cpu"))
        results.append(tower_parameters(bb))
        assert all("forward" not in m.__dict__ for m in bb.image_model.modules())  # wrappers removed again
    plain, checkpointed = results
    assert len(calls) == 3 * 4  # 3 steps x (2 image + 2 text unlocked resblocks), only in the second run
    fresh = tower_parameters(create_backbone("tiny-clip"))
    assert sum(not torch.equal(plain[n], fresh[n]) for n in plain) >= 10  # resblocks.1, norms, projections moved
    for name in plain:
        assert torch.allclose(plain[name], checkpointed[name], atol=1e-6), name


def test_cached_top_reproduces_the_full_towers():
    bb = create_backbone("tiny-clip")
    lock_backbone(bb, 2)
    top = top_for(bb)
    assert (top.image.cut, top.text.cut) == (1, 1)
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ids = bb.tokenize(["a chest x-ray", "an axial ct of the abdomen", "mri"])["input_ids"]
    with torch.no_grad():
        assert torch.allclose(top.image_top(top.image_trunk(pixels)), bb.image_model(pixels), atol=1e-5)
        assert torch.allclose(top.text_top(*top.text_trunk({"input_ids": ids})), bb.text_model(input_ids=ids), atol=1e-5)


def test_checkpoint_round_trips_exactly(tiny_cache, tmp_path):
    bb = create_backbone("tiny-clip")
    image_head, text_head, _, cfg = _heads(tiny_cache)
    with torch.no_grad():
        for p in bb.image_model.parameters():  # weights unlike the registry's, so loading must really load
            p.add_(0.01 * torch.randn_like(p))
    mark_finetuned(bb, 1, UnfreezeConfig())
    path = save_finetuned(tmp_path / "m.safetensors", bb, image_head.eval(), text_head.eval(), cfg)
    header_len = int.from_bytes(path.read_bytes()[:8], "little")  # safetensors: u64 header size, then JSON
    assert path.read_bytes()[8:9] == b"{" and header_len < path.stat().st_size
    bb2, ih2, th2 = load_finetuned(path)
    assert bb2.name == bb.name and bb2.provenance["weights_sha256"] == bb.provenance["weights_sha256"]
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    texts = ["a red square", "a blue square"]
    with torch.no_grad():
        assert torch.equal(ih2(bb2.encode_images(pixels)), image_head(bb.encode_images(pixels)))
        assert torch.equal(th2(bb2.encode_texts(texts)), text_head(bb.encode_texts(texts)))
    from PIL import Image

    from medembed.adapt.finetune import FinetunedModel

    model = FinetunedModel.load(path)
    img = Image.fromarray((torch.rand(40, 40, 3, generator=torch.Generator().manual_seed(3)) * 255).byte().numpy())
    emb_i, emb_t = model.embed_images([img]), model.embed_texts(texts)
    with torch.no_grad():
        want = torch.nn.functional.normalize(image_head(bb.encode_images(bb.preprocess(img)[None])), dim=-1)
    assert emb_t.shape == (2, 16) and torch.allclose(emb_t.norm(dim=-1), torch.ones(2))
    assert torch.allclose(emb_i, want, atol=1e-6)
    bad = tmp_path / "heads.safetensors"
    from medembed.adapt.checkpoint import save_heads

    save_heads(bad, image_head, text_head)
    with pytest.raises(ValueError, match="not a fine-tuned backbone checkpoint"):
        load_finetuned(bad)


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.h5"))}


@pytest.mark.slow
def test_unfreezing_run_refreshes_cache_under_new_provenance(tiny_cache, tmp_path):
    old_digest = _digest(tiny_cache)
    old_attrs = read_attrs(tiny_cache / "train.h5")
    config = AdaptConfig(features_dir=str(tiny_cache), out=str(tmp_path / "run"), head="mlp", dim=16, epochs=2,
                         batch_size=8, patience=5, seed=0)
    ucfg = UnfreezeConfig(every=1, epochs=1, unlocked_layers=2, batch_size=8, backbone_lr=1e-3, augment=False)
    summary = train_with_unfreezing(config, ucfg, progress=False)

    assert _digest(tiny_cache) == old_digest  # the cache trained from is untouched
    (cycle,) = summary["cycles"]
    new_dir = Path(cycle["features_dir"])
    assert new_dir.parent == tiny_cache.parent and new_dir.name.startswith("tiny-clip+ft-")
    assert set(find_splits(new_dir)) == {"train", "valid"}
    new_attrs = read_attrs(new_dir / "train.h5")
    assert new_attrs["backbone"] == new_dir.name
    assert new_attrs["weights_sha256"] != old_attrs["weights_sha256"]
    assert new_attrs["finetuned_from"] == old_attrs["weights_sha256"]
    assert [s["epochs"] for s in summary["stages"]] == [1, 1]

    # the checkpoint is the model that wrote the refreshed cache
    bb, image_head, text_head = load_finetuned(summary["checkpoint"])
    from medembed.adapt.finetune import tower_state

    assert sha256_state_dict(tower_state(bb)) == new_attrs["weights_sha256"]
    new, old = load_split(new_dir / "valid.h5"), load_split(tiny_cache / "valid.h5")
    assert not torch.allclose(new.image_features, old.image_features, atol=1e-2)
    from medembed.extract.records import open_image

    root = Path(new.attrs["data_root"])
    pixels = torch.stack([bb.preprocess(open_image(str(root / loc))) for loc in new.image_locations])
    assert torch.allclose(bb.encode_images(pixels), new.image_features, atol=2e-2, rtol=1e-2)
    assert torch.allclose(bb.encode_texts(new.captions), new.caption_features, atol=2e-2, rtol=1e-2)
    # the second adapter stage continued from the fine-tuned heads and wrote the heads the checkpoint holds
    from medembed.adapt.run import load_run

    last = load_run(tmp_path / "run" / "stage-1")
    x = new.image_features[:4]
    with torch.no_grad():
        assert torch.equal(image_head(x), last.image_head(x))


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_default_backbone_unlocks_top_stage_and_layers_and_its_cached_top_matches(attention):
    """The cached top reproduces the full towers under both attention code paths of BERT layers
    (the mask is built by the project, not by a private helper of the library)."""
    bb = create_backbone("effnet-lite0+minilm")
    bb.text_model.encoder.set_attn_implementation(attention)
    lock_backbone(bb, 2)
    trainable = {n for n, p in tower_parameters(bb).items() if p.requires_grad}
    # EfficientNet-Lite0: the last MBConv stage is the single 320-channel block 15, then the head conv
    assert any(n.startswith("image_model.net._blocks.15.") for n in trainable)
    assert "image_model.net._conv_head.weight" in trainable
    assert not any(n.startswith(("image_model.net._blocks.14.", "image_model.net._conv_stem")) for n in trainable)
    # MiniLM: the last two of six transformer layers
    layers = {n.split(".")[4] for n in trainable if n.startswith("text_model.encoder.encoder.layer.")}
    assert layers == {"4", "5"}
    assert not any("embeddings" in n for n in trainable)
    top = top_for(bb)
    assert (top.image.cut, top.text.cut) == (15, 4)
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(4))
    tokens = bb.tokenize(["axial ct", "a much longer caption about a chest radiograph with an effusion"])
    with torch.no_grad():
        assert torch.allclose(top.image_top(top.image_trunk(pixels)), bb.image_model(pixels), atol=1e-4)
        x, mask = top.text_trunk(tokens)
        padded = torch.nn.functional.pad(x, (0, 0, 0, 5)), torch.nn.functional.pad(mask, (0, 5))  # as the cache pads
        assert torch.allclose(top.text_top(*padded), bb.text_model(**tokens), atol=1e-5)
