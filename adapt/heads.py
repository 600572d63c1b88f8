"""Projection heads: raw cached features of one tower -> a shared D-dim embedding space.

Every head owns its input standardisation (train mean/std kept as buffers), so a saved head takes
raw cached features straight from the HDF5 file, and `best.safetensors` alone rebuilds it.
Heads return unnormalised embeddings; losses and `AdaptedRun` L2-normalise.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from medembed.adapt.config import HEAD_KINDS, AdaptConfig
from medembed.common.tensors import unit


class Standardize(nn.Module):
    """(x - mean) / std with frozen buffers; identity until `fit` sees the training features."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    @torch.no_grad()
    def fit(self, x: torch.Tensor, chunk: int = 65536) -> Standardize:
        return self.fit_chunks(x[s : s + chunk] for s in range(0, x.shape[0], chunk))

    @torch.no_grad()
    def fit_chunks(self, chunks: Iterable[torch.Tensor]) -> Standardize:
        """One pass of float64 sums over row chunks, so millions of float16 rows (or rows streamed
        from disk) never need a float32 copy of them all."""
        n, total, sq = 0, None, None
        for c in chunks:
            c = c.double()
            total = c.sum(0) if total is None else total + c.sum(0)
            sq = (c * c).sum(0) if sq is None else sq + (c * c).sum(0)
            n += c.shape[0]
        if n == 0:
            raise ValueError("cannot standardise from zero training rows")
        mean = total / n
        var = ((sq - n * mean * mean) / max(n - 1, 1)).clamp_min(0)
        std = var.sqrt()
        self.mean.copy_(mean.float())
        # constant features would divide by ~0: leave them centred but unscaled
        self.std.copy_(torch.where(std > 1e-6, std, torch.ones_like(std)).float())
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean) / self.std


class Dropout(nn.Module):
    """nn.Dropout's semantics (zero with probability p, scale the rest by 1/(1-p); identity in eval)
    with the mask drawn as uniform < keep: on CPU that draw is about twice as fast as the per-element
    Bernoulli sampler, which otherwise costs a fifth of a training step on cached features."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        mask = (torch.rand(x.shape, device=x.device) >= self.p).to(x.dtype).mul_(1.0 / (1.0 - self.p))
        return x * mask

    def extra_repr(self) -> str:
        return f"p={self.p}"


class LinearHead(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm_in = Standardize(in_dim)
        self.drop = Dropout(dropout)
        self.proj = nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.drop(self.norm_in(x)))


class MLPHead(nn.Module):
    """proj = W1 x; out = LayerNorm(proj + Dropout(W2 GELU(proj))): the projection head of most CLIP
    re-implementations. The residual keeps the linear solution reachable, so the MLP can only add."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.1, input_dropout: float = 0.0):
        super().__init__()
        self.norm_in = Standardize(in_dim)
        self.drop_in = Dropout(input_dropout)
        self.proj = nn.Linear(in_dim, out_dim)
        self.act = nn.GELU()
        self.fc = nn.Linear(out_dim, out_dim)
        self.drop = Dropout(dropout)
        self.norm_out = nn.LayerNorm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.proj(self.drop_in(self.norm_in(x)))
        return self.norm_out(p + self.drop(self.fc(self.act(p))))


