"""The towers on ONNX Runtime: the same features as PyTorch within float rounding (images and texts,
padding included), a graph that follows the weights it was exported from and is refused when it
disagrees, the runtime in the cache's provenance, queries of search on it, and a clear answer when
the runtime is missing."""
from __future__ import annotations

import errno
import os

import numpy as np
import pytest
import torch

from medembed.cache.parts import PartStore
from medembed.cache.provenance import ProvenanceMismatch
from medembed.cache.reader import load_split, read_attrs
from medembed.extract.backbones import create_backbone, onnx_runtime
from medembed.extract.backbones.onnx_runtime import (
    GraphMismatch,
    choose_runtime,
    export_image_tower,
    export_text_tower,
    use_onnx_images,
    use_onnx_texts,
)
from medembed.extract.datasets import load_dataset
from medembed.extract.extraction import ExtractConfig, ExtractError, extract
from medembed.extract.imaging import open_image
from tests.conftest import make_imageclef2023, shared_dataset


@pytest.fixture(scope="module")
def roco_pixels():
    records = load_dataset(shared_dataset("roco-rad")).split("test")[:12]
    return [open_image(r.image) for r in records]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["effnet-lite0-ms+minilm", "effnet-lite0+minilm", "tiny-clip"])
def test_onnx_features_equal_pytorch_on_real_images(name, roco_pixels, tmp_path):
    bb = create_backbone(name)
    pixels = torch.stack([bb.preprocess(img) for img in roco_pixels])
    want = bb.encode_images(pixels).numpy()
    use_onnx_images(bb, tmp_path)
    got = bb.encode_images(pixels).numpy()
    assert got.shape == want.shape == (12, bb.image_dim)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cos.min() > 0.99999
    assert bb.provenance["image_runtime"].startswith("onnxruntime==")


@pytest.fixture(scope="module")
def roco_captions():
    records = load_dataset(shared_dataset("roco-rad")).split("test")
    captions = [r.captions[0] for r in records[:40]]
    return sorted(captions, key=len)[::3] + ["CT", "MRI brain"]  # short and long ones batched together: padding


@pytest.mark.parametrize("name", ["effnet-lite0-ms+minilm", "tiny-clip"])
def test_onnx_text_features_equal_pytorch_on_real_captions(name, roco_captions, tmp_path):
    bb = create_backbone(name)
    want = bb.encode_texts(roco_captions, batch_size=8).numpy()
    use_onnx_texts(bb, tmp_path)
    got = bb.encode_texts(roco_captions, batch_size=8).numpy()
    single = bb.encode_texts(roco_captions[-1:]).numpy()  # one live query: no padding at all
    assert got.shape == want.shape == (len(roco_captions), bb.text_dim)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    assert np.abs(single - want[-1:]).max() <= 1e-4 * np.abs(want).max()
    assert bb.text_runtime.path.parent == tmp_path and export_text_tower(bb, tmp_path) == bb.text_runtime.path


def test_a_graph_that_disagrees_with_pytorch_is_refused_and_deleted(tmp_path, monkeypatch):
    bb = create_backbone("tiny-clip")
    real_export = onnx_runtime.export_module

    def skewed(module, inputs, path, dynamic, output="features"):
        with torch.no_grad():  # the graph gets weights the module does not have
            saved = [p.clone() for p in module.parameters()]
            for p in module.parameters():
                p.mul_(1.5)
            try:
                real_export(module, inputs, path, dynamic, output)
            finally:
                for p, value in zip(module.parameters(), saved):
                    p.copy_(value)

    monkeypatch.setattr(onnx_runtime, "export_module", skewed)
    with pytest.raises(GraphMismatch, match=r"tiny-clip-image-.*\.onnx: the exported graph differs from PyTorch"):
        export_image_tower(bb, tmp_path)
    assert not list(tmp_path.glob("*.onnx")) and not list(tmp_path.glob("*.json"))
    notes: list[str] = []
    onnx_runtime.attach(bb, "auto", "cpu", tmp_path, notes, texts=True)
    assert bb.image_runtime is None and bb.text_runtime is None
    assert len(notes) == 2 and "image tower not run by ONNX Runtime" in notes[0]
    with pytest.raises(ValueError, match="--runtime onnx: tiny-clip's image tower could not be run by ONNX Runtime"):
        onnx_runtime.attach(bb, "onnx", "cpu", tmp_path, [])


