"""Crash-safe progress for a long extraction: one small file per finished batch.

Why not append to the HDF5 file directly: a process killed inside an HDF5 write can leave the
whole file unreadable, losing every batch before it. Here each batch lands as its own `.npz`,
written to a temporary name and renamed, so a kill at any instant loses at most the batch in
flight; the finished `.h5` is assembled from the parts and itself appears by rename.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from medembed.cache.faults import reached
from medembed.cache.provenance import ProvenanceMismatch, differences
from medembed.common.files import atomic_write, read_json


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


class PartStore:
    """`{split}.parts/` beside the final file: manifest.json + `{kind}_{index:06d}.npz` files."""

    def __init__(self, final_path: str | Path):
        self.final = Path(final_path)
        self.dir = self.final.with_name(self.final.stem + ".parts")

    @property
    def manifest_path(self) -> Path:
        return self.dir / "manifest.json"

    def exists(self) -> bool:
        return self.manifest_path.exists()

    def open(self, provenance: dict, run_settings: dict) -> dict:
        """Start, or continue when a compatible run left parts here.

        Returns the settings in force: on resume, the recorded batch size wins so that batch
        boundaries (and therefore the bits of every feature) match an uninterrupted run.
        """
        if self.exists():
            manifest = read_json(self.manifest_path)
            diffs = differences(manifest["provenance"], provenance)
            if diffs:
                raise ProvenanceMismatch(self.dir, diffs)
            return manifest["settings"]
        self.dir.mkdir(parents=True, exist_ok=True)
        manifest = {"provenance": provenance, "settings": run_settings}
        atomic_write(self.manifest_path, lambda tmp: _write_synced(tmp, json.dumps(manifest, indent=1, default=str)))
        return run_settings

    def path(self, kind: str, index: int) -> Path:
        return self.dir / f"{kind}_{index:06d}.npz"

    def done(self, kind: str, index: int) -> bool:
        return self.path(kind, index).exists()

    def put(self, kind: str, index: int, **arrays: np.ndarray) -> None:
        tmp = self.dir / f".{kind}_{index:06d}.{os.getpid()}.tmp.npz"
        try:
            np.savez(tmp, **arrays)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        reached(f"{kind}-part:{index}")
        os.replace(tmp, self.path(kind, index))
        reached(f"{kind}:{index}")

    def get(self, kind: str, index: int) -> dict[str, np.ndarray]:
        with np.load(self.path(kind, index), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}

    def count(self, kind: str) -> int:
        return len(list(self.dir.glob(f"{kind}_*.npz")))

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
