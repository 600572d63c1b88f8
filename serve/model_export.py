"""`cli.py export-model`: a trained run as a folder that embeds images and captions without medembed.

Two ONNX graphs hold everything learned: the image graph takes the resized views as 8-bit RGB and
does the scaling, normalisation, the backbone's image tower, the run's heads (the ensemble too) and
the L2 norm; the text graph takes the tokenizer's ids and does the text tower, heads and norm. What
stays outside a graph is what a graph cannot do well, written down exactly: resizing and cropping
(`preprocessing.json`, a few lines of Pillow), the tokenizer (`tokenizer.json`, read by Hugging
Face's `tokenizers`), and the query bank (the bank's embeddings as .npy and k/beta per side, a
few lines of numpy). So onnxruntime, numpy, Pillow and tokenizers are all a user needs; the
README's example is run by the tests against medembed's own embeddings.

The folder is written whole or not at all, and an earlier export is replaced only when asked.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from torch import nn

from medembed.adapt.run import describe_run
from medembed.adapt.run_querybank import BankOffsets
from medembed.adapt.valid_heads import valid_source
from medembed.cache import schema
from medembed.cache.reader import load_split, read_attrs
from medembed.common.errors import Incompatible
from medembed.common.files import check_out_folder, folder_state, read_json, replace_folder, staging_folder
from medembed.common.hashing import sha256_file
from medembed.common.locks import exclusive
from medembed.common.ranking import ranks, summarize
from medembed.common.recall_keys import DEFAULT_KS, DIRECTIONS, recall_key
from medembed.common.tensors import unit
from medembed.common.version import __version__
from medembed.extract.backbones.core import Backbone
from medembed.extract.backbones.family import PortableTokenizer
from medembed.extract.backbones.onnx_runtime import (
    OPSET,
    OnnxTower,
    check_agreement,
    export_module,
    exportable_text,
    session,
)
from medembed.extract.backbones.registry import family_of
from medembed.extract.backbones.transforms import Letterbox, Views
from medembed.model.embedding import EmbeddingModel, model_from_run
from medembed.model.runs import open_run, run_backbone

MANIFEST = "medembed-model.json"
IMAGE_GRAPH, TEXT_GRAPH = "image_encoder.onnx", "text_encoder.onnx"
PREPROCESSING, TOKENIZER, QUERYBANK, METRICS, CARD = (
    "preprocessing.json", "tokenizer.json", "querybank.json", "metrics.json", "MODEL_CARD.md")
BANK_FILES = {"images": "querybank_captions.npy", "captions": "querybank_images.npy"}


class NotPortable(Incompatible):
    """Something of the run has no exact form outside medembed (one line, names what)."""


@dataclass
class ModelExportSummary:
    out: str
    dim: int
    files: list[str]
    test: dict[str, float]


# ------------------------------------------------------------------ what stays outside the graphs
def _interpolation(mode) -> str:
    name = getattr(mode, "value", str(mode)).lower()
    if name not in ("bicubic", "bilinear", "nearest"):
        raise NotPortable(f"interpolation {mode} has no portable description")
    return name


def describe_views(backbone: Backbone) -> tuple[list[dict], list[tuple[list[float], list[float]]]]:
    """The backbone's eval preprocessing as portable steps per view ([{kind, ...}]) and each view's
    (mean, std), which the image graph applies. Only steps with an exact Pillow equivalent are
    accepted; anything else is refused in one line rather than approximated."""
    from torchvision import transforms as T

    views = backbone.preprocess.transforms if isinstance(backbone.preprocess, Views) else [backbone.preprocess]
    described, norms = [], []
    for view in views:
        steps = view.transforms if isinstance(view, T.Compose) else [view]
        spec: dict = {}
        norm = None
        for step in steps:
            if isinstance(step, T.Resize):
                size = step.size if isinstance(step.size, int) else (step.size[0] if len(step.size) == 1 else None)
                if size is None or step.max_size is not None:
                    raise NotPortable(f"{backbone.name}: resize to {step.size} has no portable description")
                spec.update(kind="center_crop", resize=int(size), interpolation=_interpolation(step.interpolation))
            elif isinstance(step, T.CenterCrop):
                h, w = step.size if len(step.size) == 2 else (step.size[0], step.size[0])
                if h != w or spec.get("kind") != "center_crop":
                    raise NotPortable(f"{backbone.name}: a centre crop of {step.size} not after a resize")
                if h > spec["resize"]:  # a crop larger than the image pads it, which is not described
                    raise NotPortable(f"{backbone.name}: a centre crop of {h} from a {spec['resize']} resize")
                spec["size"] = int(h)
            elif isinstance(step, Letterbox):
                # Letterbox resizes with bicubic, or bilinear for any other name
                spec.update(kind="letterbox", size=int(step.size), fill=list(step.fill),
                            interpolation="bicubic" if step.interpolation == "bicubic" else "bilinear")
            elif isinstance(step, T.Normalize):
                norm = ([float(v) for v in step.mean], [float(v) for v in step.std])
            elif isinstance(step, T.ToTensor) or "rgb" in getattr(step, "__name__", "").lower():
                continue  # 0-255 -> 0-1 is in the graph; RGB is what the example opens
            else:
                raise NotPortable(f"{backbone.name}: preprocessing step {step!r} has no portable description")
        if "size" not in spec or norm is None:
            raise NotPortable(f"{backbone.name}: a view without a fixed size and normalisation ({view!r})")
        described.append(spec)
        norms.append(norm)
    return described, norms


class ImageEncoder(nn.Module):
    """8-bit RGB views [B, V, H, W, 3] -> the run's unit image embeddings [B, D]."""

    def __init__(self, tower: nn.Module, head: nn.Module, norms: list[tuple[list[float], list[float]]],
                 multiview: bool):
        super().__init__()
        self.tower, self.head, self.multiview = tower, head, multiview
        self.register_buffer("mean", torch.tensor([m for m, _ in norms])[None, :, :, None, None])
        self.register_buffer("std", torch.tensor([s for _, s in norms])[None, :, :, None, None])

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        x = (views.permute(0, 1, 4, 2, 3).float() / 255.0 - self.mean) / self.std
        return unit(self.head(self.tower(x if self.multiview else x[:, 0])))


