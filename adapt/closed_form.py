"""The no-training baseline: regularised CCA solved in closed form.

Why not sklearn's CCA: it runs NIPALS, one component at a time, minutes for 256 components of
1280-d features; the eigen/SVD solution below is exact and takes well under a second. Ridge
regularisation (shrinking each tower's covariance towards identity) is what keeps CCA from
fitting noise when there are only a few thousand pairs for >1000 dimensions; weighting each
canonical direction by its correlation**power makes the well-correlated directions count more
in the cosine (power 0 is plain CCA).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from medembed.adapt.heads import LinearMapHead
from medembed.cache.reader import CachedSplit
from medembed.common.errors import Incompatible
from medembed.common.ranking import recall_summary
from medembed.common.recall_keys import MEAN_RECALL


@dataclass
class PairMoments:
    """Means, stds and correlation matrices of the (image, caption) pairs of a split."""

    mean_x: torch.Tensor
    std_x: torch.Tensor
    mean_y: torch.Tensor
    std_y: torch.Tensor
    cxx: torch.Tensor
    cyy: torch.Tensor
    cxy: torch.Tensor


@torch.no_grad()
def pair_moments(split: CachedSplit, chunk: int = 65536) -> PairMoments:
    img, cap, rows = split.image_features, split.caption_features, split.caption_image.long()
    n = cap.shape[0]
    if n < 2:
        raise Incompatible(f"{split.path or split.split}: closed-form CCA needs at least 2 caption pairs, got {n}")

    def chunks():
        for s in range(0, n, chunk):
            yield img[rows[s : s + chunk]].double(), cap[s : s + chunk].double()

    sx = sy = None
    for x, y in chunks():
        sx = x.sum(0) if sx is None else sx + x.sum(0)
        sy = y.sum(0) if sy is None else sy + y.sum(0)
    mx, my = sx / n, sy / n
    cxx = torch.zeros(img.shape[1], img.shape[1], dtype=torch.float64)
    cyy = torch.zeros(cap.shape[1], cap.shape[1], dtype=torch.float64)
    cxy = torch.zeros(img.shape[1], cap.shape[1], dtype=torch.float64)
    for x, y in chunks():
        x, y = x - mx, y - my
        cxx += x.T @ x
        cyy += y.T @ y
        cxy += x.T @ y
    cxx, cyy, cxy = cxx / (n - 1), cyy / (n - 1), cxy / (n - 1)
    dx, dy = cxx.diagonal().sqrt().clamp_min(1e-6), cyy.diagonal().sqrt().clamp_min(1e-6)
    return PairMoments(
        mean_x=mx, std_x=dx, mean_y=my, std_y=dy,
        cxx=cxx / dx[:, None] / dx[None, :], cyy=cyy / dy[:, None] / dy[None, :], cxy=cxy / dx[:, None] / dy[None, :],
    )


def _inv_sqrt(eig: tuple[torch.Tensor, torch.Tensor], reg: float) -> torch.Tensor:
    """((1 - reg) C + reg I)^(-1/2) from C's eigendecomposition: shrinking towards the identity keeps
    C's eigenvectors and maps each eigenvalue w to (1 - reg) w + reg, so one `eigh` serves every ridge."""
    w, v = eig
    return (v * ((1 - reg) * w + reg).clamp_min(1e-10).rsqrt()) @ v.T


@dataclass
class CCASolution:
    """Canonical directions of both towers (in standardised units) and their correlations, for one
    ridge value; any correlation weighting is then a cheap rescale."""

    moments: PairMoments
    dirs_x: torch.Tensor  # [Di, r]
    dirs_y: torch.Tensor  # [Dt, r]
    corr: torch.Tensor  # [r], descending


def cca_solve(m: PairMoments, reg: float = 0.1,
              eigs: tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None
              ) -> CCASolution:
    """`eigs`: the eigendecompositions of m.cxx and m.cyy, when several ridges are solved in turn."""
    if not 0 < reg <= 1:
        raise ValueError(f"reg must be in (0, 1], got {reg}")
    ex, ey = eigs or (torch.linalg.eigh(m.cxx), torch.linalg.eigh(m.cyy))
    ax, ay = _inv_sqrt(ex, reg), _inv_sqrt(ey, reg)
    u, s, vh = torch.linalg.svd(ax @ m.cxy @ ay, full_matrices=False)
    return CCASolution(m, ax @ u, ay @ vh.T, s)


