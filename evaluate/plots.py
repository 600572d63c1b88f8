"""PNG figures for the report: recall@K curves, the few-shot curve and retrieval example grids.

Matplotlib runs on the Agg backend (files only, no display needed), and every figure is closed
after saving so a long evaluation does not accumulate open figures.
"""
from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from PIL import Image  # noqa: E402

CHANCE_STYLE = {"color": "grey", "linestyle": ":", "linewidth": 1.5}


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def recall_curves(curves: dict[str, dict[str, list[float]]], ks: list[int], path: Path, title: str = "") -> Path:
    """curves: {column name: {"t2i": [R@K...], "i2t": [R@K...]}}; one panel per direction."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, direction, label in zip(axes, ("t2i", "i2t"), ("text -> image", "image -> text")):
        for name, c in curves.items():
            style = CHANCE_STYLE if name == "chance" else {"marker": "o", "markersize": 3}
            ax.plot(ks, c[direction], label=name, **style)
        ax.set_xscale("log")
        ax.set_xlabel("K")
        ax.set_title(label)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("Recall@K (%)")
    axes[1].legend(fontsize=8, loc="lower right")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def fewshot_curves(curves: dict[str, dict[str, list[float]]], ks: list[int], path: Path, title: str = "") -> Path:
    """curves: {column name: {method: [mAP per k]}}; one panel per method."""
    methods: list[str] = []
    for c in curves.values():
        methods += [m for m in c if m not in methods]
    fig, axes = plt.subplots(1, max(len(methods), 1), figsize=(3.6 * max(len(methods), 1), 3.6), sharey=True, squeeze=False)
    for ax, method in zip(axes[0], methods):
        for name, c in curves.items():
            if method not in c:
                continue
            style = CHANCE_STYLE if name == "chance" else {"marker": "o", "markersize": 3}
            ax.plot(ks, c[method], label=name, **style)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_xlabel("shots per class (k)")
        ax.set_title(method)
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("concept mAP (%)")
    axes[0][-1].legend(fontsize=8, loc="lower right")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


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


def text_query_grid(query: str, tiles: list[Tile], path: Path, cols: int = 3) -> Path:
    """A caption and its top images, best first; the caption's own image framed in green."""
    rows = max(1, -(-len(tiles) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows + 0.8), squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i >= len(tiles):
            ax.axis("off")
            continue
        _show(ax, tiles[i].image, "image not readable")
        _frame(ax, tiles[i].correct)
        ax.set_title(f"{i + 1}. {tiles[i].label}", fontsize=8)
    fig.suptitle("\n".join(textwrap.wrap(f"query: {query}", 90)[:3]), fontsize=10)
    return _save(fig, path)


def image_query_grid(image: Image.Image | None, label: str, captions: list[tuple[str, float, bool]], path: Path) -> Path:
    """An image and its top captions, best first, with scores; its own captions in green."""
    fig = plt.figure(figsize=(11, 4))
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
    return _save(fig, path)
