"""Every command the README shows, run in order as a new user would, on small copies of the shared
datasets laid out where the README expects them (`../shared/data/...`, `path/to/...`, `/data/rocov2`),
so the README cannot drift from what the toolkit does.

The only commands not executed are those that need what no test machine has (a model hub over the
network with a GPU, an already running Ray cluster): they are parsed by the command line instead,
and the test fails if that list changes without this file saying why.
"""
from __future__ import annotations

import csv
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

from tests.conftest import REPO, shared_dataset

pytestmark = pytest.mark.slow

PARSE_ONLY = {  # command -> why it is parsed, not run
    "extract --data /data/rocov2 --backbone hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224 "
    "--device cuda": "downloads weights from a model hub and needs a CUDA GPU",
    "extract --data /data/rocov2 --engine ray --address auto": "connects to an already running Ray cluster",
}


def readme_blocks(lang: str) -> list[str]:
    text = (REPO / "README.md").read_text()
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def readme_commands() -> list[list[str]]:
    """Every `cli.py` command line of the README's bash blocks, in order, comments removed."""
    out = []
    for block in readme_blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line.startswith(".venv/bin/python cli.py"):
                out.append(shlex.split(line, comments=True)[2:])
    return out


def _copy_imageclef(src: Path, dst: Path, n: dict[str, int]) -> None:
    (dst / "images").mkdir(parents=True)
    for split, count in n.items():
        with open(src / f"{split}_captions.csv", newline="") as f:
            rows = list(csv.reader(f))[: count + 1]
        ids = {r[0] for r in rows[1:]}
        with open(dst / f"{split}_captions.csv", "w", newline="") as f:
            csv.writer(f).writerows(rows)
        with open(src / f"{split}_concepts.csv", newline="") as f:
            concepts = [r for i, r in enumerate(csv.reader(f)) if i == 0 or r[0] in ids]
        with open(dst / f"{split}_concepts.csv", "w", newline="") as f:
            csv.writer(f).writerows(concepts)
        for i in ids:
            shutil.copy(src / "images" / f"{i}.jpg", dst / "images" / f"{i}.jpg")
    shutil.copy(src / "cui_names.csv", dst / "cui_names.csv")


def _copy_flickr(src: Path, dst: Path, n: dict[str, int]) -> None:
    (dst / "images").mkdir(parents=True)
    with open(src / "captions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    keep: dict[str, set[str]] = {s: set() for s in n}
    for r in rows:
        if len(keep[r["split"]]) < n[r["split"]]:
            keep[r["split"]].add(r["image"])
    chosen = set().union(*keep.values())
    with open(dst / "captions.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["image", "caption", "split"])
        w.writeheader()
        w.writerows(r for r in rows if r["image"] in chosen)
    for name in chosen:
        shutil.copy(src / "images" / name, dst / "images" / name)


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory) -> Path:
    """A working folder whose `../shared/data` holds small copies of the real datasets, with the
    README's placeholder paths filled; returns the folder commands run in."""
    roco, flickr = shared_dataset("roco-rad"), shared_dataset("flickr8k-1k")
    root = tmp_path_factory.mktemp("readme")
    work = root / "work"
    work.mkdir()
    mini = {"train": 48, "valid": 16, "test": 16}
    _copy_imageclef(roco, root / "shared" / "data" / "roco-rad", mini)
    _copy_flickr(flickr, root / "shared" / "data" / "flickr8k-1k", {"train": 40, "valid": 12, "test": 12})
    shutil.copytree(root / "shared" / "data" / "roco-rad", root / "data" / "rocov2")
    shutil.copytree(root / "shared" / "data" / "roco-rad", work / "path" / "to" / "new-dataset")
    first = sorted((roco / "images").iterdir())[0]
    shutil.copy(first, work / "path" / "to" / "scan.jpg")
    archive = work / "path" / "to" / "dicom-archive"  # pydicom's own sample files, as an archive export
    for i, name in enumerate(("CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "MR_small_RLE.dcm", "test-SR.dcm")):
        (archive / f"series{i % 2}").mkdir(parents=True, exist_ok=True)
        shutil.copy(get_testdata_file(name, download=False), archive / f"series{i % 2}" / f"IM{i:04d}")
    return work


def _resolve(args: list[str], sandbox: Path) -> list[str]:
    """/data/... lives in the sandbox (a test may not write to /data)."""
    return [a.replace("/data/", f"{sandbox.parent}/data/", 1) if a.startswith("/data/") else a for a in args]


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO.parent), HF_HUB_OFFLINE="1", MPLBACKEND="Agg")


def _run(args: list[str], sandbox: Path, env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "cli.py"), *_resolve(args, sandbox)], cwd=sandbox,
                          env=env or _env(), capture_output=True, text=True, timeout=timeout)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(args: list[str], sandbox: Path) -> str:
    """Start the page as the README says (on a free port), ask /api/info, stop it."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, str(REPO / "cli.py"), *args, "--port", str(port)], cwd=sandbox,
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/info", timeout=5) as r:
                    return r.read().decode()
            except OSError:
                if proc.poll() is not None:
                    raise AssertionError(f"serve exited: {proc.stdout.read()}") from None
                time.sleep(1)
        raise AssertionError("serve did not answer /api/info within 300 s")
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_every_readme_command_runs_in_order(sandbox):
    from medembed.cli import main

    commands = readme_commands()
    assert len(commands) > 20, "the README's commands were not found"
    parsed_only, failures = [], []
    for args in commands:
        key = " ".join(args)
        if key in PARSE_ONLY:
            name, rest = args[0], _resolve(args[1:], sandbox)
            main.get_command(None, name).make_context(name, rest)  # options exist and parse
            parsed_only.append(key)
            continue
        if args[0] == "serve":
            info = _serve(args, sandbox)
            assert '"images"' in info or "images" in info, info
            continue
        if args[:3] == ["adapt", "--features", "features/roco-rad/effnet-lite0-ms+minilm"] and args[-2:] == ["--out", "runs/roco"]:
            # the README goes on to resume an interrupted run: interrupt this one after epoch 2
            killed = _run(args, sandbox, env={**_env(), "MEDEMBED_KILL_AT": "adapt-epoch:2"})
            assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
            continue
        shards = ["0/4", "1/4", "2/4", "3/4"] if "--shard" in args else [None]
        for shard in shards:  # the README: "0/4 ... 1/4, 2/4, 3/4, then: cache merge"
            run_args = [shard if a == "0/4" and shard else a for a in args]
            res = _run(run_args, sandbox)
            if res.returncode != 0:
                failures.append(f"{' '.join(run_args)}\n  exit {res.returncode}: {res.stderr.strip()[-1500:]}")
    assert set(parsed_only) == set(PARSE_ONLY)
    assert not failures, "README commands failed:\n" + "\n".join(failures)

    # the Python block, as written
    (code,) = [b for b in readme_blocks("python") if "medembed.load_run" in b]
    res = subprocess.run([sys.executable, "-c", code], cwd=sandbox, env=_env(), capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (sandbox / "reports" / "roco-test" / "report.md").exists()
