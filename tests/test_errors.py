"""Every error medembed defines derives from MedembedError, the one base the command line catches,
and the checks of user input raise a MedembedError that is still the standard exception it is a
kind of; a plain ValueError is then always a bug, shown with its traceback."""
from __future__ import annotations

import ast
import builtins
import importlib
from pathlib import Path

import h5py
import pytest
from click.testing import CliRunner

from medembed.adapt.checkpoint import read_verified
from medembed.adapt.config import AdaptConfig
from medembed.adapt.run import load_adapter_run
from medembed.cache.reader import find_splits, load_split, open_cache
from medembed.cli import main
from medembed.common.device import resolve_device
from medembed.common.errors import AlreadyExists, BadInput, BadOption, BadRun, MedembedError, NotFound
from medembed.common.files import check_out_folder, read_jsonl
from medembed.evaluate import listing
from medembed.extract.datasets import load_dataset
from medembed.extract.datasets.frames import parse_frames
from medembed.extract.datasets.mimic_cxr import check_sections
from medembed.extract.imaging.raster import PixelLimit
from medembed.extract.imaging.windows import parse_window

REPO = Path(__file__).resolve().parents[1]


def _source_files() -> list[Path]:
    """The package's modules: those at its root and in every subpackage but the tests."""
    packages = [d for d in sorted(REPO.iterdir()) if (d / "__init__.py").is_file() and d.name != "tests"]
    return sorted(REPO.glob("*.py")) + [p for d in packages for p in sorted(d.rglob("*.py"))]


def _base_name(node: ast.expr) -> str:
    return node.attr if isinstance(node, ast.Attribute) else getattr(node, "id", "")


def _is_builtin_exception(name: str) -> bool:
    obj = getattr(builtins, name, None)
    return isinstance(obj, type) and issubclass(obj, BaseException)


def _exception_classes() -> dict[str, tuple[str, str]]:
    """"path:Class" -> (module, class) of every top-level class whose bases name an exception: a
    built-in one, one whose name says Error or Exception, or another such class of the package."""
    classes = []
    for path in _source_files():
        rel = path.relative_to(REPO)
        module = ".".join(["medembed", *[p for p in rel.with_suffix("").parts if p != "__init__"]])
        for node in ast.parse(path.read_text(), filename=str(path)).body:
            if isinstance(node, ast.ClassDef):
                classes.append((f"{rel.as_posix()}:{node.name}", module, node.name,
                                {_base_name(b) for b in node.bases}))
    names: set[str] = set()
    while True:  # a class deriving from one found in the last pass is an exception class too
        found = {name for _, _, name, bases in classes
                 if any(_is_builtin_exception(b) or b.endswith(("Error", "Exception")) or b in names for b in bases)}
        if found <= names:
            break
        names |= found
    return {key: (module, name) for key, module, name, _ in classes if name in names}


def _outside_base() -> set[str]:
    out = set()
    for key, (module, name) in _exception_classes().items():
        cls = getattr(importlib.import_module(module), name)
        if not issubclass(cls, MedembedError):
            out.add(key)
    return out


def test_every_exception_class_derives_from_medembed_error() -> None:
    found = _exception_classes()
    assert len(found) > 20  # the scan sees the package's errors (DatasetError, CacheError, ...)
    assert "serve/model_export.py:NotPortable" in found
    outside = _outside_base()
    assert not outside, f"exception classes outside MedembedError: {sorted(outside)}"


def test_general_errors_are_their_standard_kinds() -> None:
    for cls, kind in ((BadOption, ValueError), (BadInput, ValueError), (BadRun, ValueError),
                      (NotFound, FileNotFoundError), (AlreadyExists, FileExistsError), (PixelLimit, ValueError)):
        assert issubclass(cls, MedembedError) and issubclass(cls, kind), cls
    assert str(NotFound("x.h5: no such cache file")) == "x.h5: no such cache file"