class TextEncoder(nn.Module):
    """Token ids (and mask, types) [B, L] -> the run's unit caption embeddings [B, D]."""

    def __init__(self, tower: nn.Module, head: nn.Module):
        super().__init__()
        self.tower, self.head = tower, head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        given = {k: v for k, v in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids))
                 if v is not None}
        return unit(self.head(self.tower(input_ids, **given)))


def _tokenizer(backbone: Backbone) -> PortableTokenizer:
    """The tokenizer's portable form, as the backbone's family gives it (`BackboneFamily.portable_tokenizer`)."""
    family = family_of(backbone)
    tok = family.portable_tokenizer(backbone) if family is not None and family.portable_tokenizer else None
    if tok is None:
        raise NotPortable(f"{backbone.name}: its tokenizer ({type(backbone.tokenize).__name__}) has no tokenizer.json "
                          "form; export-model needs a Hugging Face fast tokenizer")
    return tok


# ------------------------------------------------------------------ the export
def export_model(run_ref: str | Path, out: str | Path, overwrite: bool = False) -> ModelExportSummary:
    """Write the run's image and text encoders, preprocessing, tokenizer, query bank, metrics and a
    model card into `out` (a new folder, or an earlier export with `overwrite`)."""
    run = open_run(run_ref)
    out = Path(out)
    check_out_folder(out, overwrite, MANIFEST, "model export", elsewhere="")
    backbone = run_backbone(run)
    tok = _tokenizer(backbone)  # refusals first, before anything is computed
    views, norms = describe_views(backbone)
    with exclusive(out, "export-model"):
        check_out_folder(out, overwrite, MANIFEST, "model export", elsewhere="")
        expected = folder_state(out)
        work = staging_folder(out)
        try:
            summary = _write(run, backbone, views, norms, tok, work)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)  # a failed export leaves nothing half-written behind
            raise
        replace_folder(work, out, expected)
    summary.out = str(out)
    return summary


