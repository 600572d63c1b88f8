"""Fixtures shared by the test modules: real-data locations and a tiny dataset made on the fly."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the key private image ids are made with: one per test session, never the user's own (extract.path_key)
os.environ.setdefault("MEDEMBED_PATH_KEY_FILE", os.path.join(tempfile.mkdtemp(prefix="medembed-test-key-"), "path-key"))

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def shared_dataset(name: str) -> Path:
    """A real dataset beside the repo, or a clean skip saying why."""
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"real dataset {path} is absent (it lives in ../shared/data beside the repo root)")
    return path


def make_imageclef2023(root: Path, n_per_split: dict[str, int], size: int = 48, seed: int = 0) -> Path:
    """Tiny ImageCLEFmedical-2023 folder: coloured squares whose captions name the colour."""
    rng = np.random.default_rng(seed)
    colours = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "grey": (128, 128, 128)}
    cuis = {"red": "C0000001", "green": "C0000002", "blue": "C0000003", "grey": "C0000004"}
    (root / "images").mkdir(parents=True, exist_ok=True)
    k = 0
    for split, n in n_per_split.items():
        cap_lines, con_lines = ["ID,Caption"], ["ID,CUIs"]
        for _ in range(n):
            name = list(colours)[k % len(colours)]
            arr = np.clip(np.array(colours[name])[None, None] + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
            image_id = f"IMG_{k:05d}"
            Image.fromarray(arr).save(root / "images" / f"{image_id}.jpg", quality=90)
            cap_lines.append(f'{image_id},"A {name} square, case {k}."')
            con_lines.append(f"{image_id},{cuis[name]};C0009999")
            k += 1
        (root / f"{split}_captions.csv").write_text("\n".join(cap_lines) + "\n")
        (root / f"{split}_concepts.csv").write_text("\n".join(con_lines) + "\n")
    names = ["CUI,Canonical name"] + [f"{c},{n} colour" for n, c in cuis.items()]
    (root / "cui_names.csv").write_text("\n".join(names) + "\n")
    return root


def tiny_clip_cache(root: Path, n_per_split: dict[str, int], data_name: str = "data") -> Path:
    """`make_imageclef2023` under root/data_name, extracted with the tiny random tiny-clip backbone
    into root/features; returns the cache folder."""
    from medembed.extract.extraction import ExtractConfig, extract

    data = make_imageclef2023(root / data_name, n_per_split)
    summary = extract(ExtractConfig(data=str(data), backbone="tiny-clip", out=str(root / "features"), workers=0,
                                    progress=False, batch_size=16))
    return Path(summary.out_dir)


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Path:
    return make_imageclef2023(tmp_path / "tiny", {"train": 24, "valid": 8})


def real_cache(dataset: str) -> Path:
    """Features of a real dataset with the default backbone in the repo's features/ folder.

    Extracted on first use (CI starts from a clean clone) and reused afterwards: the extraction
    is resumable and a finished split is reported up to date, so this costs nothing the second time.
    """
    from medembed.cache.schema import split_file
    from medembed.extract.backbones import DEFAULT_BACKBONE
    from medembed.extract.extraction import ExtractConfig, cache_dir, extract

    data = shared_dataset(dataset)
    folder = cache_dir(REPO / "features", dataset, DEFAULT_BACKBONE)
    if not all((folder / split_file(s)).exists() for s in ("train", "valid", "test")):
        extract(ExtractConfig(data=str(data), out=str(REPO / "features"), progress=False))
    return folder


@pytest.fixture(scope="session")
def roco_linear_run(tmp_path_factory) -> Path:
    """A linear-head run (the other defaults, 4 heads, without the refit: its valid recall is guarded)
    on the real roco-rad cache, trained once for the session: tests/test_adapt_real.py guards its
    recall, the search page's browser test serves it."""
    from medembed.adapt.config import AdaptConfig
    from medembed.adapt.trainer import train

    out = tmp_path_factory.mktemp("roco-linear") / "run"
    train(AdaptConfig(features_dir=str(real_cache("roco-rad")), out=str(out), head="linear", refit=False),
          progress=False)
    return out


@pytest.fixture(scope="session")
def roco_default_run(tmp_path_factory) -> Path:
    """`cli.py adapt` with every default (the refit on train + valid included) on the real roco-rad cache,
    trained once for the session:
    tests/test_evaluate_real.py guards its quality, tests/test_model_export.py exports it. Tests
    that use it write elsewhere (their own --out), never into the run."""
    from click.testing import CliRunner

    from medembed.cli import main

    out = tmp_path_factory.mktemp("roco-default") / "run"
    res = CliRunner().invoke(main, ["adapt", "--features", str(real_cache("roco-rad")), "--out", str(out)])
    assert res.exit_code == 0, res.output
    return out
