"""Tower tuning on tiny-clip (CPU, seconds): what is locked stays bit-identical, what is unlocked
moves, the cached mid-layer path computes what the full towers compute, the refreshed cache goes to
a new folder under new provenance, a rolled-back cycle restores the previous weights bit for bit,
and the one-file checkpoint rebuilds the same model."""
from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from medembed.adapt.config import AdaptConfig
from medembed.adapt.heads import build_heads
from medembed.adapt.run import load_adapter_run
from medembed.adapt.tuning import unfreeze
from medembed.adapt.tuning.finetuned import FinetunedModel, mark_finetuned, read_finetuned, save_finetuned
from medembed.adapt.tuning.towers import (
    MidCacheUnsupported,
    UnlockSpec,
    lock_backbone,
    top_for,
    tower_parameters,
    tower_state,
)
from medembed.adapt.tuning.unfreeze import TuneConfig, train_tuned, train_with_unfreezing
from medembed.cache.reader import find_splits, load_split, read_attrs
from medembed.cache.schema import PRIVATE_LOCATION, split_file
from medembed.common.hashing import tensor_digest
from medembed.extract.backbones import create_backbone
from medembed.extract.imaging import open_image
from medembed.model.runs import open_run
from tests.conftest import tiny_clip_cache
from tests.synthetic_features import correlated_split, write_cache

# tiny-clip has 2 resblocks per tower; open_clip's top-2 groups are [last block + final norm] and the projection
TOP2_IMAGE = {"visual.proj", "visual.ln_post.weight", "visual.ln_post.bias"}
TOP2_TEXT = {"text_projection", "ln_final.weight", "ln_final.bias"}


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory) -> Path:
    return tiny_clip_cache(tmp_path_factory.mktemp("ft"), {"train": 24, "valid": 8})


def _strip(name: str) -> str:
    """image_model.visual.x -> visual.x ; text_model.tower.x -> x (the open_clip model's own names)."""
    name = name.split(".", 1)[1]
    return name[len("tower."):] if name.startswith("tower.") else name.replace("__", ".")


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.h5"))}


def _config(cache: Path, out: Path, **kw) -> AdaptConfig:
    base = dict(features_dir=str(cache), out=str(out), head="mlp", dim=16, epochs=2, batch_size=8, seed=0)
    return AdaptConfig(**{**base, **kw})


def test_unlock_spec_parses_towers_counts_and_all():
    assert UnlockSpec.parse("text:2") == UnlockSpec(0, 2)
    assert UnlockSpec.parse("image:1,text:all") == UnlockSpec(1, "all")
    assert UnlockSpec.parse("ALL") == UnlockSpec("all", "all") and UnlockSpec.parse("3") == UnlockSpec(3, 3)
    assert str(UnlockSpec(0, 2)) == "text:2"
    for bad in ("-1", "top", "audio:2", "text:x"):
        with pytest.raises(ValueError):
            UnlockSpec.parse(bad)
    with pytest.raises(ValueError, match="no frozen trunk"):
        TuneConfig(unlock="all", every=1, cached_trunk=True)
    with pytest.raises(ValueError, match="names no tower block"):
        TuneConfig(unlock="0")


def test_lock_uses_open_clip_groups():
    bb = create_backbone("tiny-clip")
    lock_backbone(bb, UnlockSpec(2, 2))
    unlocked = {_strip(n) for n, p in tower_parameters(bb).items() if p.requires_grad}
    expected_blocks = {n for n in unlocked if ".resblocks." in n}
    assert TOP2_IMAGE | TOP2_TEXT <= unlocked
    assert expected_blocks and all(".resblocks.1." in n for n in expected_blocks)  # block 0 stays frozen
    assert unlocked == TOP2_IMAGE | TOP2_TEXT | expected_blocks
    lock_backbone(bb, UnlockSpec(1, 1))  # the projections alone
    assert {_strip(n) for n, p in tower_parameters(bb).items() if p.requires_grad} == {"visual.proj", "text_projection"}
    lock_backbone(bb, UnlockSpec(0, 1))  # LiT: the image tower wholly locked
    assert {_strip(n) for n, p in tower_parameters(bb).items() if p.requires_grad} == {"text_projection"}
    lock_backbone(bb, UnlockSpec("all", "all"))
    assert all(p.requires_grad for p in tower_parameters(bb).values())


