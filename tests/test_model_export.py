"""`cli.py export-model`: the README's example, run with medembed and PyTorch unimportable, embeds a
dozen real roco-rad images and captions exactly as medembed does; the folder's metrics equal
`cli.py eval`'s; outputs are never replaced silently; what has no portable form is refused in one line."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from medembed.adapt.config import AdaptConfig
from medembed.adapt.run_querybank import bank_offsets
from medembed.adapt.trainer import train
from medembed.cli import main
from medembed.extract.datasets import load_dataset
from medembed.serve.model_export import export_model
from medembed.serve.search import Searcher
from tests.conftest import shared_dataset, tiny_clip_cache

REPO = Path(__file__).resolve().parents[1]

# the example must run where only onnxruntime, numpy, Pillow and tokenizers are installed
BLOCKER = '''
import sys
class _Unavailable:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"medembed", "torch", "torchvision", "transformers", "open_clip", "sklearn"}:
            raise ImportError(f"{name} is not installed here")
sys.meta_path.insert(0, _Unavailable())
'''


def readme_export_example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    (code,) = [b for b in blocks if "image_encoder.onnx" in b]
    return code


@pytest.fixture(scope="module")
def roco_run(roco_default_run):
    """The session's run of the default recipe (4 MLP heads, concept texts, query bank) on the real
    roco-rad cache (tests/conftest.py): what is checked is that the export reproduces it."""
    return roco_default_run


@pytest.mark.slow
def test_the_readme_example_embeds_as_medembed_does_without_medembed(roco_run, tmp_path):
    out = tmp_path / "work" / "roco-model"
    summary = export_model(roco_run, out)
    assert summary.dim == 4096 and {"image_encoder.onnx", "text_encoder.onnx", "tokenizer.json", "MODEL_CARD.md",
                                    "querybank_captions.npy", "medembed-model.json"} <= set(summary.files)
    records = load_dataset(shared_dataset("roco-rad")).split("test")[:12]
    (tmp_path / "work" / "path" / "to").mkdir(parents=True)
    shutil.copy(records[0].image, tmp_path / "work" / "path" / "to" / "scan.jpg")  # the README's own example file
    paths = [str(r.image) for r in records]
    captions = [r.captions[0] for r in records]
    code = BLOCKER + readme_export_example() + f'''
np.save("images.npy", embed_images({paths!r}))
np.save("captions.npy", embed_captions({captions!r}))
np.save("scan_hubness.npy", hubness)
np.save("scores.npy", scores)
'''
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path / "work", capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    got_images, got_captions = (np.load(tmp_path / "work" / f) for f in ("images.npy", "captions.npy"))

    searcher = Searcher(roco_run, "test", runtime="torch")  # medembed's own path: decode, preprocess, towers, heads
    want_images = torch.cat([searcher.embed_image(p) for p in paths]).numpy()
    want_captions = torch.cat([searcher.embed_text(c) for c in captions]).numpy()
    assert got_images.shape == want_images.shape == (12, 4096)
    assert np.abs(got_images - want_images).max() < 2e-4
    assert np.abs(got_captions - want_captions).max() < 2e-4
    assert ((got_images * want_images).sum(1)).min() > 0.9999
    # ... and equal to the run's embeddings of the same images as extraction cached them
    cached = searcher.model.images(searcher.pool.image_features(range(12)))
    assert np.abs(got_images - cached.numpy()).max() < 2e-4
    # the query bank, applied as the README does, is what medembed adds to each image's cosines
    offsets = bank_offsets(searcher.run)
    want_offset = offsets.images(torch.from_numpy(want_images[:1]))
    hubness = np.load(tmp_path / "work" / "scan_hubness.npy")
    assert abs(-offsets.setting.images.beta * hubness[0] - float(want_offset[0])) < 1e-4
    query = searcher.embed_text("axial CT of the abdomen with a liver lesion")  # the README's own caption
    want_score = float(query[0] @ torch.from_numpy(want_images[0])) + float(want_offset[0])
    assert np.load(tmp_path / "work" / "scores.npy") == pytest.approx(np.array([[want_score]]), abs=2e-4)

    # the folder's metrics are the test recall `cli.py eval` reports for the run
    metrics = json.loads((out / "metrics.json").read_text())["test"]
    columns = CliRunner().invoke(main, ["eval", "--run", str(roco_run), "--split", "test", "--skip", "fewshot",
                                        "--out", str(tmp_path / "eval")])
    assert columns.exit_code == 0, columns.output
    report = json.loads(next((tmp_path / "eval").glob("metrics-*.json")).read_text())["metrics"]
    for key in ("t2i_R@1", "t2i_R@10", "i2t_R@1", "i2t_R@10", "t2i_R@10_ci_low", "i2t_R@10_ci_high"):
        assert metrics[key] == pytest.approx(report[key], abs=1e-9), key
    card = (out / "MODEL_CARD.md").read_text()
    assert "Not for diagnosis" in card and f"| text -> image | R@10 | {metrics['t2i_R@10']:.1f} |" in card
    # the default run refits on train + valid: its valid figure is the selection heads', and says so
    assert "measured with the heads valid chose, before the refit on train + valid)." in card
    assert "Not held out" not in card
    manifest = json.loads((out / "medembed-model.json").read_text())
    assert set(manifest["files"]) == set(summary.files) - {"medembed-model.json"}

    # an existing export is replaced only when asked, and swapped in whole
    before = (out / "medembed-model.json").read_text()
    again = CliRunner().invoke(main, ["export-model", "--run", str(roco_run), "--out", str(out)])
    assert again.exit_code == 1 and again.output.strip().splitlines() == [
        f"Error: {out}: already holds a model export; pass --overwrite to replace it"]
    assert (out / "medembed-model.json").read_text() == before
    replaced = CliRunner().invoke(main, ["export-model", "--run", str(roco_run), "--out", str(out), "--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    assert "exported a 4096-d model to" in replaced.output and not list(out.parent.glob(".roco-model.*"))


def test_what_has_no_portable_form_is_refused_in_one_line(tmp_path):
    cache = tiny_clip_cache(tmp_path, {"train": 16, "valid": 8})
    train(AdaptConfig(features_dir=str(cache), out=str(tmp_path / "run"), head="linear", dim=8, epochs=1,
                      batch_size=8), progress=False)
    res = CliRunner().invoke(main, ["export-model", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "m")])
    assert res.exit_code == 1
    assert res.output.strip().splitlines() == [
        "Error: tiny-clip: its tokenizer (OpenClipTokenize) has no tokenizer.json form; export-model needs a "
        "Hugging Face fast tokenizer"]
    assert not (tmp_path / "m").exists()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    res = CliRunner().invoke(main, ["export-model", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "taken")])
    assert res.exit_code == 1 and "is not an earlier model export" in res.output
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"
