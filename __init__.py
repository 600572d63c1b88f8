"""medembed: the embedding-first CLIP toolkit for medical image-text retrieval.

The repository's top-level folders (`extract/`, `cache/`, `adapt/`, `evaluate/`, `common/`) and
`cli.py` install as the `medembed` package, so no global module name is claimed. The notebook API
(`load_run`, `embed_texts`, `embed_images`, `search`, `evaluate_run`) is resolved on first use: importing
`medembed` (which every `medembed.*` import and the CLI do) stays cheap.
"""
from __future__ import annotations

from medembed.common.version import __version__

_API = ("load_run", "embed_texts", "embed_images", "search", "evaluate_run")
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        from medembed import api

        return getattr(api, name)
    raise AttributeError(f"module 'medembed' has no attribute {name!r}")
