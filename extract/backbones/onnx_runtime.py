"""Towers run by ONNX Runtime on the CPU: the same graph as PyTorch's, several times faster for images.

A tower is exported once with `torch.onnx.export` and cached as a file named by a digest of what
fixes its output: the tower's class and weights (so a fine-tuned tower never reuses its base's graph),
the input signature, the opset, the torch version and the tower libraries' versions. A graph whose
digest no longer matches is simply not found, and a new one is exported: a stale graph is never run.
Every graph, new or found in the folder, is run beside PyTorch on probe inputs before use and refused
when the two disagree beyond float rounding (`GraphMismatch`), so a graph the exporter got wrong (or
a damaged file) is never used. The runtime that made cached
features is part of the cache's provenance, so features of two runtimes are never mixed silently.

Images: about 5x PyTorch eager on 2 cores for the default tower, so extraction and image queries run
on ONNX Runtime. Texts: the MiniLM graph answers a single live query about twice as fast as
PyTorch, but batches of captions run at the same speed (both are bound by the same matrix products),
so text queries of search and the page take it and cached captions stay on PyTorch (BENCHMARKS.md).
"""
from __future__ import annotations

import hashlib
import inspect
import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from medembed.cache import schema
from medembed.common.errors import BadOption, Incompatible, MedembedError
from medembed.common.files import atomic_write, slug
from medembed.extract.backbones.core import Backbone

OPSET = 17
RUNTIMES = ("torch", "onnx", "auto")
DEFAULT_RUNTIME = "auto"  # onnx on the CPU when onnxruntime is installed, else torch (`choose_runtime`)
PROBE_TEXTS = ("CT", "Axial contrast-enhanced CT of the abdomen showing a hypodense lesion in the right lobe of the "
               "liver", "chest x-ray")
TOLERANCE = 1e-3  # largest |onnx - torch| a new graph may show, relative to the features' largest magnitude


class GraphMismatch(MedembedError, RuntimeError):
    """An exported graph disagrees with the PyTorch module it came from: it is deleted, never used."""


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
        raise BadOption(f"--runtime {runtime!r}: choose one of {', '.join(RUNTIMES)}")
    installed = onnxruntime_version() is not None
    if runtime == "onnx":
        if not installed:
            raise BadOption("--runtime onnx needs onnxruntime: pip install onnx onnxruntime (or --runtime torch)")
        if device != "cpu":
            raise BadOption(f"--runtime onnx runs on the CPU; this forward is on {device} (use --runtime torch)")
        return "onnx"
    if runtime == "auto" and device == "cpu":
        if installed:
            return "onnx"
        if log is not None:
            log("onnxruntime is not installed: encoded with PyTorch (pip install onnx onnxruntime is faster)")
    return "torch"


# ------------------------------------------------------------------ exporting, once per digest
TOWER_LIBRARIES = ("transformers", "open_clip_torch", "efficientnet_lite_pytorch", "timm")


def library_versions() -> str:
    """The installed versions of the libraries towers are built from: a new release may trace to a
    different graph from the same weights, so it makes a new digest."""
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for name in TOWER_LIBRARIES:
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            continue
    return ", ".join(found)


def module_digest(module: nn.Module, signature: str) -> str:
    """What fixes a graph's output: the module's class and weights, its input signature, the opset,
    torch and the tower libraries' versions."""
    h = hashlib.sha256()
    h.update(f"{type(module).__module__}.{type(module).__qualname__}|{signature}|opset {OPSET}|"
             f"torch {torch.__version__}|{library_versions()}".encode())
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def export_module(module: nn.Module, inputs: dict[str, torch.Tensor], path: Path, dynamic: dict[str, dict[int, str]],
                  output: str = "features") -> None:
    """`module(**inputs)` as an ONNX graph at `path` (written whole or not at all), with the named
    input axes left dynamic; the output's first axis follows the batch. The inputs are handed over
    in the order of the module's forward signature, so each graph input carries its own name."""
    module = module.eval()
    order = [name for name in inspect.signature(module.forward).parameters if name in inputs]
    missing = set(inputs) - set(order)
    if missing:
        raise ValueError(f"{type(module).__name__}.forward names no {', '.join(sorted(missing))}: its inputs cannot "
                         "be given to a graph by name")

    def export(tmp: Path) -> None:
        fastpath = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)  # the fused attention kernel has no ONNX form
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the exporter's notes on shape inference, not the user's concern
                torch.onnx.export(module, tuple(inputs[k] for k in order), str(tmp), input_names=order,
                                  output_names=[output], dynamic_axes={**dynamic, output: {0: "batch"}},
                                  opset_version=OPSET, dynamo=False)
        finally:
            torch.backends.mha.set_fastpath_enabled(fastpath)

    atomic_write(path, export)  # concurrent extractions (Ray shards) each write whole files, one wins


