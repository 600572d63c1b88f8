"""What makes two caches comparable, and a readable account of how two differ."""
from __future__ import annotations

from medembed.cache import schema
from medembed.common.errors import Incompatible

# What fixes the feature space: heads trained on one cannot read features from another.
BACKBONE_KEYS = (schema.BACKBONE, schema.WEIGHTS_SHA256, schema.PREPROCESS, schema.IMAGE_LAYER, schema.IMAGE_POOLING,
                 schema.TEXT_LAYER, schema.TEXT_POOLING)
# What identifies the data the features describe.
# decoding: window / frames when not the defaults; data_access: links followed out of the data folder;
# image_ids: records named by a keyed hash of their path (and which key), when they are
DATA_KEYS = (schema.DATASET, schema.DATASET_FINGERPRINT, schema.IMAGE_DECODING, schema.DATA_ACCESS, schema.IMAGE_ID_SCHEME)
# Keys that must match for features to be mixed or appended. Time, host and data location may differ.
COMPARED = (*BACKBONE_KEYS, *DATA_KEYS, schema.SPLIT, schema.DTYPE, schema.VIEWS, schema.TEMPLATES, schema.TOOLKIT_VERSION,
            schema.SHARD, schema.IMAGE_RUNTIME)  # recorded when not PyTorch: features of two runtimes are never mixed
# What a trained run records of the cache it was trained on (config.json "cache").
RUN_RECORD_KEYS = (*BACKBONE_KEYS, *DATA_KEYS, schema.TOOLKIT_VERSION, schema.SYNTHETIC)


def _short(v, n: int = 60) -> str:
    s = str(v)
    return s if len(s) <= n else s[: n - 3] + "..."


def differences(existing: dict, wanted: dict) -> list[str]:
    """Human-readable lines, one per differing key; empty when the two are compatible."""
    out = []
    for k in COMPARED:
        a, b = existing.get(k), wanted.get(k)
        if a is None and b is None:
            continue
        if str(a) != str(b):
            out.append(f"{k}: cache has {_short(a)!s}, this run has {_short(b)!s}")
    return out


def backbone_differences(existing: dict, wanted: dict) -> list[str]:
    return [d for d in differences(existing, wanted) if d.split(":", 1)[0] in BACKBONE_KEYS]


def feature_differences(existing: dict, wanted: dict) -> list[str]:
    """Differences in what the features are: their backbone and the data they describe (not the
    split, dtype or toolkit version), e.g. a cache against the record a trained run keeps of its own."""
    return [d for d in differences(existing, wanted) if d.split(":", 1)[0] in (*BACKBONE_KEYS, *DATA_KEYS)]


class ProvenanceMismatch(Incompatible):
    """Raised instead of silently mixing features of different backbones, weights or data."""

    def __init__(self, path, diffs: list[str]):
        self.path = str(path)
        self.diffs = diffs
        lines = "\n  ".join(diffs)
        super().__init__(
            f"{path}: refusing to mix features; the existing cache differs in provenance:\n  {lines}\n"
            "Use another --out folder, or delete that file to rebuild it."
        )
