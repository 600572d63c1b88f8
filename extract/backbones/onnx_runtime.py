"""Image towers run by ONNX Runtime on the CPU: the same graph, several times faster than PyTorch eager.

The tower is exported once with `torch.onnx.export` and cached as a file named by a digest of what
fixes its output: the tower's class and weights (so a fine-tuned tower never reuses its base's graph),
the input shape, the opset and the torch version. A graph whose digest no longer matches is simply
not found, and a new one is exported: a stale graph is never run. The features differ from PyTorch's
by float rounding only (a test bounds it); the runtime that made them is part of the cache's
provenance, so features of two runtimes are never mixed silently.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from medembed.common.files import atomic_write, slug
from medembed.extract.backbones.core import Backbone

OPSET = 17
RUNTIMES = ("torch", "onnx", "auto")


def onnxruntime_version() -> str | None:
    """The installed onnxruntime's version, or None when it is not installed."""
    try:
        import onnxruntime
    except ImportError:
        return None
    return onnxruntime.__version__


def choose_runtime(runtime: str, device: str, log=None) -> str:
    """`torch` or `onnx` for a forward on `device`. `auto` takes ONNX Runtime on the CPU when it is
    installed (PyTorch on a GPU); asking for `onnx` without it installed fails in one line."""
    if runtime not in RUNTIMES:
        raise ValueError(f"--runtime {runtime!r}: choose one of {', '.join(RUNTIMES)}")
    installed = onnxruntime_version() is not None
    if runtime == "onnx":
        if not installed:
            raise ValueError("--runtime onnx needs onnxruntime: pip install onnx onnxruntime (or --runtime torch)")
        if device != "cpu":
            raise ValueError(f"--runtime onnx runs on the CPU; this forward is on {device} (use --runtime torch)")
        return "onnx"
    if runtime == "auto" and device == "cpu":
        if installed:
            return "onnx"
        if log is not None:
            log("onnxruntime is not installed: images encoded with PyTorch (pip install onnx onnxruntime is faster)")
    return "torch"


def _example_pixels(backbone: Backbone) -> torch.Tensor:
    """One preprocessed image, batched: the shape the tower is exported for (any batch size runs)."""
    return backbone.preprocess(Image.new("RGB", (256, 256), (128, 128, 128)))[None]


def graph_digest(backbone: Backbone, example: torch.Tensor) -> str:
    h = hashlib.sha256()
    tower = backbone.image_model
    h.update(f"{type(tower).__module__}.{type(tower).__qualname__}|{tuple(example.shape[1:])}|opset {OPSET}|"
             f"torch {torch.__version__}".encode())
    for name, tensor in sorted(tower.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@dataclass
class OnnxImageTower:
    """A callable like the PyTorch tower: pixels [B, ...] -> raw features [B, D] (float32, CPU)."""

    session: object
    path: Path

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {"pixels": np.ascontiguousarray(pixels.detach().cpu().numpy(), np.float32)})[0]
        return torch.from_numpy(out)


def export_image_tower(backbone: Backbone, folder: Path) -> Path:
    """The tower's ONNX graph in `folder`, exported now unless one of the same digest is there."""
    example = _example_pixels(backbone)
    digest = graph_digest(backbone, example)
    path = folder / f"{slug(backbone.name)}-image-{digest[:16]}.onnx"
    if path.is_file() and path.with_suffix(".json").is_file():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    tower = backbone.image_model.eval()

    def export(tmp: Path) -> None:
        fastpath = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)  # the fused attention kernel has no ONNX form
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the exporter's notes on shape inference, not the user's concern
                torch.onnx.export(tower, (example,), str(tmp), input_names=["pixels"], output_names=["features"],
                                  dynamic_axes={"pixels": {0: "batch"}, "features": {0: "batch"}},
                                  opset_version=OPSET, dynamo=False)
        finally:
            torch.backends.mha.set_fastpath_enabled(fastpath)

    atomic_write(path, export)  # concurrent extractions (Ray shards) each write whole files, one wins
    meta = {"backbone": backbone.name, "digest": digest, "opset": OPSET, "torch": torch.__version__,
            "input_shape": ["batch", *example.shape[1:]], "output_dim": backbone.image_dim}
    atomic_write(path.with_suffix(".json"), lambda tmp: tmp.write_text(json.dumps(meta, indent=2)))
    return path


def use_onnx_images(backbone: Backbone, folder: str | Path, threads: int | None = None) -> Backbone:
    """Run the backbone's image tower through ONNX Runtime from now on (CPU); the graph is exported
    into `folder` on first use. Records the runtime in the backbone's provenance."""
    import onnxruntime as ort

    path = export_image_tower(backbone, Path(folder))
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    backbone.image_runtime = OnnxImageTower(session, path)
    backbone.provenance["image_runtime"] = f"onnxruntime=={ort.__version__} opset {OPSET}"
    return backbone