def session(path: Path, threads: int | None = None):
    """An ONNX Runtime CPU session over `path`, with all graph optimisations and `threads` threads."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def check_agreement(graph: Callable, module: Callable, probes: list[dict[str, torch.Tensor]], path: Path) -> float:
    """The largest relative difference between the graph and the module on the probe inputs; a graph
    that disagrees is deleted and `GraphMismatch` names it."""
    worst = 0.0
    with torch.no_grad():
        for probe in probes:
            want = module(**probe).float()
            got = graph(**probe)
            worst = max(worst, float((got - want).abs().max() / want.abs().max().clamp_min(1e-12)))
    if not worst <= TOLERANCE:
        for p in (path, path.with_suffix(".json")):
            p.unlink(missing_ok=True)
        raise GraphMismatch(f"{path.name}: the exported graph differs from PyTorch by {worst:.2g} (relative)")
    return worst


GRAPH_DTYPES = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(uint8)": np.uint8}


@dataclass
class OnnxTower:
    """A callable like the PyTorch tower: named inputs -> raw features [B, D] (float32, CPU)."""

    session: object
    path: Path

    def __call__(self, *args: torch.Tensor, **inputs: torch.Tensor) -> torch.Tensor:
        if args:  # an image tower is called with the pixels alone
            inputs = {"pixels": args[0], **inputs}
        feed = {arg.name: np.ascontiguousarray(inputs[arg.name].detach().cpu().numpy(), GRAPH_DTYPES[arg.type])
                for arg in self.session.get_inputs()}
        return torch.from_numpy(self.session.run(None, feed)[0])


OnnxImageTower = OnnxTower  # the image tower's runtime, as extraction names it


def _example_pixels(backbone: Backbone) -> torch.Tensor:
    """One preprocessed image, batched: the shape the tower is exported for (any batch size runs)."""
    return backbone.preprocess(Image.new("RGB", (256, 256), (128, 128, 128)))[None]


def _probe_pixels(example: torch.Tensor) -> torch.Tensor:
    return torch.randn((3, *example.shape[1:]), generator=torch.Generator().manual_seed(0))


def graph_digest(backbone: Backbone, example: torch.Tensor) -> str:
    """The image tower's digest for inputs shaped like `example`."""
    return module_digest(backbone.image_model, str(tuple(example.shape[1:])))


