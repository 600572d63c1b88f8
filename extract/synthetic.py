"""Synthetic "phantom scans": a default dataset that needs no download and carries no licence.

Every pipeline stage must be runnable on a fresh machine, and every test of retrieval quality needs
data where the right answer is known. The phantoms give both: each image is drawn from a handful of
attributes (modality, organ, number, position and appearance of lesions) and its caption and concepts
are written from the same attributes, so text and image agree by construction and a retrieval model
has something real to learn. Output is bit-identical for a given seed (numpy's PCG64 streams and PIL's
PNG encoder only), so cached features and reported numbers can be reproduced exactly.
"""
from __future__ import annotations

import csv
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from medembed.common.errors import BadOption
from medembed.extract.datasets import SYNTHETIC_MARKER

DEFAULT_NAME = "synthetic-phantoms"
GENERATOR_VERSION = 2

MODALITIES = ("CT", "MRI", "x-ray", "ultrasound")
ORGANS = ("brain", "lungs", "kidney", "liver")
POSITIONS = ("left", "right", "upper", "lower")

# Real UMLS CUIs for the modalities; SYN ids for everything the phantoms invent.
CONCEPTS: dict[str, str] = {
    "C0040405": "X-Ray Computed Tomography",
    "C0024485": "Magnetic Resonance Imaging",
    "C0041618": "Ultrasonography",
    "C1306645": "Plain x-ray",
    "SYN0001": "Brain (phantom)",
    "SYN0002": "Lungs (phantom)",
    "SYN0003": "Kidney (phantom)",
    "SYN0004": "Liver (phantom)",
    "SYN0010": "No focal lesion",
    "SYN0011": "Single lesion",
    "SYN0012": "Two lesions",
    "SYN0013": "Three lesions",
    "SYN0020": "Left-sided lesion",
    "SYN0021": "Right-sided lesion",
    "SYN0022": "Upper lesion",
    "SYN0023": "Lower lesion",
    "SYN0030": "Bright lesion (hyperdense, hyperintense or hyperechoic)",
    "SYN0031": "Dark lesion (hypodense, hypointense or hypoechoic)",
}
MODALITY_CUI = {"CT": "C0040405", "MRI": "C0024485", "ultrasound": "C0041618", "x-ray": "C1306645"}
ORGAN_CUI = {"brain": "SYN0001", "lungs": "SYN0002", "kidney": "SYN0003", "liver": "SYN0004"}
COUNT_CUI = ("SYN0010", "SYN0011", "SYN0012", "SYN0013")
POSITION_CUI = {"left": "SYN0020", "right": "SYN0021", "upper": "SYN0022", "lower": "SYN0023"}
BRIGHT_CUI = {True: "SYN0030", False: "SYN0031"}

SPLIT_FRACTIONS = (("train", 0.70), ("valid", 0.15), ("test", 0.15))


@dataclass(frozen=True)
class Phantom:
    """What one image shows; caption, concepts and pixels are all derived from it."""

    image_id: str
    modality: str
    organ: str
    n_lesions: int
    position: str
    bright: bool

    def concepts(self) -> list[str]:
        out = [MODALITY_CUI[self.modality], ORGAN_CUI[self.organ], COUNT_CUI[self.n_lesions]]
        if self.n_lesions:
            out += [POSITION_CUI[self.position], BRIGHT_CUI[self.bright]]
        return out


# ----------------------------------------------------------------------------------------------- captions

_MODALITY_WORDS = {
    "CT": ("Axial CT", "CT scan", "Computed tomography", "Contrast-enhanced CT"),
    "MRI": ("Axial MRI", "T2-weighted MRI", "MR image", "Magnetic resonance imaging"),
    "x-ray": ("Plain radiograph", "X-ray", "Frontal radiograph", "Plain film x-ray"),
    "ultrasound": ("Ultrasound", "Sonography", "B-mode ultrasound", "Ultrasound image"),
}
_REGION_WORDS = {
    "brain": ("head", "brain"),
    "lungs": ("chest", "thorax"),
    "kidney": ("abdomen", "flank"),
    "liver": ("abdomen", "upper abdomen"),
}
_ORGAN_NOUN = {"brain": "brain", "lungs": "lung", "kidney": "kidney", "liver": "liver"}
_LESION_NOUNS = {
    "brain": ("lesion", "mass"),
    "lungs": ("nodule", "lesion"),
    "kidney": ("cyst", "lesion"),
    "liver": ("lesion", "mass"),
}
_APPEARANCE = {
    "CT": ("hyperdense", "hypodense"),
    "MRI": ("hyperintense", "hypointense"),
    "x-ray": ("radiopaque", "lucent"),
    "ultrasound": ("hyperechoic", "hypoechoic"),
}
_COUNT_WORDS = {1: ("a single", "one"), 2: ("two", "2"), 3: ("three", "3")}


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def _mid_sentence(phrase: str) -> str:
    """'Axial CT' -> 'axial CT' but 'CT scan' and 'T2-weighted MRI' unchanged."""
    return phrase[0].lower() + phrase[1:] if phrase[1:2].islower() else phrase