def test_cached_top_reproduces_the_full_towers():
    bb = create_backbone("tiny-clip")
    lock_backbone(bb, UnlockSpec(2, 2))
    top = top_for(bb)  # built only from public modules, and checked against the towers on construction
    assert (top.image.cut, top.text.cut) == (1, 1)
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ids = bb.tokenize(["a chest x-ray", "an axial ct of the abdomen", "mri"])["input_ids"]
    with torch.no_grad():
        assert torch.allclose(top.image_top(top.image_trunk(pixels)), bb.image_model(pixels), atol=1e-5)
        assert torch.allclose(top.text_top(*top.text_trunk({"input_ids": ids})), bb.text_model(input_ids=ids), atol=1e-5)


@pytest.mark.parametrize("cached", [False, True], ids=["raw-images", "cached-trunk"])
def test_cycle_moves_unlocked_and_keeps_locked_bit_identical(tiny_cache, tmp_path, cached):
    config = _config(tiny_cache, tmp_path / "run")
    tune = TuneConfig(unlock="2", every=1, epochs=1, batch_size=8, backbone_lr=1e-3, cached_trunk=cached,
                      augment=False, rollback=False, features_root=str(tmp_path / "f"))
    summary = train_with_unfreezing(config, tune, progress=False)
    (cycle,) = summary["cycles"]
    assert cycle["path"] == ("cached" if cached else "raw")
    tuned, _, _, _ = read_finetuned(summary["checkpoint"])
    base = create_backbone("tiny-clip")
    unlocked = {n for n, p in tower_parameters(base).items() if p in set(lock_backbone(base, UnlockSpec(2, 2)))}
    after = tower_parameters(tuned)
    for name, old in tower_parameters(base).items():
        if name in unlocked:
            assert not torch.equal(old, after[name]), f"{name} is unlocked but did not change"
        else:
            assert torch.equal(old, after[name]), f"{name} is locked but changed"
    assert all(torch.equal(b, dict(base.image_model.named_buffers())[n]) for n, b in tuned.image_model.named_buffers())
    assert not any(p.requires_grad for p in after.values())  # the towers are handed back frozen


