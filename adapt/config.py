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

from dataclasses import asdict, dataclass, fields
from pathlib import Path

from medembed.adapt import run_files
from medembed.common.errors import BadOption, NotFound
from medembed.common.files import read_json
from medembed.common.planning import DEFAULT_MAX_MEMORY_GB

HEAD_KINDS = ("linear", "mlp", "residual", "cca")
LOSS_KINDS = ("infonce", "margin", "siglip")
AUGMENT_KINDS = ("auto", "concepts", "none")

_TRAINED = "has no effect on --head cca, which is solved in closed form"
# option -> (does this config read it?, why not when it does not)
ONLY_FOR = {
    **{name: (lambda c: c.head != "cca", _TRAINED) for name in (
        "loss", "epochs", "batch_size", "lr", "weight_decay", "warmup_epochs", "augment", "ensemble", "ema", "patience", "eval_every", "seed", "device", "threads", "refit")},
    "dropout": (lambda c: c.head in ("mlp", "residual"), "is the hidden dropout of the mlp and residual heads"),
    "input_dropout": (lambda c: c.head in ("mlp", "linear"), "drops raw features in the mlp and linear heads only"),
    "temperature": (lambda c: c.head != "cca" and c.loss == "infonce", "is the InfoNCE temperature"),
    "margin": (lambda c: c.head != "cca" and c.loss == "margin", "is the cosine margin of --loss margin"),
    "concept_ratio": (lambda c: c.head != "cca" and c.augment != "none" and c.hard_negatives == 0,
                      "applies with --augment concepts (or auto, without --hard-negatives)"),
    "concept_loss": (lambda c: c.head != "cca", _TRAINED),
    "concept_pretrain": (lambda c: c.head != "cca", _TRAINED),
    "graded": (lambda c: c.head != "cca" and c.loss == "infonce", "grades the InfoNCE targets (--loss infonce)"),
    "concept_min_train": (lambda c: c.concept_loss > 0 or c.concept_pretrain > 0,
                          "applies with --concept-loss or --concept-pretrain"),
    "hard_negatives": (lambda c: c.head != "cca" and c.augment != "concepts",
                       "builds batches of caption neighbours; not with --head cca or --augment concepts"),
    "hard_pool": (lambda c: c.hard_negatives > 0, "applies with --hard-negatives"),
}