def cca_heads(sol: CCASolution, dim: int, power: float = 1.0) -> tuple[nn.Module, nn.Module]:
    """Image and text heads projecting onto the top-`dim` canonical directions (zero-padded when
    the towers have fewer dimensions than `dim`; zero columns leave every cosine unchanged)."""
    m = sol.moments
    d = min(dim, sol.corr.numel())
    scale = sol.corr[:d].clamp_min(0) ** power
    heads = []
    for mean, std, dirs in ((m.mean_x, m.std_x, sol.dirs_x), (m.mean_y, m.std_y, sol.dirs_y)):
        head = LinearMapHead(dirs.shape[0], dim)
        head.mean.copy_(mean.float())
        head.weight.zero_()
        head.weight[:, :d] = (dirs[:, :d] * scale / std[:, None]).float()
        heads.append(head)
    return heads[0], heads[1]


def fit_closed_form(train_split: CachedSplit, dim: int, reg: float = 0.1, power: float = 1.0) -> tuple[nn.Module, nn.Module]:
    """(image_head, text_head) of regularised CCA on the training pairs with a given ridge and
    weighting; no gradient steps."""
    return cca_heads(cca_solve(pair_moments(train_split), reg), dim, power=power)


# ridge x correlation-weighting grid searched on valid, as early stopping picks an epoch
CCA_GRID = {"reg": (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.85), "power": (0.0, 0.5, 1.0, 1.5, 2.0, 3.0)}


def _first_images(split: CachedSplit, n: int) -> CachedSplit:
    if split.n_images <= n:
        return split
    keep = split.caption_image < n
    return CachedSplit(split=split.split, image_ids=split.image_ids[:n], image_features=split.image_features[:n],
                       caption_features=split.caption_features[keep], caption_image=split.caption_image[keep],
                       captions=[c for c, k in zip(split.captions, keep.tolist()) if k])


@dataclass
class CCAFit:
    image_head: nn.Module
    text_head: nn.Module
    reg: float
    power: float
    valid: dict[str, float]  # valid recall of the chosen setting
    grid: list[dict]  # one row per setting tried: reg, power and its valid recall


def fit_cca_on_valid(train_split: CachedSplit, valid: CachedSplit, dim: int, max_valid: int = 5000,
                     progress: bool = False) -> CCAFit:
    """Regularised CCA with the ridge and weighting that give the best valid mean recall: the one
    closed-form solution both `adapt --head cca` and the eval's closed-form column use. The grid is
    scored on at most `max_valid` valid images (the first ones, with their captions): 54 settings
    ranked over a 100k pool would cost far more than the fit itself. `progress`: a bar on stderr
    over the moments, the eigendecompositions and the settings scored, naming the step it is on
    (wide features spend seconds to minutes here; a bar update costs microseconds)."""
    steps = 2 + len(CCA_GRID["reg"]) * len(CCA_GRID["power"])
    with tqdm(total=steps, desc="closed form", unit="step", disable=not progress, leave=False,
              dynamic_ncols=True) as bar:
        bar.set_postfix_str(f"moments of {train_split.n_captions:,} train pairs")
        moments = pair_moments(train_split)
        bar.update()
        widths = f"{moments.cxx.shape[0]:,} + {moments.cyy.shape[0]:,}"
        bar.set_postfix_str(f"eigendecompositions of the {widths}-wide covariances")
        eigs = torch.linalg.eigh(moments.cxx), torch.linalg.eigh(moments.cyy)
        bar.update()
        valid = _first_images(valid, max_valid)
        best, grid = None, []
        for reg in CCA_GRID["reg"]:
            bar.set_postfix_str(f"ridge {reg:g}: solving, then scoring {len(CCA_GRID['power'])} weightings on "
                                f"{valid.n_images:,} valid images")
            solution = cca_solve(moments, reg, eigs)
            for power in CCA_GRID["power"]:
                heads = cca_heads(solution, dim, power=power)
                with torch.no_grad():
                    img, txt = (h(x.float()) for h, x in zip(heads, (valid.image_features, valid.caption_features)))
                row = {"reg": reg, "power": power, **recall_summary(img, txt, valid.caption_image)}
                grid.append(row)
                if best is None or row[MEAN_RECALL] > best[0][MEAN_RECALL]:
                    best = (row, heads)
                bar.update()
    row, (image_head, text_head) = best
    valid_metrics = {k: v for k, v in row.items() if k not in ("reg", "power")}
    return CCAFit(image_head, text_head, row["reg"], row["power"], valid_metrics, grid)
