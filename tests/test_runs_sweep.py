"""`cli.py runs` lists what was made; `cli.py sweep` trains a grid x seeds and ranks it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from medembed.adapt.synthetic import write_synthetic_features
from medembed.cli import main
from medembed.evaluate.sweep import parse_grid


@pytest.fixture(scope="module")
def features(tmp_path_factory) -> Path:
    return write_synthetic_features(tmp_path_factory.mktemp("sw") / "features", n_train=120, n_eval=40,
                                    image_dim=16, text_dim=12, noise=0.5)


def test_sweep_of_a_2x2_grid_with_2_seeds(features, tmp_path):
    out = tmp_path / "sweep"
    args = ["sweep", "--features", str(features), "--set", "head=linear,mlp", "--set", "lr=1e-3,3e-3", "--seeds", "2",
            "--fixed", "epochs=3", "--fixed", "dim=8", "--out", str(out)]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    runs = sorted(p.parent for p in out.rglob("summary.json"))
    assert len(runs) == 8 and {p.name for p in runs} == {"seed-0", "seed-1"}
    assert res.output.count("cell ") >= 4 and "cell 4/4" in res.output  # a progress line per cell
    board = json.loads((out / "leaderboard.json").read_text())
    assert len(board["rows"]) == 4 and all(r["seeds"] == 2 for r in board["rows"])
    means = [r["valid"]["mean_recall"]["mean"] for r in board["rows"]]
    assert means == sorted(means, reverse=True)  # best valid first
    assert {json.loads((p / "config.json").read_text())["epochs"] for p in runs} == {3}
    assert "valid mean recall" in (out / "leaderboard.md").read_text() and "±" in res.output
    # a second call reuses the finished runs instead of retraining them
    before = {p: (p / "best.safetensors").stat().st_mtime for p in runs}
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0 and all((p / "best.safetensors").stat().st_mtime == t for p, t in before.items())
    # runs lists them, and shows the sweep's leaderboard again
    listed = CliRunner().invoke(main, ["runs", str(out), "--sort", "valid"])
    assert listed.exit_code == 0, listed.output
    assert sum(line.split()[0].split("/")[-1].startswith("seed-") for line in listed.output.splitlines() if line) == 8
    assert f"sweep {out}:" in listed.output and "valid mean recall" in listed.output


def test_runs_lists_runs_with_their_latest_test_evaluation(features, tmp_path):
    for name, head in (("a", "linear"), ("b", "cca")):
        res = CliRunner().invoke(main, ["adapt", "--features", str(features), "--head", head, "--dim", "8",
                                        *(["--epochs", "2"] if head == "linear" else []), "--out", str(tmp_path / name)])
        assert res.exit_code == 0, res.output
    res = CliRunner().invoke(main, ["eval", "--run", str(tmp_path / "b"), "--skip", "fewshot,detection,zeroshot",
                                    "--examples", "0"])
    assert res.exit_code == 0, res.output
    out = CliRunner().invoke(main, ["runs", str(tmp_path), "--sort", "name"]).output
    lines = [line for line in out.splitlines() if line.startswith(("a ", "b "))]
    assert [line.split()[0] for line in lines] == ["a", "b"]
    assert "not evaluated" in lines[0] and "[" in lines[1] and "synthetic" in lines[1]  # R@10 with its interval
    assert "cca" in lines[1] and "linear, infonce" in lines[0]
    bad = CliRunner().invoke(main, ["runs", str(tmp_path / "nope")])
    assert bad.exit_code == 1 and "no such folder" in bad.output


def test_grid_parsing_names_bad_settings(tmp_path):
    assert parse_grid(["head=mlp,linear", "lr=1e-3,3e-3"]) == {"head": ["mlp", "linear"], "lr": [1e-3, 3e-3]}
    grid_file = tmp_path / "g.yaml"
    grid_file.write_text("dim: [8, 16]\n")
    assert parse_grid(["epochs=2"], grid_file) == {"dim": [8, 16], "epochs": [2]}
    with pytest.raises(ValueError, match="nope cannot be swept"):
        parse_grid(["nope=1,2"])
    with pytest.raises(ValueError, match="expected KEY=V1,V2"):
        parse_grid(["head"])