class ResidualHead(nn.Module):
    """CLIP-Adapter blend alpha * MLP(x) + (1 - alpha) * skip(x).

    Meant for backbones whose towers already share a space (CLIP): then in_dim == out_dim, the skip
    is the identity on L2-normalised input and the head starts as the backbone itself. When the
    dimensions differ (separate image and text encoders) there is no space to keep, so the skip
    becomes a learned linear map of standardised input and the head is a bottleneck MLP plus skip.
    """

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.1, alpha: float = 0.2, reduction: int = 4):
        super().__init__()
        self.alpha = alpha
        self.identity_skip = in_dim == out_dim
        hidden = max(out_dim // reduction, 8)
        self.norm_in = Standardize(in_dim)
        self.skip = nn.Identity() if self.identity_skip else nn.Linear(in_dim, out_dim)
        self.adapter = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.GELU(), Dropout(dropout), nn.Linear(hidden, out_dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.identity_skip:
            x = unit(x)
        else:
            x = self.norm_in(x)
        return self.alpha * self.adapter(x) + (1 - self.alpha) * self.skip(x)


class LinearMapHead(nn.Module):
    """A fixed affine map (x - mean) @ W: how closed-form solutions (CCA, Procrustes) are stored,
    so they save and load exactly like trained heads."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("weight", torch.zeros(in_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean) @ self.weight


class Projected(nn.Module):
    """A head followed by a fixed linear map to fewer dimensions: a compact run (`adapt.compact`). The
    map is applied to the head's output before the L2 normalisation every caller does, so whatever
    embeds with the head (eval, search, the index, the exported graphs) embeds compactly."""

    def __init__(self, head: nn.Module, projection: torch.Tensor):
        super().__init__()
        self.head = head
        self.register_buffer("projection", projection.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x) @ self.projection


def build_head(kind: str, in_dim: int, out_dim: int, *, dropout: float = 0.1, input_dropout: float = 0.0,
               alpha: float = 0.2) -> nn.Module:
    if kind == "linear":
        return LinearHead(in_dim, out_dim, dropout=input_dropout)
    if kind == "mlp":
        return MLPHead(in_dim, out_dim, dropout=dropout, input_dropout=input_dropout)
    if kind == "residual":
        return ResidualHead(in_dim, out_dim, dropout=dropout, alpha=alpha)
    if kind == "cca":
        return LinearMapHead(in_dim, out_dim)
    raise ValueError(f"unknown head {kind!r}; expected one of {', '.join(HEAD_KINDS)}")


def fit_input_stats(head: nn.Module, chunks: Iterable[torch.Tensor]) -> None:
    """Set every standardisation inside `head` (ensemble members included) from one pass over the
    training features; a no-op for heads without one."""
    norms = [m for m in head.modules() if isinstance(m, Standardize)]
    if not norms:
        return
    stats = Standardize(norms[0].mean.shape[0]).fit_chunks(chunks)
    for m in norms:
        m.load_state_dict(stats.state_dict())


class EnsembleHead(nn.Module):
    """K heads side by side; output is the concatenation of their unit embeddings / sqrt(K), so the
    cosine of two ensemble embeddings is exactly the mean of the members' cosines."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def member_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [m(x) for m in self.members]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [unit(o) for o in self.member_outputs(x)]
        return torch.cat(outs, dim=-1) / len(outs) ** 0.5


def build_heads(run_config: dict) -> tuple[nn.Module, nn.Module]:
    """Image and text heads as a run config describes them, initialised from its seed.

    Shared by training and run loading, so a saved run always rebuilds to the same shapes. The
    initialisation draws from a forked generator state: the caller's random stream is left as it was."""
    cfg = AdaptConfig.from_dict(run_config)
    image_dim, text_dim = int(run_config["image_dim"]), int(run_config["text_dim"])
    if cfg.head == "cca":
        return build_head("cca", image_dim, cfg.dim), build_head("cca", text_dim, cfg.dim)
    towers: list[list[nn.Module]] = [[], []]
    with torch.random.fork_rng(devices=[]):
        for k in range(cfg.ensemble):
            torch.manual_seed(cfg.seed * 1009 + k)
            for tower, in_dim in zip(towers, (image_dim, text_dim)):
                tower.append(build_head(cfg.head, in_dim, cfg.dim, dropout=cfg.dropout,
                                        input_dropout=cfg.input_dropout, alpha=cfg.alpha))
    if cfg.ensemble == 1:
        return towers[0][0], towers[1][0]
    return EnsembleHead(towers[0]), EnsembleHead(towers[1])
