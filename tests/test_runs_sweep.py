"""`cli.py runs` lists what was made; `cli.py sweep` trains a grid x seeds and ranks it."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from medembed.cli import main
from medembed.evaluate.sweep import parse_grid
from tests.synthetic_features import write_synthetic_features


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
    # a sweep's runs do not refit: their valid numbers are their kept heads', which never trained on valid
    assert {(r["valid_heads"], r["valid_held_out"]) for r in board["rows"]} == {("best", True)}
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


# ------------------------------------------------------------------ ranked as eval ranks


def _bank_record(ranked: float, plain: float, beta: float = 0.5) -> dict:
    """querybank.json as `adapt.querybank.calibrate` writes it."""
    from medembed.common.querybank import BankSide, QueryBank

    setting = QueryBank(BankSide(10, beta), BankSide(10, beta), "train", "")
    return {"setting": setting.to_dict(), "description": setting.describe(),
            "valid_plain": {"t2i_R@10": plain, "i2t_R@10": plain, "mean_recall": plain},
            "valid": {"t2i_R@10": ranked, "i2t_R@10": ranked, "mean_recall": ranked}}


def _hand_run(folder: Path, plain: float, ranked: float | None, created: str, extra_bytes: int = 0) -> Path:
    """A finished run folder as the trainer leaves it (config.json, summary.json, querybank.json unless
    `ranked` is None, i.e. --no-querybank), without weights."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"head": "linear", "loss": "infonce", "dim": 8, "backbone": "toy",
                                                    "querybank": ranked is not None, "cache": {"dataset": "toy"}}))
    summary = {"valid": {"t2i_R@10": plain, "i2t_R@10": plain, "mean_recall": plain}, "created": created}
    if ranked is not None:
        summary["querybank"] = _bank_record(ranked, plain)
        (folder / "querybank.json").write_text(json.dumps(summary["querybank"]))
    (folder / "summary.json").write_text(json.dumps(summary))
    if extra_bytes:
        (folder / "best.safetensors").write_bytes(b"\0" * extra_bytes)
    return folder


def _table(output: str) -> dict[str, dict[str, str]]:
    """`runs` output -> {run: {column: cell}}, cut at the header's column starts (cells are left-aligned)."""
    import re

    lines = output.splitlines()
    starts = [m.start() for m in re.finditer(r"(?:^|(?<=  ))\S", lines[0])]
    names = [lines[0][a:b].strip() for a, b in zip(starts, [*starts[1:], None])]
    rows = {}
    for line in lines[2:]:
        if not line.strip() or line.startswith("("):
            break
        cells = [line[a:b].strip() for a, b in zip(starts, [*starts[1:], None])]
        rows[cells[0]] = dict(zip(names, cells))
    return rows


def test_runs_ranks_valid_as_eval_ranks_with_the_query_bank(tmp_path):
    # plain cosine would order a (60) > c (57) > b (55); as ranked, b (58) > c (57, no bank) > a (50)
    _hand_run(tmp_path / "a", plain=60.0, ranked=50.0, created="2021-03-04T05:06:07+00:00", extra_bytes=2_500_000)
    _hand_run(tmp_path / "b", plain=55.0, ranked=58.0, created="2023-01-02T03:04:05+00:00")
    _hand_run(tmp_path / "c", plain=57.0, ranked=None, created="2022-06-07T08:09:10+00:00")
    res = CliRunner().invoke(main, ["runs", str(tmp_path), "--sort", "valid"])
    assert res.exit_code == 0, res.output
    assert "cos − β·hub with the run's query bank, else cosine" in res.output
    table = _table(res.output)
    assert list(table) == ["b", "c", "a"]
    a, c = table["a"], table["c"]
    assert a["ranked by"] == "cos − β·hub" and c["ranked by"] == "cosine"
    assert (a["valid mean recall (ranked)"], a["valid mean recall (cosine)"]) == ("50.0", "60.0")
    assert (c["valid mean recall (ranked)"], c["valid mean recall (cosine)"]) == ("57.0", "57.0")
    # made: the time the run records, not the files' times; size: the run's files on disk
    assert a["made"] == "2021-03-04 05:06" and a["size"] == "2.5 MB"
    assert list(_table(CliRunner().invoke(main, ["runs", str(tmp_path)]).output)) == ["b", "c", "a"]  # newest first


def _rewrite(run_dir: Path, plain: float, ranked: float) -> None:
    """Set what a run recorded on valid, keeping the form the trainer writes."""
    record = json.loads((run_dir / "querybank.json").read_text())
    fresh = _bank_record(ranked, plain)
    record.update(valid=fresh["valid"], valid_plain=fresh["valid_plain"])
    record["setting"]["images"] = record["setting"]["captions"] = {"k": 10, "beta": 0.5}
    (run_dir / "querybank.json").write_text(json.dumps(record))
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["valid"], summary["querybank"] = fresh["valid_plain"], record
    (run_dir / "summary.json").write_text(json.dumps(summary))


