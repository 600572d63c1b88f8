"""A query and what it found, as one PNG: the grids `search --out` and the eval's retrieval examples
draw.

Search and evaluation draw the same grids (hits best first, numbered and labelled, the right answer
framed in green, an unreadable image as a grey placeholder), so a picture from either reads the same.
"""
from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path

# Figures are made with matplotlib's object API (`Figure`), never pyplot: nothing global is set (no
# backend switch at import) and a figure is freed when it goes out of scope.
from matplotlib.figure import Figure
from PIL import Image

from medembed.common.files import atomic_write


def save_figure(fig, path: Path) -> Path:
    """Write `fig` as a PNG at `path`, whole or not at all (a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))


@dataclass
class Tile:
    image: Image.Image | None  # None: the file could not be read; drawn as a grey placeholder
    label: str
    correct: bool = False


def _show(ax, image: Image.Image | None, missing: str) -> None:
    if image is None:
        ax.set_facecolor("#dddddd")
        ax.text(0.5, 0.5, missing, ha="center", va="center", fontsize=7, transform=ax.transAxes, wrap=True)
    else:
        ax.imshow(image)
    ax.set_xticks([])
    ax.set_yticks([])


def _frame(ax, correct: bool) -> None:
    for spine in ax.spines.values():
        spine.set_edgecolor("#1a9641" if correct else "#bbbbbb")
        spine.set_linewidth(4 if correct else 1)


def _tiles(axes, tiles: list[Tile]) -> None:
    """Hits best first, numbered and labelled, a correct one framed in green; spare axes blank."""
    for i, ax in enumerate(axes):
        if i >= len(tiles):
            ax.axis("off")
            continue
        _show(ax, tiles[i].image, "image not readable")
        _frame(ax, tiles[i].correct)
        ax.set_title(f"{i + 1}. {tiles[i].label}", fontsize=8)


def text_query_grid(query: str, tiles: list[Tile], path: Path, cols: int = 3, note: str = "") -> Path:
    """A caption and its top images, best first; the caption's own image framed in green. `note`
    (e.g. which run, the colour convention, where the own image ranks) is printed under the query."""
    rows = max(1, -(-len(tiles) // cols))
    fig = Figure(figsize=(3 * cols, 3 * rows + 0.8))
    axes = fig.subplots(rows, cols, squeeze=False)
    _tiles(axes.flat, tiles)
    fig.suptitle("\n".join(textwrap.wrap(f"query: {query}", 90)[:3] + ([note] if note else [])), fontsize=10)
    return save_figure(fig, path)


def similar_images_grid(image: Image.Image | None, label: str, tiles: list[Tile], path: Path, cols: int = 3,
                        note: str = "") -> Path:
    """An image (left, under `label`) and the images most like it, best first (a pool without captions
    answers an image query with these); `note` is printed above."""
    rows = max(1, -(-len(tiles) // cols))
    fig = Figure(figsize=(3 * (cols + 1), 3 * rows + (0.8 if note else 0.4)))
    axes = fig.subplots(rows, cols + 1, squeeze=False)
    _show(axes[0][0], image, "image not readable")
    axes[0][0].set_title(label, fontsize=9)
    for ax in axes[1:, 0]:
        ax.axis("off")
    _tiles(axes[:, 1:].flat, tiles)
    if note:
        fig.suptitle(note, fontsize=10)
    return save_figure(fig, path)


def image_query_grid(image: Image.Image | None, label: str, captions: list[tuple[str, float, bool]], path: Path,
                     note: str = "") -> Path:
    """An image and its top captions, best first, with scores; its own captions in green."""
    fig = Figure(figsize=(11, 4.4 if note else 4))
    if note:
        fig.suptitle(note, fontsize=9, y=1.02)
    ax = fig.add_axes((0.0, 0.05, 0.3, 0.85))
    _show(ax, image, "image not readable")
    ax.set_title(label, fontsize=9)
    text_ax = fig.add_axes((0.32, 0.0, 0.68, 1.0))
    text_ax.axis("off")
    y = 0.95
    for i, (text, score, correct) in enumerate(captions):
        lines = textwrap.wrap(text, 95)[:3] or [""]
        text_ax.text(
            0.0, y, f"{i + 1}. ({score:.3f}) " + "\n    ".join(lines), va="top", fontsize=8.5,
            color="#1a9641" if correct else "black", fontweight="bold" if correct else "normal",
        )
        y -= 0.06 + 0.055 * len(lines)
    return save_figure(fig, path)