def _plural(noun: str) -> str:
    """mass -> masses, lesion -> lesions, cyst -> cysts, nodule -> nodules."""
    return noun + ("es" if noun.endswith(("s", "sh", "ch", "x")) else "s")


def write_caption(p: Phantom, rng: np.random.Generator) -> str:
    """One of several phrasings, all naming modality, organ and (if any) lesion count, side and look."""
    modality = _pick(rng, _MODALITY_WORDS[p.modality])
    region = _pick(rng, _REGION_WORDS[p.organ])
    organ = _ORGAN_NOUN[p.organ]
    if p.n_lesions == 0:
        templates = (
            f"{modality} of the {region} showing a normal {organ} without focal lesions.",
            f"No focal lesion in the {organ} on {_mid_sentence(modality)}.",
            f"{modality} of the {region}: unremarkable {organ}, no lesion.",
        )
        return _pick(rng, templates)
    noun = _plural(_pick(rng, _LESION_NOUNS[p.organ])) if p.n_lesions > 1 else _pick(rng, _LESION_NOUNS[p.organ])
    count = _pick(rng, _COUNT_WORDS[p.n_lesions])
    look = _APPEARANCE[p.modality][0 if p.bright else 1]
    where = f"{p.position} {organ}"
    templates = (
        f"{modality} of the {region} showing {count} {look} {noun} in the {where}.",
        f"{count.capitalize()} {look} {noun} in the {where} on {_mid_sentence(modality)}.",
        f"{modality} of the {region} demonstrates {count} {look} {noun}, {p.position} side of the {organ}.",
        f"{p.position.capitalize()} {organ}: {count} {look} {noun} ({modality}).",
    )
    return _pick(rng, templates)


# ------------------------------------------------------------------------------------------------- pixels