def test_sweep_ranks_cells_as_eval_ranks_their_runs(features, tmp_path):
    out = tmp_path / "sweep"
    args = ["sweep", "--features", str(features), "--set", "lr=1e-3,3e-3", "--seeds", "1", "--fixed", "epochs=2",
            "--fixed", "dim=8", "--fixed", "head=linear", "--out", str(out)]
    assert CliRunner().invoke(main, args).exit_code == 0
    # with plain cosine lr=1e-3 wins (60 > 55); with each run's query bank lr=3e-3 does (58 > 50)
    _rewrite(out / "lr_0.001" / "seed-0", plain=60.0, ranked=50.0)
    _rewrite(out / "lr_0.003" / "seed-0", plain=55.0, ranked=58.0)
    res = CliRunner().invoke(main, args)  # the finished runs are read back, not retrained
    assert res.exit_code == 0, res.output
    board = json.loads((out / "leaderboard.json").read_text())["rows"]
    assert [r["cell"]["lr"] for r in board] == [3e-3, 1e-3]
    assert [r["valid"]["mean_recall"]["mean"] for r in board] == [58.0, 50.0]
    assert [r["valid_plain"]["mean_recall"]["mean"] for r in board] == [55.0, 60.0]
    assert {r["ranking"] for r in board} == {"cos − β·hub"}
    md = (out / "leaderboard.md").read_text()
    assert "valid mean recall (ranked)" in md and "valid mean recall (cosine)" in md and "ranked by" in md
    assert "| 1 | 0.003 | cos − β·hub | 58.0 ± 0.0 | 55.0 ± 0.0 |" in md
    listed = CliRunner().invoke(main, ["runs", str(out), "--sort", "valid"]).output
    assert [line.split()[0] for line in listed.splitlines() if line.startswith("lr_")] == \
        ["lr_0.003/seed-0", "lr_0.001/seed-0"]


def test_sweep_without_query_banks_ranks_by_plain_cosine(features, tmp_path):
    out = tmp_path / "sweep"
    res = CliRunner().invoke(main, ["sweep", "--features", str(features), "--set", "querybank=false,true", "--seeds",
                                    "1", "--fixed", "epochs=2", "--fixed", "dim=8", "--fixed", "head=linear",
                                    "--out", str(out)])
    assert res.exit_code == 0, res.output
    rows = {r["cell"]["querybank"]: r for r in json.loads((out / "leaderboard.json").read_text())["rows"]}
    assert rows[False]["ranking"] == "cosine" and rows[False]["valid"] == rows[False]["valid_plain"]
    banked = json.loads((out / "querybank_True" / "seed-0" / "querybank.json").read_text())
    assert rows[True]["valid"]["mean_recall"]["mean"] == banked["valid"]["mean_recall"]
    assert rows[True]["valid_plain"]["mean_recall"]["mean"] == banked["valid_plain"]["mean_recall"]
    assert not (out / "querybank_False" / "seed-0" / "querybank.json").exists()


# ------------------------------------------------------------------ valid numbers that are not held out


def test_runs_marks_valid_numbers_not_held_out_and_never_ranks_them(tmp_path):
    """A run whose valid numbers come from heads that trained on valid is shown with them in parentheses,
    names those heads, and sorts after every held-out run whatever its numbers; runs saved before the
    record existed are read from their folders (a refit run: its selection heads; a run distilled from
    a refit run without selection heads of its own: not held out)."""
    teacher = _hand_run(tmp_path / "teacher", plain=39.4, ranked=39.4, created="2021-01-01T00:00:00+00:00")
    (teacher / "selection.safetensors").write_bytes(b"")  # a refit run, saved before summaries said so
    _hand_run(tmp_path / "plain", plain=30.0, ranked=None, created="2021-01-02T00:00:00+00:00")
    leaked = _hand_run(tmp_path / "leaked", plain=95.0, ranked=100.0, created="2021-01-03T00:00:00+00:00")
    summary = json.loads((leaked / "summary.json").read_text())
    summary.update(valid_heads="best", valid_held_out=False)
    (leaked / "summary.json").write_text(json.dumps(summary))
    old = _hand_run(tmp_path / "old-distilled", plain=63.3, ranked=None, created="2021-01-04T00:00:00+00:00")
    config = json.loads((old / "config.json").read_text())
    (old / "config.json").write_text(json.dumps({**config, "distilled": {"from": str(teacher.resolve())}}))
    res = CliRunner().invoke(main, ["runs", str(tmp_path), "--sort", "valid"])
    assert res.exit_code == 0, res.output
    table = _table(res.output)
    assert list(table)[:2] == ["teacher", "plain"] and set(list(table)[2:]) == {"leaked", "old-distilled"}
    assert table["teacher"]["valid heads"] == "selection" and table["plain"]["valid heads"] == "best"
    assert table["teacher"]["valid mean recall (ranked)"] == "39.4"
    assert table["leaked"]["valid heads"] == "best, not held out"
    assert (table["leaked"]["valid mean recall (ranked)"], table["leaked"]["valid mean recall (cosine)"]) == \
        ("(100.0)", "(95.0)")
    assert table["old-distilled"]["valid heads"] == "best, not held out"
    assert table["old-distilled"]["valid mean recall (ranked)"] == "(63.3)"
    assert "(x): valid numbers of heads that trained on valid (not held out), never ranked" in res.output


