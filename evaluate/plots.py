"""PNG figures for the report: recall@K curves, the few-shot curve and the training curve. The
retrieval example grids, which search draws too, are `model.grids`."""
from __future__ import annotations

from pathlib import Path

# Figures are made with matplotlib's object API (`Figure`), never pyplot: nothing global is set (no
# backend switch at import) and a figure is freed when it goes out of scope.
from matplotlib.figure import Figure

from medembed.common.recall_keys import MEAN_RECALL, recall_key
from medembed.model.grids import save_figure

CHANCE_STYLE = {"color": "grey", "linestyle": ":", "linewidth": 1.5}


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
    return save_figure(fig, path)


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
    return save_figure(fig, path)


def training_curve(rows: list[dict], best_epoch: int, path: Path, title: str = "") -> Path:
    """Train loss and valid recall per epoch of one run, the epoch that was kept marked."""
    fig = Figure(figsize=(10, 3.6))
    loss_ax, recall_ax = fig.subplots(1, 2)
    epochs = [r["epoch"] for r in rows if "train_loss" in r]
    loss_ax.plot(epochs, [r["train_loss"] for r in rows if "train_loss" in r], marker="o", markersize=3)
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("train loss")
    loss_ax.set_title("training loss")
    for key, label in ((recall_key("t2i", 10), "text -> image R@10"), (recall_key("i2t", 10), "image -> text R@10"),
                       (MEAN_RECALL, "mean of R@1/5/10")):
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
    return save_figure(fig, path)
