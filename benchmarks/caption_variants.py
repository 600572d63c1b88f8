"""Caption robustness, measured: does training on other wordings of each caption help retrieval?

    python benchmarks/caption_variants.py --out features/roco-rad-variants [--features F] [--variants sentences,abbreviations]
    python benchmarks/quality.py --rows concept-texts --features features/roco-rad-variants

Writes a features folder whose train split holds, beside each cached caption, its variants as further
captions of the same image, encoded by the cache's own text tower; valid and test are the source
cache's files (linked), so selection and scoring see the captions as published. Variants:
- sentences: each sentence of a multi-sentence caption on its own (26% of roco-rad's train captions
  have more than one; sentences of fewer than 3 words are left out);
- abbreviations: the caption with common radiology abbreviations written out (CT -> computed
  tomography, MRI -> magnetic resonance imaging, ...), the wording another institution may use.
The second command trains the one-head row on it, 3 seeds, and scores the untouched test split.
"""
from __future__ import annotations

import argparse
import os
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
ROCO = REPO / "features" / "roco-rad" / "effnet-lite0-ms+minilm"
ABBREVIATIONS = {
    "CT": "computed tomography", "MRI": "magnetic resonance imaging", "MR": "magnetic resonance", "US": "ultrasound",
    "USG": "ultrasonography", "CXR": "chest X-ray", "PET": "positron emission tomography",
    "HRCT": "high-resolution computed tomography", "CECT": "contrast-enhanced computed tomography",
    "NCCT": "non-contrast computed tomography", "CTA": "computed tomography angiography",
    "MRA": "magnetic resonance angiography", "AP": "anteroposterior", "PA": "posteroanterior",
    "FLAIR": "fluid-attenuated inversion recovery", "DWI": "diffusion-weighted imaging", "T1": "T1-weighted",
    "T2": "T2-weighted", "OPG": "orthopantomogram",
}
_ABBREVIATION = re.compile(r"\b(" + "|".join(sorted(ABBREVIATIONS, key=len, reverse=True)) + r")\b")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(])")


def written_out(caption: str) -> str:
    return _ABBREVIATION.sub(lambda m: ABBREVIATIONS[m.group(1)], caption)


def sentences(caption: str, min_words: int = 3) -> list[str]:
    """The caption's sentences of at least `min_words` words, when it has more than one."""
    parts = [p.strip() for p in _SENTENCE_END.split(caption.strip()) if len(p.split()) >= min_words]
    return parts if len(parts) > 1 else []


def variants(caption: str, kinds: set[str]) -> list[str]:
    out = list(sentences(caption)) if "sentences" in kinds else []
    if "abbreviations" in kinds and written_out(caption) != caption:
        out.append(written_out(caption))
    return out


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from medembed.cache import schema
    from medembed.cache.reader import load_split
    from medembed.cache.writer import write_split
    from medembed.extract.backbones.registry import create_backbone

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--features", default=str(ROCO))
    p.add_argument("--out", required=True)
    p.add_argument("--variants", default="sentences,abbreviations")
    args = p.parse_args()
    source, out = Path(args.features).resolve(), Path(args.out)
    kinds = set(args.variants.split(","))
    if out.exists():
        raise SystemExit(f"{out}: exists; choose another --out")
    train = load_split(source / schema.split_file("train"))
    captions, images = [], []
    for text, image in zip(train.captions, train.caption_image.tolist()):
        for t in [text, *variants(text, kinds)]:
            captions.append(t)
            images.append(image)
    backbone = create_backbone(train.attrs.get(schema.BACKBONE, source.name))
    features = backbone.encode_texts(captions)
    order = np.argsort(np.asarray(images), kind="stable")  # a cache keeps each image's captions together
    out.mkdir(parents=True)
    write_split(out / schema.split_file("train"), replace(train, captions=[captions[i] for i in order], caption_features=features[order],
                                          caption_image=torch.as_tensor(np.asarray(images)[order])))
    for split in ("valid", "test"):
        (out / schema.split_file(split)).symlink_to(source / schema.split_file(split))
    print(f"{out}: train captions {len(train.captions):,} -> {len(captions):,} ({', '.join(sorted(kinds))})")


if __name__ == "__main__":
    main()
