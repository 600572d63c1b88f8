"""What a tuning run is asked to do: which tower blocks train, when, and how fast.

Plain Python (no torch), so the command line takes its defaults from here at start-up."""
from __future__ import annotations

from dataclasses import dataclass

from medembed.common.errors import BadOption


@dataclass(frozen=True)
class UnlockSpec:
    """How much of each tower trains: 0 (locked), the top N blocks, or "all"."""

    image: int | str = 0
    text: int | str = 0

    @classmethod
    def parse(cls, spec: str) -> UnlockSpec:
        """`text:2`, `image:1,text:all`, or a bare `N` / `all` for both towers (what --unlock takes)."""
        spec = str(spec).strip().lower()
        if ":" not in spec:
            n = _count(spec, "--unlock")
            return cls(n, n)
        out = {"image": 0, "text": 0}
        for part in (p.strip() for p in spec.split(",") if p.strip()):
            tower, _, n = part.partition(":")
            if tower not in out:
                raise BadOption(f"--unlock {spec!r}: tower must be image or text, got {tower!r}")
            out[tower] = _count(n, f"--unlock {tower}")
        return cls(**out)

    @property
    def any(self) -> bool:
        return self.image != 0 or self.text != 0

    def __str__(self) -> str:
        return ",".join(f"{t}:{n}" for t, n in (("image", self.image), ("text", self.text)) if n != 0) or "none"


def _count(value: str, flag: str) -> int | str:
    if value == "all":
        return "all"
    try:
        n = int(value)
    except ValueError:
        raise BadOption(f"{flag} must be a whole number of top blocks or 'all', got {value!r}") from None
    if n < 0:
        raise BadOption(f"{flag} must be >= 0, got {n}")
    return n



@dataclass
class TuneConfig:
    """Which tower blocks train with the heads, when, and how fast."""

    # UnlockSpec: "text:N", "image:N,text:all", or N / all for both towers. None: the default for the mode,
    # the top 2 blocks of both towers for periodic unfreezing (every > 0), of the text tower (LiT) otherwise
    unlock: str | None = None
    every: int = 0  # 0: the unlocked blocks train with the heads every epoch; K: a cycle after every K adapter epochs
    epochs: int = 1  # periodic: epochs of each cycle
    backbone_lr: float = 1e-5  # the towers move slowly: their features are what the cache holds
    head_lr: float = 1e-4  # periodic: the heads arrive trained; a small step keeps them near what they learned
    weight_decay: float = 0.01  # on the towers' weights
    batch_size: int = 32  # periodic cycles; continuous mode uses the adapter's batch size
    cached_trunk: bool = False  # periodic: train from cached mid-layer activations instead of raw images
    grad_checkpointing: bool = False
    augment: bool = True  # random crops on the raw-image path
    workers: int = 0
    max_pairs: int = 0  # 0: every training caption per cycle epoch; else a fixed random subset (CPU budgets)
    rollback: bool = True  # undo a cycle that lowers the best validation recall
    data: str | None = None  # dataset folder; None: the cache's own data_root
    features_root: str | None = None  # where refreshed caches go; None: beside the current one
    extract_batch_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if self.unlock is None:
            self.unlock = "2" if self.every else "text:2"
        self.spec  # noqa: B018 - parse now: a bad --unlock is refused before anything is loaded
        if self.every < 0 or self.epochs < 1:
            raise BadOption(f"--unfreeze-every must be >= 0 and --unfreeze-epochs >= 1, got {self.every}, {self.epochs}")
        if self.batch_size < 2:
            raise BadOption("the tuning batch size must be >= 2: a contrastive batch needs a negative")
        spec = self.spec
        if not spec.any:
            raise BadOption("--unlock names no tower block to train")
        if self.every == 0 and (spec.image == "all" or spec.text == "all" and spec.image != 0):
            raise BadOption(f"--unlock {self.unlock}: training with the heads every epoch runs from cached "
                            "activations, so the image tower can only have its top blocks unlocked (and only with a "
                            "partly unlocked text tower); use --unfreeze-every for whole towers on raw images")
        if self.cached_trunk and "all" in (spec.image, spec.text):
            raise BadOption(f"--unlock {self.unlock}: a whole tower unlocked leaves no frozen trunk to cache")

    @property
    def spec(self) -> UnlockSpec:
        return UnlockSpec.parse(self.unlock)
