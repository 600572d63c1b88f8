"""PNG figures for the report: recall@K curves, the few-shot curve and retrieval example grids."""
from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path

# Figures are made with matplotlib's object API (`Figure`), never pyplot: nothing global is set (no
# backend switch at import) and a figure is freed when it goes out of scope.
from matplotlib.figure import Figure
from PIL import Image

from medembed.common.files import atomic_write

CHANCE_STYLE = {"color": "grey", "linestyle": ":", "linewidth": 1.5}


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))


def _log_ticks(ax, ks: list[int]) -> None:
    """Log-scaled K axis labelled with plain numbers (1, 5, 10, ...) instead of powers of ten."""
    ax.set_xscale("log")
    ticks = [k for k in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000) if min(ks) <= k <= max(ks)]
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()


def _legend_below(fig, axes) -> None:
    """One legend under the panels, so no curve is hidden behind it."""
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(len(labels), 4),
               fontsize=8, frameon=False)


def recall_curves(curves: dict[str, dict[str, list]], path: Path, title: str = "") -> Path:
    """curves: {column name: {"ks": [K...], "t2i": [R@K...], "i2t": [R@K...]}} (and "t2i_band" /
    "i2t_band": [(low, high)...], drawn as shaded 95% intervals); one panel per direction. Each column
    carries its own Ks (columns scored on pools of different sizes stop at their pool)."""
    fig = Figure(figsize=(10, 4))
    axes = fig.subplots(1, 2, sharey=True)
    all_ks = [k for c in curves.values() for k in c["ks"]]
    for ax, direction, label in zip(axes, ("t2i", "i2t"), ("text -> image", "image -> text")):
        for name, c in curves.items():
            style = CHANCE_STYLE if name.startswith("chance") else {"marker": "o", "markersize": 3}
            (line,) = ax.plot(c["ks"], c[direction], label=name, **style)
            band = c.get(f"{direction}_band")
            if band:  # the 95% bootstrap interval over queries
                ax.fill_between(c["ks"], [b[0] for b in band], [b[1] for b in band], color=line.get_color(), alpha=0.15)
        _log_ticks(ax, all_ks)
        ax.set_xlabel("K")
        ax.set_title(label)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("Recall@K (%)")
    _legend_below(fig, axes)
    if title:
        fig.suptitle(title, y=1.03)
    return _save(fig, path)


def fewshot_curves(curves: dict[str, dict[str, list[float]]], ks: list[int], path: Path, title: str = "",
                   spread: dict[str, dict[str, list[float]]] | None = None) -> Path:
    """curves: {column name: {method: [mAP per k]}}; one panel per method; `spread` (the same shape:
    the standard deviation over seeds) is drawn as error bars."""
    methods: list[str] = []
    for c in curves.values():
        methods += [m for m in c if m not in methods]
    fig = Figure(figsize=(3.6 * max(len(methods), 1), 3.6))
    axes = fig.subplots(1, max(len(methods), 1), sharey=True, squeeze=False)
    for ax, method in zip(axes[0], methods):
        for name, c in curves.items():
            if method not in c:
                continue
            style = CHANCE_STYLE if name.startswith("chance") else {"marker": "o", "markersize": 3, "capsize": 3}
            err = (spread or {}).get(name, {}).get(method)
            ax.errorbar(ks, c[method], yerr=err if err and not name.startswith("chance") else None, label=name, **style)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.minorticks_off()
        ax.set_xlabel("shots per class (k)")
        ax.set_title(method)
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("concept mAP (%)")
    _legend_below(fig, axes[0])
    if title:
        fig.suptitle(title, y=1.03)
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
    return _save(fig, path)


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
    return _save(fig, path)


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
    return _save(fig, path)


def training_curve(rows: list[dict], best_epoch: int, path: Path, title: str = "") -> Path:
    """Train loss and valid recall per epoch of one run, the epoch that was kept marked."""
    fig = Figure(figsize=(10, 3.6))
    loss_ax, recall_ax = fig.subplots(1, 2)
    epochs = [r["epoch"] for r in rows if "train_loss" in r]
    loss_ax.plot(epochs, [r["train_loss"] for r in rows if "train_loss" in r], marker="o", markersize=3)
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("train loss")
    loss_ax.set_title("training loss")
    for key, label in (("t2i_R@10", "text -> image R@10"), ("i2t_R@10", "image -> text R@10"),
                       ("mean_recall", "mean of R@1/5/10")):
        pts = [(r["epoch"], r[key]) for r in rows if key in r]
        if pts:
            recall_ax.plot(*zip(*pts), marker="o", markersize=3, label=label)
    recall_ax.set_xlabel("epoch")
    recall_ax.set_ylabel("valid recall (%)")
    recall_ax.set_title("validation")
    for ax in (loss_ax, recall_ax):
        ax.axvline(best_epoch, color="#1a9641", linestyle="--", linewidth=1.2, label=f"kept: epoch {best_epoch}")
        ax.grid(True, alpha=0.3)
    _legend_below(fig, [recall_ax])
    if title:
        fig.suptitle(title, y=1.03)
    return _save(fig, path)