def test_bad_options_are_medembed_errors() -> None:
    with pytest.raises(MedembedError, match="--device must be one of"):
        resolve_device("gpu")
    with pytest.raises(MedembedError, match="expected one of"):
        parse_window("brighter")
    with pytest.raises(MedembedError, match="--frames 'none'"):
        parse_frames("none")
    with pytest.raises(MedembedError, match="report_sections must be one of"):
        check_sections("everything")
    with pytest.raises(MedembedError, match="head must be one of"):
        AdaptConfig(features_dir="f", out="o", head="forest")
    with pytest.raises(ValueError, match="batch_size must be >= 2"):  # and a ValueError, for callers that catch that
        AdaptConfig(features_dir="f", out="o", batch_size=1)


def test_missing_and_existing_files_are_medembed_errors(tmp_path: Path) -> None:
    with pytest.raises(MedembedError, match="no such features folder"):
        find_splits(tmp_path / "absent")
    with pytest.raises(MedembedError, match="no such cache file"):
        with open_cache(tmp_path / "absent.h5"):
            pass
    with pytest.raises(FileNotFoundError, match="not an adapter run folder"):
        AdaptConfig.from_run(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(MedembedError, match="exists and is not an earlier index"):
        check_out_folder(tmp_path / "out", overwrite=True, manifest="index.json", kind="index")


def test_bad_inputs_are_medembed_errors(tmp_path: Path) -> None:
    with h5py.File(tmp_path / "empty.h5", "w"):
        pass
    with pytest.raises(MedembedError, match="not a feature cache"):
        load_split(tmp_path / "empty.h5")
    (tmp_path / "best.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(MedembedError, match="not a readable safetensors checkpoint"):
        read_verified(tmp_path / "best.safetensors")
    with pytest.raises(MedembedError, match="not a run"):
        load_adapter_run(tmp_path / "best.safetensors")
    with pytest.raises(MedembedError, match="no such file or folder"):
        load_dataset(tmp_path / "absent")


def test_the_command_line_says_a_user_error_in_one_line(tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["runs", str(tmp_path / "absent")])
    assert res.exit_code == 1
    assert res.output == f"Error: {tmp_path / 'absent'}: no such folder\n"
    assert isinstance(res.exception, SystemExit)  # click's one line, not the error itself


def test_the_command_line_keeps_a_bugs_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def bug(folder):
        raise ValueError("bug")

    monkeypatch.setattr(listing, "find_runs", bug)
    res = CliRunner().invoke(main, ["runs", str(tmp_path)])
    assert res.exit_code != 0
    assert type(res.exception) is ValueError and str(res.exception) == "bug"  # propagated, not made one line
    assert "Error: bug" not in res.output


def test_the_command_line_names_a_path_the_system_refuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refused(folder):
        raise PermissionError(13, "Permission denied", str(folder))

    monkeypatch.setattr(listing, "find_runs", refused)
    res = CliRunner().invoke(main, ["runs", str(tmp_path)])
    assert res.exit_code == 1
    assert res.output == f"Error: [Errno 13] Permission denied: '{tmp_path}'\n"


@pytest.mark.parametrize("command", [["search", "--text", "x"], ["index"], ["export"]])
def test_a_damaged_run_file_is_named_in_one_line(tmp_path: Path, command: list[str]) -> None:
    """A half-copied config.json is the user's to fix: one line naming the file, never a JSON traceback."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text('{"head": "linear", "dim"')
    res = CliRunner().invoke(main, [command[0], "--run", str(run), *command[1:]])
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), res.output
    assert res.output.startswith(f"Error: {run / 'config.json'}: damaged JSON (") and res.output.count("\n") == 1


def test_a_run_killed_mid_write_leaves_a_metrics_line_named_in_one_line(tmp_path: Path) -> None:
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"epoch": 1, "loss": 0.5}\n{"epoch": 2, "lo')
    with pytest.raises(BadInput, match=r"metrics.jsonl: line 2: damaged JSON"):
        read_jsonl(metrics)
    metrics.write_text('{"epoch": 1}\n\n{"epoch": 2}\n')
    assert read_jsonl(metrics) == [{"epoch": 1}, {"epoch": 2}]