def test_a_graph_follows_the_weights_it_was_exported_from(tmp_path):
    bb = create_backbone("tiny-clip")
    first = export_image_tower(bb, tmp_path)
    stamp = first.stat().st_mtime_ns
    assert export_image_tower(bb, tmp_path) == first and first.stat().st_mtime_ns == stamp  # reused, not redone
    size = first.stat().st_size
    first.write_bytes(b"not a graph")  # a damaged file found under the right name is checked, then exported anew
    assert export_image_tower(bb, tmp_path) == first and first.stat().st_size == size
    with torch.no_grad():  # a fine-tuned tower: the old graph is stale and never run
        next(bb.image_model.parameters()).add_(0.05)
    second = export_image_tower(bb, tmp_path)
    assert second != first and first.exists() and second.exists()
    pixels = torch.rand(3, *bb.preprocess(open_image_blank()).shape)
    want = bb.encode_images(pixels).numpy()
    use_onnx_images(bb, tmp_path)
    assert bb.image_runtime.path == second
    assert np.abs(bb.encode_images(pixels).numpy() - want).max() <= 1e-4 * np.abs(want).max()


def open_image_blank():
    from PIL import Image

    return Image.new("RGB", (64, 64), (90, 90, 90))


def _cfg(data, out, **kw) -> ExtractConfig:
    return ExtractConfig(data=str(data), backbone="tiny-clip", out=str(out), batch_size=4, workers=0,
                         progress=False, **kw)


def test_the_runtime_is_provenance_and_runtimes_are_never_mixed(tmp_path, monkeypatch):
    data = make_imageclef2023(tmp_path / "d", {"train": 12})
    summary = extract(_cfg(data, tmp_path / "onnx", runtime="onnx"))
    path = summary.splits[0].path
    assert read_attrs(path)["image_runtime"].startswith("onnxruntime==") and "onnxruntime" in summary.runtime
    torch_made = load_split(extract(_cfg(data, tmp_path / "torch", runtime="torch")).splits[0].path)
    assert "image_runtime" not in torch_made.attrs
    x, y = load_split(path).image_features.float().numpy(), torch_made.image_features.float().numpy()
    assert np.abs(x - y).max() <= 2e-3 * np.abs(y).max()  # the same features, to float16 rounding
    # a finished cache made by the other runtime is kept as it is, and says so
    kept = extract(_cfg(data, tmp_path / "onnx", runtime="torch")).splits[0]
    assert kept.status.startswith("up to date (made by onnxruntime==")
    # an interrupted extraction is never continued by the other runtime
    real_put = PartStore.put
    calls = {"n": 0}

    def dies(self, kind, index, **arrays):
        calls["n"] += 1
        if calls["n"] > 1:
            raise OSError(errno.EIO, os.strerror(errno.EIO), "killed")
        return real_put(self, kind, index, **arrays)

    monkeypatch.setattr(PartStore, "put", dies)
    with pytest.raises(ExtractError):
        extract(_cfg(data, tmp_path / "mixed", runtime="onnx"))
    monkeypatch.setattr(PartStore, "put", real_put)
    with pytest.raises(ProvenanceMismatch, match="image_runtime: cache has onnxruntime==.*this run has None"):
        extract(_cfg(data, tmp_path / "mixed", runtime="torch"))


def test_a_missing_runtime_falls_back_or_fails_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_runtime, "onnxruntime_version", lambda: None)
    with pytest.raises(ValueError, match="--runtime onnx needs onnxruntime: pip install onnx onnxruntime"):
        choose_runtime("onnx", "cpu")
    notes: list[str] = []
    assert choose_runtime("auto", "cpu", notes.append) == "torch" and "onnxruntime is not installed" in notes[0]
    data = make_imageclef2023(tmp_path / "d", {"train": 4})
    summary = extract(_cfg(data, tmp_path / "o"))  # the default, auto
    assert any("onnxruntime is not installed" in w for w in summary.warnings) and summary.runtime.startswith("torch")
    assert choose_runtime("auto", "cuda") == "torch"
    with pytest.raises(ValueError, match="--runtime 'fast'"):
        choose_runtime("fast", "cpu")