def _cached_export(folder: Path, name: str, digest: str, write: Callable[[Path], None],
                   check: Callable[[Path], float], meta: dict) -> Path:
    """The graph of this digest in `folder`: one found there is checked against PyTorch again (a
    damaged or hand-edited file is exported anew); else `write` exports it and `check` checks it."""
    path = folder / f"{name}-{digest[:16]}.onnx"
    if path.is_file() and path.with_suffix(".json").is_file():
        try:
            check(path)
            return path
        except Exception:  # noqa: BLE001 - unreadable or disagreeing: export it again below
            for p in (path, path.with_suffix(".json")):
                p.unlink(missing_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    write(path)
    check(path)
    atomic_write(path.with_suffix(".json"), lambda tmp: tmp.write_text(json.dumps(
        {**meta, "digest": digest, "opset": OPSET, "torch": torch.__version__, "libraries": library_versions()},
        indent=2)))
    return path


def export_image_tower(backbone: Backbone, folder: Path) -> Path:
    """The image tower's ONNX graph in `folder`, exported (and checked against PyTorch) now unless
    one of the same digest is there."""
    example = _example_pixels(backbone)
    tower = backbone.image_model.eval()

    def write(path: Path) -> None:
        export_module(tower, {"pixels": example}, path, {"pixels": {0: "batch"}})

    def check(path: Path) -> float:
        return check_agreement(OnnxTower(session(path), path), lambda pixels: tower(pixels),
                               [{"pixels": example}, {"pixels": _probe_pixels(example)}], path)

    return _cached_export(Path(folder), f"{slug(backbone.name)}-image", graph_digest(backbone, example), write,
                          check, {"backbone": backbone.name, "input_shape": ["batch", *example.shape[1:]],
                                  "output_dim": backbone.image_dim})


def exportable_text(backbone: Backbone) -> nn.Module:
    """The text tower in a form the exporter traces faithfully (see `Tower.exportable`)."""
    tower = backbone.text_model.eval()
    return tower.exportable() if hasattr(tower, "exportable") else tower


def probe_tokens(backbone: Backbone) -> list[dict[str, torch.Tensor]]:
    """Token batches with padding (texts of different lengths together) and without."""
    return [backbone.tokenize(list(PROBE_TEXTS)), backbone.tokenize([PROBE_TEXTS[0]])]


def export_text_tower(backbone: Backbone, folder: Path) -> Path:
    """The text tower's ONNX graph in `folder` (batch and sequence length dynamic), exported and
    checked now unless one of the same digest is there."""
    module = exportable_text(backbone)
    probes = probe_tokens(backbone)
    example = probes[0]
    signature = ",".join(f"{k}:{str(v.dtype)}" for k, v in example.items())

    def write(path: Path) -> None:
        export_module(module, example, path, {k: {0: "batch", 1: "tokens"} for k in example})

    def check(path: Path) -> float:  # against the tower itself, not only the form that was exported
        return check_agreement(OnnxTower(session(path), path), backbone.text_model.eval(), probes, path)

    return _cached_export(Path(folder), f"{slug(backbone.name)}-text", module_digest(module, signature), write,
                          check, {"backbone": backbone.name, "inputs": list(example), "output_dim": backbone.text_dim})


def use_onnx_images(backbone: Backbone, folder: str | Path, threads: int | None = None) -> Backbone:
    """Run the backbone's image tower through ONNX Runtime from now on (CPU); the graph is exported
    into `folder` on first use. Records the runtime in the backbone's provenance."""
    import onnxruntime as ort

    path = export_image_tower(backbone, Path(folder))
    backbone.image_runtime = OnnxTower(session(path, threads), path)
    backbone.provenance[schema.IMAGE_RUNTIME] = f"onnxruntime=={ort.__version__} opset {OPSET}"
    return backbone


def use_onnx_texts(backbone: Backbone, folder: str | Path, threads: int | None = None) -> Backbone:
    """Run the backbone's text tower through ONNX Runtime from now on (CPU): for live queries, where
    it halves the latency of one caption."""
    path = export_text_tower(backbone, Path(folder))
    backbone.text_runtime = OnnxTower(session(path, threads), path)
    return backbone


def attach(backbone: Backbone, runtime: str, device: str, folder: str | Path, notes: list[str],
           texts: bool = False) -> None:
    """The backbone's image tower (and with `texts`, its text tower) on the runtime `runtime` chooses
    for a forward on `device` (see `choose_runtime`), graphs cached in `folder`. Under `auto` a tower
    the exporter cannot express, or a folder that cannot be written, leaves that tower on PyTorch with
    a note; asked for by name (`onnx`) it is a one-line `ValueError`. Towers already on a runtime are
    left as they are."""
    if choose_runtime(runtime, device, notes.append) != "onnx":
        return
    steps = [("image", use_onnx_images, backbone.image_runtime)]
    if texts:
        steps.append(("text", use_onnx_texts, backbone.text_runtime))
    for side, use, current in steps:
        if current is not None:
            continue
        try:
            use(backbone, folder)
        except Exception as e:  # noqa: BLE001 - any exporter failure means: this tower has no ONNX form here
            why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if runtime == "onnx":
                raise Incompatible(f"--runtime onnx: {backbone.name}'s {side} tower could not be run by ONNX Runtime "
                                   f"({why}); use --runtime torch") from None
            notes.append(f"{backbone.name}: {side} tower not run by ONNX Runtime ({why}); encoded with PyTorch")
