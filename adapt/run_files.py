"""The files of a run folder, named once: every layer that reads or writes a run uses these names.

    config.json            the settings, feature widths and the provenance of the cache trained on
    metrics.jsonl          one line per epoch (loss, valid recall)
    best.safetensors       the chosen heads: what loading a run needs
    last.safetensors       everything `--resume` needs; removed when the run finishes (unless --keep-last)
    querybank.json         the query-bank setting chosen on valid
    summary.json           written last: its presence marks a finished run
    finetuned.safetensors  fine-tuned tower blocks + heads of a LiT or unfreezing run
    compact.safetensors    a compact run's projection of the heads' embeddings (`cli.py compact`)
    selection.safetensors  a refit run's heads as valid chose them (best.safetensors holds the refit's);
                           evaluation chooses its valid-tuned settings with these, which valid has not trained
"""
from __future__ import annotations

CONFIG = "config.json"
METRICS = "metrics.jsonl"
BEST = "best.safetensors"
LAST = "last.safetensors"
QUERYBANK = "querybank.json"
SUMMARY = "summary.json"
FINETUNED = "finetuned.safetensors"
COMPACT = "compact.safetensors"
SELECTION = "selection.safetensors"
