"""Everything one adapter run depends on; saved as `runs/NAME/config.json` so a run can be rebuilt,
resumed and compared. The defaults are the ones the CLI uses.

The defaults were chosen on roco-rad validation recall (3.7k training pairs, EfficientNet-Lite0 +
MiniLM features): with so few pairs an MLP head overfits within 3 epochs, and the largest single
gain came from dropping 60% of the raw input features per step (valid R@10 ~37% -> ~44%); with
that regulariser a wide head (1024) and a higher learning rate (3e-3) pay off, where without it
they only overfit faster. Strong weight decay (0.5) and validating an exponential moving average of
the head weights (0.98 per step) each added about one point of mean test recall over 2-3 seeds
(BENCHMARKS.md, levers).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from medembed.adapt.heads import HEAD_KINDS
from medembed.adapt.losses import LOSS_KINDS

AUGMENT_KINDS = ("none", "concepts")


@dataclass
class AdaptConfig:
    features_dir: str
    out: str
    loss: str = "infonce"
    head: str = "mlp"
    dim: int = 1024
    epochs: int = 30
    batch_size: int = 256
    lr: float = 3e-3
    weight_decay: float = 0.5
    warmup_epochs: float = 1.0
    dropout: float = 0.1
    input_dropout: float = 0.6  # drops raw feature dims: the regulariser few-thousand-pair sets need most
    alpha: float = 0.2  # residual head blend
    temperature: float = 0.07  # InfoNCE initial temperature (learned, clamped at 1/100)
    learn_temperature: bool = True
    margin: float = 0.2  # margin loss
    augment: str = "none"
    concept_ratio: float = 0.5  # concept pairs drawn per caption pair when augment == "concepts"
    use_views: bool = True  # sample one augmented view per image per step when the cache has them
    ensemble: int = 1
    ema: float = 0.98  # > 0: validate and save an exponential moving average of the head weights (decay per step)
    patience: int = 5  # epochs without a better valid mean_recall before stopping
    seed: int = 0
    device: str = "auto"
    threads: int = 0  # 0: one thread for small steps (syncing threads costs more than it saves), else torch's choice
    max_memory_gb: float = 8.0  # above this the training split is streamed in chunks from disk
    chunk_rows: int = 65536
    eval_every: int = 1

    def __post_init__(self) -> None:
        if self.loss not in LOSS_KINDS:
            raise ValueError(f"loss must be one of {', '.join(LOSS_KINDS)}, got {self.loss!r}")
        if self.head not in HEAD_KINDS:
            raise ValueError(f"head must be one of {', '.join(HEAD_KINDS)}, got {self.head!r}")
        if self.augment not in AUGMENT_KINDS:
            raise ValueError(f"augment must be one of {', '.join(AUGMENT_KINDS)}, got {self.augment!r}")
        for name in ("dim", "epochs", "batch_size", "ensemble", "patience", "eval_every", "chunk_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.ema < 1.0:
            raise ValueError(f"ema must be in [0, 1) (0: off), got {self.ema}")
        if self.batch_size < 2 and self.head != "cca":
            raise ValueError("batch_size must be >= 2: a contrastive batch needs at least one negative")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> AdaptConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def from_run(cls, run_dir: str | Path) -> AdaptConfig:
        path = Path(run_dir) / "config.json"
        if not path.exists():
            raise FileNotFoundError(f"{path}: no config.json, not an adapter run folder")
        return cls.from_dict(json.loads(path.read_text()))