def test_checkpoint_round_trips_exactly(tiny_cache, tmp_path):
    bb = create_backbone("tiny-clip")
    attrs = read_attrs(find_splits(tiny_cache)["train"])
    cfg = {**_config(tiny_cache, tmp_path).to_dict(), "image_dim": int(attrs["image_dim"]),
           "text_dim": int(attrs["text_dim"])}
    image_head, text_head = build_heads(cfg)
    with torch.no_grad():
        for p in bb.image_model.parameters():  # weights unlike the registry's, so loading must really load
            p.add_(0.01 * torch.randn_like(p))
    marked = mark_finetuned(bb, {"tuned": "test"})
    assert marked.name.startswith("tiny-clip+ft-") and bb.name == "tiny-clip"  # the original keeps its identity
    path = save_finetuned(tmp_path / "m.safetensors", marked, image_head.eval(), text_head.eval(), cfg)
    bb2, ih2, th2, _ = read_finetuned(path)
    assert bb2.name == marked.name and bb2.provenance["weights_sha256"] == marked.provenance["weights_sha256"]
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    texts = ["a red square", "a blue square"]
    with torch.no_grad():  # same weights; frozen vs trainable parameters may take other attention kernels
        assert torch.allclose(ih2(bb2.encode_images(pixels)), image_head(bb.encode_images(pixels)), atol=1e-5)
        assert torch.allclose(th2(bb2.encode_texts(texts)), text_head(bb.encode_texts(texts)), atol=1e-5)
    from PIL import Image

    model = FinetunedModel.load(path)
    img = Image.fromarray((torch.rand(40, 40, 3, generator=torch.Generator().manual_seed(3)) * 255).byte().numpy())
    emb_i, emb_t = model.embed_images([img]), model.embed_texts(texts)
    with torch.no_grad():
        want = torch.nn.functional.normalize(image_head(bb.encode_images(bb.preprocess(img)[None])), dim=-1)
    assert emb_t.shape == (2, 16 * 4) and torch.allclose(emb_t.norm(dim=-1), torch.ones(2))  # 4 heads of dim 16
    assert torch.allclose(emb_i, want, atol=1e-6)
    from medembed.adapt.checkpoint import save_heads

    save_heads(tmp_path / "heads.safetensors", image_head, text_head)
    with pytest.raises(ValueError, match="not a fine-tuned backbone checkpoint"):
        read_finetuned(tmp_path / "heads.safetensors")
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    (tmp_path / "bad.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="does not match its recorded sha256"):
        read_finetuned(tmp_path / "bad.safetensors")


@pytest.mark.slow
def test_unfreezing_run_refreshes_cache_under_new_provenance(tiny_cache, tmp_path):
    old_digest = _digest(tiny_cache)
    old_attrs = read_attrs(tiny_cache / split_file("train"))
    tune = TuneConfig(unlock="2", every=1, epochs=1, batch_size=8, backbone_lr=1e-3, augment=False, rollback=False)
    summary = train_with_unfreezing(_config(tiny_cache, tmp_path / "run"), tune, progress=False)

    assert _digest(tiny_cache) == old_digest  # the cache trained from is untouched
    (cycle,) = summary["cycles"]
    new_dir = Path(cycle["features_dir"])
    assert new_dir.parent == tiny_cache.parent and new_dir.name.startswith("tiny-clip+ft-")
    assert set(find_splits(new_dir)) == {"train", "valid"}
    new_attrs = read_attrs(new_dir / split_file("train"))
    assert new_attrs["backbone"] == new_dir.name
    assert new_attrs["weights_sha256"] != old_attrs["weights_sha256"]
    assert new_attrs["finetuned_from"] == old_attrs["weights_sha256"]
    assert [s["epochs"] for s in summary["stages"]] == [1, 2]

    # the checkpoint is the model that wrote the refreshed cache
    bb, image_head, _, _ = read_finetuned(summary["checkpoint"])
    assert tensor_digest(tower_state(bb)) == new_attrs["weights_sha256"]
    new, old = load_split(new_dir / split_file("valid")), load_split(tiny_cache / split_file("valid"))
    assert not torch.allclose(new.image_features, old.image_features, atol=1e-2)
    root = Path(new.attrs["data_root"])
    pixels = torch.stack([bb.preprocess(open_image(str(root / loc))) for loc in new.image_locations])
    assert torch.allclose(bb.encode_images(pixels), new.image_features, atol=2e-2, rtol=1e-2)
    assert torch.allclose(bb.encode_texts(new.captions), new.caption_features, atol=2e-2, rtol=1e-2)
    # the run folder opens as the checkpoint's model, its heads are the run's best heads
    run = open_run(tmp_path / "run")
    assert run.checkpoint == Path(summary["checkpoint"]) and run.features_dir == new_dir
    heads_only = load_adapter_run(tmp_path / "run")
    x = new.image_features[:4]
    with torch.no_grad():
        assert torch.equal(image_head(x), heads_only.image_head(x))


@pytest.mark.slow
def test_a_cycle_that_lowers_valid_recall_is_rolled_back_bit_for_bit(tiny_cache, tmp_path):
    """A learning rate that wrecks the towers: the cycle is undone and no fine-tuned model is kept."""
    config = _config(tiny_cache, tmp_path / "run", epochs=3)
    tune = TuneConfig(unlock="all", every=1, epochs=1, batch_size=8, backbone_lr=5.0, head_lr=5.0, augment=False)
    summary = train_with_unfreezing(config, tune, progress=False)
    assert "rolled back" in summary["notes"][0] and len(summary["cycles"]) == 1
    assert summary["checkpoint"] is None  # the towers are the base backbone's again
    assert json.loads((tmp_path / "run" / "config.json").read_text())["features_dir"] == str(tiny_cache.resolve())
    run = open_run(tmp_path / "run")
    assert run.checkpoint is None and run.config["backbone"] == "tiny-clip"


@pytest.mark.slow
def test_rollback_restores_tower_and_head_weights_exactly(tiny_cache, tmp_path):
    from medembed.adapt.tuning import unfreeze as uf

    config = _config(tiny_cache, tmp_path / "run", epochs=2)
    tune = TuneConfig(unlock="2", every=1, epochs=1, batch_size=8, backbone_lr=1e-3, augment=False)
    device = torch.device("cpu")
    data = uf.load_training_data(config)
    state = uf.new_state(config, uf._run_config(config, data, tune), data, device)
    (tmp_path / "run").mkdir()
    run = uf.Periodic(config, tune, device, uf._base_backbone(tiny_cache, device), data, tiny_cache, state,
                      tmp_path / "run", False)
    uf._adapter_stage(run, 1)

    def weights():
        return ({k: v.clone() for k, v in tower_state(run.backbone).items()},
                [{k: v.clone() for k, v in h.state_dict().items()} for h in run.state.chosen_heads])

    before = weights()
    kept = uf._keep(run)
    uf._cycle(run)
    assert run.backbone.name.startswith("tiny-clip+ft-") and run.features_dir != tiny_cache
    assert any(not torch.equal(v, before[0][k]) for k, v in tower_state(run.backbone).items())
    uf._roll_back(run, kept)
    after = weights()
    assert all(torch.equal(v, before[0][k]) for k, v in after[0].items())
    assert all(torch.equal(v, b[k]) for a, b in zip(after[1], before[1]) for k, v in a.items())
    assert run.features_dir == tiny_cache and run.backbone.name == "tiny-clip" and not run.tuned


@pytest.mark.slow
def test_lit_mode_tunes_the_text_tower_and_leaves_image_features_alone(tiny_cache, tmp_path):
    config = _config(tiny_cache, tmp_path / "lit", epochs=2)
    summary = train_tuned(config, TuneConfig(unlock="text:1", backbone_lr=1e-2), progress=False)
    new_dir = Path(summary["features_dir"])
    assert summary["mode"] == "lit" and new_dir.name.startswith("tiny-clip+ft-") and new_dir != tiny_cache
    for split in ("train", "valid"):
        old, new = load_split(tiny_cache / split_file(split), dtype=None), load_split(new_dir / split_file(split), dtype=None)
        assert torch.equal(old.image_features, new.image_features)  # cached image features never recomputed
        assert not torch.equal(old.caption_features, new.caption_features)
        assert not torch.equal(old.concept_text_features, new.concept_text_features)
    bb, _, _, _ = read_finetuned(summary["checkpoint"])
    base = create_backbone("tiny-clip")
    assert all(torch.equal(a, b) for a, b in zip(bb.image_model.state_dict().values(),
                                                 base.image_model.state_dict().values()))
    assert any(not torch.equal(a, b) for a, b in zip(bb.text_model.state_dict().values(),
                                                     base.text_model.state_dict().values()))
    refreshed = load_split(new_dir / split_file("valid"))
    assert torch.allclose(bb.encode_texts(refreshed.captions), refreshed.caption_features, atol=2e-2, rtol=1e-2)


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_default_backbone_unlocks_top_stage_and_layers_and_its_cached_top_matches(attention):
    """The cached top reproduces the full towers under both attention code paths of BERT layers
    (the mask is built by the project, not by a private helper of the library)."""
    bb = create_backbone("effnet-lite0+minilm")
    bb.text_model.encoder.set_attn_implementation(attention)
    lock_backbone(bb, UnlockSpec(2, 2))
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


@pytest.mark.slow
def test_multiscale_backbone_caches_its_text_top_and_refuses_a_cached_image_top():
    """LiT on the multi-scale variant runs the text top from cached activations (the image features
    stay as the cache holds them); a cached image top, which would pool one stage of one view, is
    refused with a message that says what to do instead."""
    bb = create_backbone("effnet-lite0-ms+minilm")
    lock_backbone(bb, UnlockSpec(0, 2))
    top = top_for(bb, image=False)
    tokens = bb.tokenize(["axial ct", "a much longer caption about a chest radiograph with an effusion"])
    with torch.no_grad():
        assert torch.allclose(top.text_top(*top.text_trunk(tokens)), bb.text_model(**tokens), atol=1e-5)
    lock_backbone(bb, UnlockSpec(1, 1))
    with pytest.raises(MidCacheUnsupported, match="multi-scale image tower.*--unlock text:N"):
        top_for(bb)


class _Stop(Exception):
    pass


@pytest.mark.parametrize("private", [False, True])
def test_a_refresh_keeps_paths_readable_only_where_the_cache_kept_them(tmp_path, monkeypatch, private):
    """Caches made before ids were keyed have no `image_ids` attribute, yet an image-only folder's (or
    MIMIC-CXR's) stored only `private:ID`: refreshing one must not write the paths it never kept."""
    data = tmp_path / "data"
    data.mkdir()
    split = correlated_split(4, image_dim=8, text_dim=8, split="train")
    locations = [f"{PRIVATE_LOCATION}{i:016x}" if private else f"scans/{i}.png" for i in range(4)]
    attrs = {**split.attrs, "dataset": "scans", "backbone": "tiny-clip", "data_root": str(data)}
    write_cache(replace(split, image_locations=locations, attrs=attrs), tmp_path / "scans" / "tiny-clip" / split_file("train"))
    asked = {}

    def reading(path, **kwargs):
        asked.update(kwargs)
        raise _Stop

    monkeypatch.setattr(unfreeze, "load_dataset", reading)
    with pytest.raises(_Stop):
        unfreeze.refresh_cache(SimpleNamespace(name="tiny-clip+ft-0123"), tmp_path / "scans" / "tiny-clip",
                               TuneConfig(), torch.device("cpu"))
    assert asked["readable_paths"] is not private
