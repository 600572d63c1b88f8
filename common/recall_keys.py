"""The names of the Recall@K numbers, and the cut-offs reported unless asked otherwise.

A ranking's numbers are a flat dict: `t2i_R@10` (text -> image recall at K = 10, in %), `i2t_R@10`
(image -> text), `t2i_R@0.5%` (recall at a share of the pool) and `mean_recall` (the mean of R@K over
both directions and the Ks asked for, what early stopping maximises). Training, eval, sweeps, the
runs table and export write and read these names, so each is built here and nowhere else.

Its own module (no torch) so the command line can show DEFAULT_KS as a default without importing torch."""
from __future__ import annotations

DEFAULT_KS = (1, 5, 10)  # the three whose mean is "mean recall"
DIRECTIONS = ("t2i", "i2t")  # text -> image (a caption finds its image), image -> text
MEAN_RECALL = "mean_recall"


def recall_prefix(direction: str) -> str:
    """How every recall name of a direction starts (`t2i_R@`): R@K, R@p% and their intervals alike."""
    return f"{direction}_R@"


def recall_key(direction: str, k: int) -> str:
    """The name of R@K of a direction, e.g. `t2i_R@10`."""
    return f"{recall_prefix(direction)}{k}"


def fraction_key(direction: str, percent: float) -> str:
    """The name of recall at `percent`% of the pool, e.g. `t2i_R@0.5%`."""
    return f"{recall_prefix(direction)}{percent:g}%"