def test_sweep_says_which_heads_valid_came_from_and_puts_cells_not_held_out_last(features, tmp_path):
    out = tmp_path / "sweep"
    args = ["sweep", "--features", str(features), "--set", "lr=1e-3,3e-3", "--seeds", "1", "--fixed", "epochs=2",
            "--fixed", "dim=8", "--fixed", "head=linear", "--fixed", "refit=true", "--out", str(out)]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    for cell in ("lr_0.001", "lr_0.003"):  # refit runs: valid measured by the heads valid chose
        summary = json.loads((out / cell / "seed-0" / "summary.json").read_text())
        assert (summary["valid_heads"], summary["valid_held_out"]) == ("selection", True) and "refit" in summary
    board = json.loads((out / "leaderboard.json").read_text())["rows"]
    assert {(r["valid_heads"], r["valid_held_out"]) for r in board} == {("selection", True)}
    # one cell's valid numbers made not held out (and the best): it is no longer ranked, and comes last
    _rewrite(out / "lr_0.001" / "seed-0", plain=60.0, ranked=99.0)
    _rewrite(out / "lr_0.003" / "seed-0", plain=55.0, ranked=58.0)
    path = out / "lr_0.001" / "seed-0" / "summary.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "valid_heads": "best", "valid_held_out": False}))
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "99.0 +- 0.0 (not held out: heads that trained on valid)" in res.output
    board = json.loads((out / "leaderboard.json").read_text())["rows"]
    assert [(r["cell"]["lr"], r["valid_held_out"]) for r in board] == [(3e-3, True), (1e-3, False)]
    md = (out / "leaderboard.md").read_text()
    assert "| 1 | 0.003 | cos − β·hub | 58.0 ± 0.0 | 55.0 ± 0.0 |" in md
    assert "| – | 0.001 | cos − β·hub | (99.0 ± 0.0) | (60.0 ± 0.0) |" in md and "best, not held out |" in md
    assert "selection |" in md and "never ranked" in md


# ------------------------------------------------------------------ bad values name their option


def _one_line_error(res) -> str:
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), res.output
    return lines[0]


@pytest.mark.parametrize(("option", "flag", "wants"), [
    (["--set", "lr=abc"], "--set lr", "'abc' is not a number"),
    (["--set", "lr=1e-3,abc"], "--set lr", "'abc' is not a number"),
    (["--set", "dim=8.5"], "--set dim", "'8.5' is not a whole number"),
    (["--set", "head=mlp", "--fixed", "epochs=x"], "--fixed epochs", "'x' is not a whole number"),
    (["--set", "head=mlp", "--fixed", "epochs=2,3"], "--fixed epochs", "one value, got 2"),
    (["--set", "querybank=maybe"], "--set querybank", "'maybe' is not one of 1, true"),
])
def test_sweep_names_the_option_and_the_bad_value(features, tmp_path, option, flag, wants):
    line = _one_line_error(CliRunner().invoke(main, ["sweep", "--features", str(features), *option,
                                                     "--out", str(tmp_path / "s")]))
    assert f"Error: {flag}: " in line and wants in line
    assert not (tmp_path / "s").exists()


def test_sweep_names_bad_grid_file_values_and_refused_settings_before_training(features, tmp_path):
    grid = tmp_path / "g.yaml"
    grid.write_text("lr: [1e-3, abc]\n")
    line = _one_line_error(CliRunner().invoke(main, ["sweep", "--features", str(features), "--grid", str(grid),
                                                     "--out", str(tmp_path / "s")]))
    assert f"--grid {grid}: lr: 'abc' is not a number" in line
    grid.write_text("lr: [1e-3, 3e-3]\n")  # YAML reads 1e-3 as text: cast like --set
    assert parse_grid([], grid) == {"lr": [1e-3, 3e-3]}
    # a value of the right type that AdaptConfig refuses stops the sweep before any cell trains
    line = _one_line_error(CliRunner().invoke(main, ["sweep", "--features", str(features), "--set", "lr=1e-3,-1",
                                                     "--out", str(tmp_path / "s")]))
    assert "cell lr_-1.0: lr must be > 0, got -1.0" in line
    assert not list((tmp_path / "s").rglob("summary.json"))


def test_a_json_grid_needs_no_yaml_and_a_yaml_grid_without_pyyaml_says_what_to_install(tmp_path, monkeypatch):
    from medembed.evaluate.sweep import parse_grid

    monkeypatch.setitem(sys.modules, "yaml", None)  # PyYAML absent: importing it raises ImportError
    grid = tmp_path / "g.json"
    grid.write_text('{"lr": [0.001, 0.003], "dim": [8]}')
    assert parse_grid([], grid) == {"lr": [0.001, 0.003], "dim": [8]}
    yaml_grid = tmp_path / "g.yaml"
    yaml_grid.write_text("lr: [0.001]\n")
    with pytest.raises(ValueError, match=r"pip install 'medembed\[yaml\]'"):
        parse_grid([], yaml_grid)