def _write(run, backbone: Backbone, views: list[dict], norms, tok: PortableTokenizer,
           work: Path) -> ModelExportSummary:
    backbone.to("cpu")
    run.image_head.cpu().eval()
    run.text_head.cpu().eval()
    multiview = isinstance(backbone.preprocess, Views)
    size = views[0]["size"]
    image = ImageEncoder(backbone.image_model.eval(), run.image_head, norms, multiview).eval()
    example = torch.full((1, len(views), size, size, 3), 128, dtype=torch.uint8)
    probe = torch.randint(0, 256, (2, len(views), size, size, 3), generator=torch.Generator().manual_seed(0),
                          dtype=torch.uint8)
    export_module(image, {"views": example}, work / IMAGE_GRAPH, {"views": {0: "batch"}}, output="embedding")
    check_agreement(_graph(work / IMAGE_GRAPH), image, [{"views": example}, {"views": probe}], work / IMAGE_GRAPH)

    text = TextEncoder(exportable_text(backbone), run.text_head).eval()
    probes = [backbone.tokenize(["CT", "Axial contrast-enhanced CT of the abdomen showing a lesion in the liver"]),
              backbone.tokenize(["x-ray"])]
    names = list(probes[0])
    export_module(text, probes[0], work / TEXT_GRAPH, {k: {0: "batch", 1: "tokens"} for k in names},
                  output="embedding")
    # checked against the tower itself (not only the form exported) with the run's heads on top
    check_agreement(_graph(work / TEXT_GRAPH), TextEncoder(backbone.text_model.eval(), run.text_head).eval(), probes,
                    work / TEXT_GRAPH)
    tok.save(work / TOKENIZER)

    decoding = _decoding(run)
    spec = {
        "image": {"input": "views", "dtype": "uint8", "layout": "[batch, views, height, width, RGB]",
                  "views": views, "decoding": decoding,
                  "note": "each view is made from the same RGB image; scaling to 0-1 and normalising are in the graph"},
        "text": {"inputs": names, "dtype": "int64", "max_length": tok.max_length, "padding": "longest in batch",
                 "pad_id": tok.pad_id},
        "output": {"name": "embedding", "dim": run.dim, "normalised": "L2, so a dot product is the cosine"},
    }
    (work / PREPROCESSING).write_text(json.dumps(spec, indent=2) + "\n")

    model = model_from_run(run)  # its query bank's embeddings are computed once, for the banks and the metrics
    bank = _write_querybank(model.gallery_offsets, work)
    metrics = _metrics(run, model)
    (work / METRICS).write_text(json.dumps(metrics, indent=2) + "\n")
    (work / CARD).write_text(model_card(run, backbone, metrics, bank, decoding, tok.max_length))
    files = sorted(p.name for p in work.iterdir())
    manifest = {
        "format": "medembed-model", "format_version": 1, "toolkit_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"), "run": Path(run.run_dir).name,
        "describe": describe_run(run), "backbone": backbone.name, "dim": run.dim, "opset": OPSET,
        "torch": torch.__version__, "backbone_provenance": {k: v for k, v in backbone.provenance.items()
                                                            if k != schema.IMAGE_RUNTIME},
        "files": {name: sha256_file(work / name) for name in files},
    }
    (work / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return ModelExportSummary(out="", dim=run.dim, files=[*files, MANIFEST], test=metrics.get("test", {}))


def _graph(path: Path) -> OnnxTower:
    return OnnxTower(session(path), path)


def _decoding(run) -> str:
    """How the run's training images were decoded before resizing (DICOM/NIfTI windows), as recorded."""
    files = run.split_files()
    attrs = read_attrs(next(iter(files.values()))) if files else {}
    return str(attrs.get(schema.IMAGE_DECODING) or "8-bit images converted to RGB as they are; 16-bit PNG/TIFF, DICOM "
               "and NIfTI windowed to 8 bits first (DICOM: the file's own VOI LUT or window, else the 0.5-99.5th "
               "percentiles of its values, MONOCHROME1 inverted; 16-bit PNG/TIFF: those percentiles), as medembed "
               "decodes them")


def _write_querybank(offsets: BankOffsets | None, work: Path) -> dict | None:
    if offsets is None:
        record = {"ranking": "plain cosine", "sides": {}}
        (work / QUERYBANK).write_text(json.dumps(record, indent=2) + "\n")
        return None
    setting = offsets.setting
    record = {"ranking": setting.describe(), "bank_split": setting.bank_split, "sides": {}}
    for side, bank in (("images", offsets.bank_captions), ("captions", offsets.bank_images)):
        s = getattr(setting, side)
        if not s.active:
            continue
        np.save(work / BANK_FILES[side], bank().numpy().astype(np.float32))
        record["sides"][side] = {"k": s.k, "beta": s.beta, "bank": BANK_FILES[side],
                                 "gallery": "images, for text queries" if side == "images"
                                 else "captions, for image queries"}
    record["formula"] = ("score(query, item) = cos(query, item) - beta * mean of the k largest cos(item, bank row)")
    (work / QUERYBANK).write_text(json.dumps(record, indent=2) + "\n")
    return record


def _metrics(run, model: EmbeddingModel) -> dict:
    """The run's recall on valid (from training) and on its test split, ranked by `model` (the run's,
    with its query bank) as `cli.py eval` ranks."""
    summary_path = Path(run.run_dir) / "summary.json"
    out: dict = {"ranking": model.ranking}
    if summary_path.exists():
        summary = read_json(summary_path)
        out["dataset"] = _dataset_name(run)
        out["n_train_pairs"] = summary.get("n_train_pairs")
        out["valid"] = {k: v for k, v in (summary.get("querybank", {}).get("valid") or summary.get("valid", {})).items()
                        if "R@" in k}
        source = valid_source(run.run_dir, summary)
        out["valid_heads"], out["valid_held_out"] = source.heads, source.held_out
    files = run.split_files()
    if "test" in files:
        test = load_split(files["test"], with_views=False)
        img, txt = model.images(test.image_features), model.texts(test.caption_features)
        image_offset, caption_offset = model.offsets(img, txt)
        scored = summarize(ranks(img, txt, test.caption_image, image_offset=image_offset, caption_offset=caption_offset))
        out["test"] = {k: float(v) for k, v in scored.items()}
    return out


def _dataset_name(run) -> str:
    return Path(str(run.features_dir)).parent.name


def _recall_lines(test: dict) -> list[str]:
    lines = [f"| {direction} | R@{k} | {test[recall_key(d, k)]:.1f} | {test[recall_key(d, k) + '_ci_low']:.1f} - "
             f"{test[recall_key(d, k) + '_ci_high']:.1f} |"
             for d, direction in zip(DIRECTIONS, ("text -> image", "image -> text")) for k in DEFAULT_KS]
    return ["| direction | metric | % | 95% interval |", "|---|---|---|---|", *lines]


def model_card(run, backbone: Backbone, metrics: dict, bank: dict | None, decoding: str, max_length: int) -> str:
    """What the exported model is, what it was trained on, what it is for and how well it retrieves."""
    p = backbone.provenance
    test = metrics.get("test")
    lines = [
        f"# Model card: {Path(run.run_dir).name}",
        "",
        f"Image and caption encoders exported by medembed {__version__}: projection heads ({describe_run(run)}"
        f"{', an ensemble of ' + str(run.config.get('ensemble')) if int(run.config.get('ensemble', 1)) > 1 else ''}) "
        f"trained on features of `{backbone.name}` ({p.get('image_model', '?')}; {p.get('text_model', '?')}). "
        f"Both encoders map into one {run.dim}-d space with unit-length embeddings, so a dot product is a cosine.",
        "",
        "## Intended use",
        "",
        "Research on medical image-text retrieval: finding figures for a text query, captions for an image, "
        "and similar images, in collections like the one it was trained on. **Not for diagnosis, triage or any "
        "clinical decision.** It has not been validated prospectively, on other institutions' images, or on "
        "patient subgroups; its errors are not calibrated probabilities.",
        "",
        "## Training data",
        "",
        f"Dataset `{metrics.get('dataset', '?')}`: its train split ({metrics.get('n_train_pairs', '?')} training "
        "pairs, captions and, where the run used them, concept names as extra texts); settings chosen on its valid "
        "split. Images decoded as: " + decoding + ".",
        "",
        "## Retrieval quality",
        "",
    ]
    if test:
        lines += [f"Test split of the same dataset, pool of {int(test['pool_images'])} images and "
                  f"{int(test['pool_captions'])} captions, ranked with {metrics['ranking']}. Intervals: 95% "
                  "bootstrap over queries.", "", *_recall_lines(test), ""]
        lines += ["Recall@K depends on the pool: on a larger pool the same model scores lower at the same K.", ""]
    else:
        lines += ["The run's features have no test split: no test recall is reported.", ""]
    valid = metrics.get("valid") or {}
    if all(recall_key(d, k) in valid for d in DIRECTIONS for k in DEFAULT_KS):
        heads = {"selection": "the heads valid chose, before the refit on train + valid"}.get(
            metrics.get("valid_heads", ""), "the exported heads")
        held = ("" if metrics.get("valid_held_out", True) else
                " Not held out: these heads learned from valid pairs, so this says nothing of unseen data.")
        lines += [f"Valid split (where settings were chosen; measured with {heads}).{held} R@1 / R@5 / R@10: "
                  "text -> image " + " / ".join(
            f"{valid[recall_key('t2i', k)]:.1f}" for k in DEFAULT_KS) + ", image -> text " + " / ".join(
            f"{valid[recall_key('i2t', k)]:.1f}" for k in DEFAULT_KS) + ".", ""]
    lines += [
        "## How to use",
        "",
        f"`{PREPROCESSING}` says how an RGB image becomes the image graph's input views and how captions are "
        f"tokenized (`{TOKENIZER}`, read with the `tokenizers` package). The README of medembed has a complete "
        "example with onnxruntime, numpy, Pillow and tokenizers only.",
        "",
    ]
    if bank:
        lines += ["Ranking: " + bank["ranking"] + ". " + bank["formula"] + f"; the banks are in {QUERYBANK}'s "
                  "files (unit embeddings of the training split). Plain cosine ranking is also valid, slightly less "
                  "accurate on data like the training set.", ""]
    lines += [
        "## Limitations",
        "",
        f"English captions, at most {max_length} word pieces (longer ones are cut). Trained on figures from published articles; archive images look different. General-domain "
        "backbones (not trained on medical images) with learned projection heads.",
        "",
    ]
    return "\n".join(lines)