def _ellipse(u: np.ndarray, v: np.ndarray, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    return ((u - cx) / rx) ** 2 + ((v - cy) / ry) ** 2 <= 1.0


def _organ_mask(organ: str, u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The organ's silhouette in [-1, 1] coordinates (v grows downwards), jittered per image."""
    dx, dy = rng.uniform(-0.05, 0.05, 2)
    s = rng.uniform(0.9, 1.1)
    u, v = (u - dx) / s, (v - dy) / s
    if organ == "brain":
        return _ellipse(u, v, 0, 0, 0.52, 0.62)
    if organ == "lungs":
        return _ellipse(u, v, -0.33, 0, 0.24, 0.5) | _ellipse(u, v, 0.33, 0, 0.24, 0.5)
    if organ == "kidney":  # bean: an ellipse with the hilum bitten out
        return _ellipse(u, v, 0, 0, 0.3, 0.5) & ~_ellipse(u, v, 0.3, 0, 0.16, 0.18)
    # liver: wedge, broad on the image's left (patient's right), tapering to the right
    return _ellipse(u, v, -0.05, 0, 0.62, 0.48) & (v + 0.7 * u < 0.3)


def _lesion_centres(p: Phantom, organ: np.ndarray, u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> list:
    """Lesion centres inside the organ on the named side. Radiological convention: the patient's
    left is on the image's right."""
    if not p.n_lesions:
        return []
    ys, xs = np.nonzero(organ)
    cu, cv = u[ys, xs].mean(), v[ys, xs].mean()
    side = {
        "left": u[ys, xs] > cu + 0.08,
        "right": u[ys, xs] < cu - 0.08,
        "upper": v[ys, xs] < cv - 0.08,
        "lower": v[ys, xs] > cv + 0.08,
    }[p.position]
    # keep lesions off the organ's rim so they read as "inside"
    inner = organ & np.roll(organ, 4, 0) & np.roll(organ, -4, 0) & np.roll(organ, 4, 1) & np.roll(organ, -4, 1)
    pool = np.flatnonzero(side & inner[ys, xs]) if np.any(side & inner[ys, xs]) else np.flatnonzero(side)
    centres: list[tuple[float, float]] = []
    for _ in range(p.n_lesions):
        best = None
        for _attempt in range(8):  # prefer separated lesions so the count is visible
            k = pool[int(rng.integers(len(pool)))]
            c = (float(u[ys[k], xs[k]]), float(v[ys[k], xs[k]]))
            best = c
            if all((c[0] - a) ** 2 + (c[1] - b) ** 2 > 0.2**2 for a, b in centres):
                break
        centres.append(best)
    return centres


# (background, body, solid organ, lungs, lesion contrast) per modality, in [0, 1]. Organ levels stay
# within [0.3, 0.7] so that both bright and dark lesions remain visible against them.
_TISSUE = {
    "CT": (0.02, 0.45, 0.68, 0.30, 0.30),
    "MRI": (0.05, 0.30, 0.75, 0.50, 0.28),
    "x-ray": (0.08, 0.45, 0.65, 0.30, 0.32),
    "ultrasound": (0.0, 0.45, 0.30, 0.65, 0.35),
}


def render(p: Phantom, size: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 greyscale image of the phantom."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    u = (xs + 0.5) / size * 2 - 1
    v = (ys + 0.5) / size * 2 - 1
    background, body_level, solid_level, lung_level, lesion_contrast = _TISSUE[p.modality]
    organ_level = lung_level if p.organ == "lungs" else solid_level
    organ = _organ_mask(p.organ, u, v, rng)
    img = np.full((size, size), background, np.float32)

    if p.modality in ("CT", "MRI"):
        body = _ellipse(u, v, 0, 0.02, 0.88, 0.78)
        rim = body & ~_ellipse(u, v, 0, 0.02, 0.82, 0.72)
        img[body] = body_level
        img[rim] = body_level + (0.35 if p.modality == "MRI" else -0.12)  # fat: bright on MRI, dark on CT
    elif p.modality == "x-ray":
        body = np.abs(u) < 0.85
        img[body] = body_level
        ribs = (np.sin((v + 0.3 * u**2) * 18) > 0.6) & body & (np.abs(u) > 0.12)
        img[ribs] += 0.25
        img[np.abs(u) < 0.1] = 0.8  # spine
    else:  # ultrasound: a sector from a probe at the top edge
        r = np.hypot(u, v + 1.1)
        angle = np.arctan2(u, v + 1.1)
        body = (np.abs(angle) < 0.7) & (r > 0.3) & (r < 2.0)
        img[body] = body_level

    img[organ & body] = organ_level
    if p.organ == "brain" and p.modality in ("CT", "MRI"):
        img[organ & (np.abs(u - u[organ].mean()) < 0.015)] = body_level  # interhemispheric fissure

    sign = 1.0 if p.bright else -1.0
    for cu, cv in _lesion_centres(p, organ, u, v, rng):
        radius = rng.uniform(0.07, 0.11)
        d2 = ((u - cu) ** 2 + (v - cv) ** 2) / radius**2
        img += sign * lesion_contrast * np.exp(-(d2**2)) * body

    if p.modality == "CT":
        img += rng.normal(0, 0.035, img.shape).astype(np.float32) * body
    elif p.modality == "MRI":
        img *= 1 + 0.15 * u  # coil bias field
        img += rng.normal(0, 0.012, img.shape).astype(np.float32) * body
    elif p.modality == "x-ray":
        img += rng.normal(0, 0.02, img.shape).astype(np.float32)
    else:
        img *= rng.rayleigh(0.8, img.shape).astype(np.float32) * body
    out = Image.fromarray((np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8), mode="L")
    blur = {"CT": 0.6, "MRI": 1.4, "x-ray": 1.8, "ultrasound": 0.8}[p.modality]
    return np.asarray(out.filter(ImageFilter.GaussianBlur(blur)))


# ------------------------------------------------------------------------------------------------ dataset


def plan_phantoms(n_images: int, seed: int) -> list[tuple[str, Phantom]]:
    """(split, phantom) for every image; attributes balanced-random, splits ~70/15/15 in id order."""
    rng = np.random.default_rng([seed, 0])
    cuts = np.cumsum([round(f * n_images) for _, f in SPLIT_FRACTIONS[:-1]])
    order = rng.permutation(n_images)
    split_of = np.empty(n_images, dtype=object)
    for i, position in enumerate(order):
        split_of[position] = "train" if i < cuts[0] else "valid" if i < cuts[1] else "test"
    planned = []
    for i in range(n_images):
        phantom = Phantom(
            image_id=f"PHANTOM_{i + 1:05d}",
            modality=MODALITIES[int(rng.integers(len(MODALITIES)))],
            organ=ORGANS[int(rng.integers(len(ORGANS)))],
            n_lesions=int(rng.integers(4)),
            position=POSITIONS[int(rng.integers(len(POSITIONS)))],
            bright=bool(rng.integers(2)),
        )
        planned.append((str(split_of[i]), phantom))
    return planned


def make_phantoms(out_dir: Path, n_images: int = 480, size: int = 160, seed: int = 0) -> Path:
    """Write the phantom dataset (imageclef2023 layout) into out_dir; same arguments, same bytes."""
    if n_images < 3:
        raise BadOption(f"n_images must be at least 3 (one per split), got {n_images}")
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    (out_dir / SYNTHETIC_MARKER).unlink(missing_ok=True)  # incomplete until rewritten at the end
    for old in (out_dir / "images").glob("PHANTOM_*.png"):  # a previous, larger generation
        old.unlink()
    rows: dict[str, list[tuple[str, str, str]]] = {s: [] for s, _ in SPLIT_FRACTIONS}
    for index, (split, phantom) in enumerate(plan_phantoms(n_images, seed)):
        rng = np.random.default_rng([seed, 1, index])
        pixels = render(phantom, size, rng)
        Image.fromarray(pixels, mode="L").save(out_dir / "images" / f"{phantom.image_id}.png")
        rows[split].append((phantom.image_id, write_caption(phantom, rng), ";".join(phantom.concepts())))
    for split, split_rows in rows.items():
        _write_csv(out_dir / f"{split}_captions.csv", ("ID", "Caption"), [(i, c) for i, c, _ in split_rows])
        _write_csv(out_dir / f"{split}_concepts.csv", ("ID", "CUIs"), [(i, k) for i, _, k in split_rows])
    _write_csv(out_dir / "cui_names.csv", ("CUI", "Canonical name"), list(CONCEPTS.items()))
    (out_dir / "README.md").write_text(_readme(n_images, size, seed, {s: len(r) for s, r in rows.items()}))
    # written last: its presence means the folder is complete
    (out_dir / SYNTHETIC_MARKER).write_text(f"generator_version={GENERATOR_VERSION}\nn_images={n_images}\nsize={size}\nseed={seed}\n")
    return out_dir


def _write_csv(path: Path, header: tuple[str, str], rows: list[tuple[str, str]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def default_dataset_dir() -> Path:
    return Path.cwd() / "data" / DEFAULT_NAME


def is_complete(folder: Path, n_images: int = 480, size: int = 160, seed: int = 0) -> bool:
    """Finished by the same generator with the same arguments, and no image deleted since."""
    marker = folder / SYNTHETIC_MARKER
    expected = f"generator_version={GENERATOR_VERSION}\nn_images={n_images}\nsize={size}\nseed={seed}\n"
    try:
        if marker.read_text() != expected:
            return False
        present = sum(1 for e in os.scandir(folder / "images") if e.name.endswith(".png"))
    except OSError:
        return False
    needed = ["cui_names.csv"] + [f"{s}_{kind}.csv" for s, _ in SPLIT_FRACTIONS for kind in ("captions", "concepts")]
    return present == n_images and all((folder / n).is_file() for n in needed)


def ensure_default_dataset(folder: Path | None = None) -> Path:
    """The default dataset's folder, generated first if missing or incomplete.

    Generated beside its final place and renamed in one step, so a crash or a concurrent run never
    leaves a half-written folder that looks finished.
    """
    folder = Path(folder) if folder is not None else default_dataset_dir()
    if is_complete(folder):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        make_phantoms(staging)
        if is_complete(folder):  # another process finished while this one was generating
            return folder
        if folder.exists():
            stale = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
            os.replace(folder, stale / folder.name)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(staging, folder)
        except OSError:
            if not is_complete(folder):  # someone else finished first: theirs is as good as ours
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _readme(n_images: int, size: int, seed: int, counts: dict[str, int]) -> str:
    concept_lines = "\n".join(f"| {cui} | {name} |" for cui, name in CONCEPTS.items())
    return f"""# synthetic-phantoms: SYNTHETIC phantom scans (not patient data)

**Every image in this folder is SYNTHETIC**, drawn by `extract/synthetic.py` from random attributes.
No image shows a real patient, and none of it may be used to judge clinical performance.
It exists so the toolkit runs end to end with no download, and so retrieval can be checked on
data where the right answer is known.

- images: {n_images} greyscale PNG, {size}x{size} pixels; splits train {counts['train']} /
  valid {counts['valid']} / test {counts['test']}
- generator: `make_phantoms(n_images={n_images}, size={size}, seed={seed})`, version {GENERATOR_VERSION};
  the same arguments give byte-identical files
- layout: ImageCLEFmedical 2023 (`{{split}}_captions.csv`, `{{split}}_concepts.csv`, `cui_names.csv`, `images/`)
- licence: CC0 (generated data)

## What an image shows
A modality style (CT: grey body with noise; MRI: brighter, smooth, with a bias field; x-ray: spine and
ribs, air dark; ultrasound: a speckled fan-shaped sector), an organ silhouette (round brain, two-lobed
lungs, bean-shaped kidney, wedge-shaped liver) and 0 to 3 bright or dark lesions on one side of the organ.
Left and right follow the radiological convention: the patient's left is on the image's right.
The caption and the concepts of an image are written from the same attributes, in varied phrasings.

## Concepts
Modalities carry real UMLS CUIs; every `SYN` id is made up for this dataset.

| CUI | Canonical name |
|-----|----------------|
{concept_lines}
"""