@dataclass
class AdaptConfig:
    features_dir: str
    out: str
    loss: str | None = "infonce"  # None for the closed-form cca head
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
    # named concepts as extra positive texts, (image, concept prompt) pairs: modality zero-shot 77 -> 94%
    # on roco-rad for the default recipe (BENCHMARKS.md). "auto": when the training cache has named
    # concepts (and no --hard-negatives asks for caption-only batches), else none
    augment: str = "auto"
    concept_ratio: float = 0.5  # concept pairs drawn per caption pair when concept texts are used
    use_views: bool = True  # sample one augmented view per image per step when the cache has them
    # heads trained jointly, cosines averaged: +1.1 mean recall on roco-rad over one head for 4.4x the
    # time (about 3.5 min on 2 CPU cores; BENCHMARKS.md); a closed-form cca head is always one
    ensemble: int = 4
    concept_loss: float = 0.0  # > 0: weight of the auxiliary loss predicting each image's named concepts
    graded: float = 0.0  # > 0: share of the InfoNCE target given to batch pairs whose images share concepts
    concept_min_train: int = 5  # concepts with fewer training images are neither supervised (named ones) nor pre-trained
    # > 0: epochs of training the image head as a multi-label classifier of the concept labels before the
    # contrastive epochs (adapt.pretrain)
    concept_pretrain: int = 0
    hard_negatives: int = 0  # > 0: each batch anchor brings this many pairs whose captions are among its nearest
    hard_pool: int = 20  # ... drawn from this many nearest captions (cached caption features)
    # choose a query-bank normalisation on valid after training (common.querybank): +0.7 mean recall on
    # roco-rad test and +2.2 on flickr8k-1k over plain cosine for the default recipe (BENCHMARKS.md)
    querybank: bool = True
    # after the run chose its epoch (and query bank) on valid, train fresh heads on train + valid for that
    # many epochs and keep those (valid then no longer measures them: the chosen numbers stay the first run's):
    # roco-rad test mean recall +1.3, R@10 45.4 / 44.1 -> 48.5 / 48.2, for 2.3x the adapt time (BENCHMARKS.md).
    # None (auto): refit when train + valid fit in memory within max_memory_gb; True: refit or refuse
    refit: bool | None = None
    ema: float = 0.98  # > 0: validate and save an exponential moving average of the head weights (decay per step)
    patience: int = 5  # epochs without a better valid mean_recall before stopping
    seed: int = 0
    device: str = "auto"
    threads: int = 0  # 0: every core (torch's choice) unless a step is tiny (adapt.trainer.training_threads)
    # what the whole run may hold (GiB): the training split in memory when it fits, else streamed from disk in
    # chunks sized to fit, else refused before anything is read (adapt.memory)
    max_memory_gb: float = DEFAULT_MAX_MEMORY_GB
    chunk_rows: int = 65536
    eval_every: int = 1
    # last.safetensors (optimiser moments, weight averages: 277 MB for the default recipe) exists to
    # resume an interrupted run; a finished run removes it unless asked to keep it
    keep_last: bool = False

    def __post_init__(self) -> None:
        if self.head not in HEAD_KINDS:
            raise BadOption(f"head must be one of {', '.join(HEAD_KINDS)}, got {self.head!r}")
        if self.head == "cca":
            self.loss = None  # solved in closed form: no loss is involved, and config.json says so
        elif self.loss not in LOSS_KINDS:
            raise BadOption(f"loss must be one of {', '.join(LOSS_KINDS)}, got {self.loss!r}")
        if self.augment not in AUGMENT_KINDS:
            raise BadOption(f"augment must be one of {', '.join(AUGMENT_KINDS)}, got {self.augment!r}")
        for name in ("dim", "epochs", "batch_size", "ensemble", "patience", "eval_every", "chunk_rows", "hard_pool"):
            if getattr(self, name) < 1:
                raise BadOption(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.ema < 1.0:
            raise BadOption(f"ema must be in [0, 1) (0: off), got {self.ema}")
        for name in ("lr", "temperature"):
            if not getattr(self, name) > 0:
                raise BadOption(f"{name} must be > 0, got {getattr(self, name)}")
        if not self.max_memory_gb > 0:
            raise BadOption(f"max_memory_gb must be > 0, got {self.max_memory_gb}")
        for name in ("weight_decay", "warmup_epochs", "concept_ratio", "threads", "concept_loss",
                     "hard_negatives", "concept_pretrain"):
            if getattr(self, name) < 0:
                raise BadOption(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("dropout", "input_dropout", "graded"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise BadOption(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not -1.0 <= self.margin <= 1.0:
            raise BadOption(f"margin is a cosine and must be in [-1, 1], got {self.margin}")
        if self.hard_negatives > 0 and self.augment == "concepts":
            raise BadOption("hard_negatives builds batches of caption neighbours and cannot be combined with "
                            "augment concepts")
        if self.hard_negatives >= self.batch_size and self.head != "cca":
            raise BadOption(f"hard_negatives ({self.hard_negatives}) must be below batch_size ({self.batch_size})")
        if self.batch_size < 2 and self.head != "cca":
            raise BadOption("batch_size must be >= 2: a contrastive batch needs at least one negative")

    def to_dict(self) -> dict:
        return asdict(self)

    def ignored(self, given: set[str]) -> list[str]:
        """Which of the options in `given` (field names) this head and loss would silently ignore,
        each with the reason: the CLI refuses them rather than record a setting that had no effect."""
        out = []
        for name in sorted(given):
            rule = ONLY_FOR.get(name)
            if rule is not None and not rule[0](self):
                out.append(f"--{name.replace('_', '-')} {rule[1]}")
        return out

    @classmethod
    def from_dict(cls, d: dict) -> AdaptConfig:
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        if d.get("max_memory_gb", 1) <= 0:  # runs saved when 0 meant "always stream": a budget now, the default's
            d["max_memory_gb"] = cls.max_memory_gb
        return cls(**d)

    @classmethod
    def from_run(cls, run_dir: str | Path) -> AdaptConfig:
        path = Path(run_dir) / run_files.CONFIG
        if not path.exists():
            raise NotFound(f"{path}: no config.json, not an adapter run folder")
        saved = read_json(path)
        saved.setdefault("refit", False)  # a run saved before the refit existed was not refit: resuming keeps it so
        return cls.from_dict(saved)


def config_from_options(options: dict, explicit: set[str], resume: bool) -> AdaptConfig:
    """CLI options -> config. On --resume the saved config is the base and only options given on
    the command line override it (so `adapt --out runs/x --resume` alone continues the run).
    Options the chosen head or loss would ignore are refused, naming each and why."""
    out = Path(options["out"])
    if resume:
        if not (out / run_files.CONFIG).exists():
            raise NotFound(f"--resume: {out} holds no run to continue (no config.json); drop --resume "
                           "to start a new run there")
        saved = AdaptConfig.from_run(out).to_dict()
        saved.update({k: v for k, v in options.items() if k in explicit and v is not None})
        config = AdaptConfig.from_dict(saved)
    else:
        if not options.get("features_dir"):
            raise BadOption("--features is required (unless --resume continues a run in --out)")
        config = AdaptConfig.from_dict({k: v for k, v in options.items() if v is not None})
    ignored = config.ignored(explicit - {"features_dir", "out"})
    if ignored:
        raise BadOption("options that would have no effect on this run: " + "; ".join(ignored))
    return config
