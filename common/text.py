"""Free text as one table cell or console line.

Captions, image ids and notes come from datasets and users: a newline or tab in one would break a
table's row or a printed result's line, so every such cell is flattened the same way.
"""
from __future__ import annotations


def one_line(text: str, limit: int | None = None) -> str:
    """A table cell: newlines, tabs and runs of spaces collapsed to one space, cut at `limit` characters."""
    flat = " ".join(str(text).split())
    return flat if limit is None or len(flat) <= limit else flat[: limit - 3] + "..."
