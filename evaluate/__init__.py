"""Phase 4, evaluate: metrics, reports and plots for adapted runs, each beside its baselines, and
what is built on them (search, FAISS index, export, the search page).

Each metric module (retrieval, zeroshot, fewshot, detection) exposes `compute(...) -> dict` of flat
named numbers and `chance(...) -> dict` with the same keys; `run_eval` ties them into the
`cli.py eval` command and `evaluate.search.Searcher` backs `cli.py search`.

`run_eval` is resolved on first use, so importing one metric module (a benchmark, adapt-side
tooling) does not pull in plotting and the model-fitting libraries.
"""
from __future__ import annotations

__all__ = ["EvalOptions", "run_eval"]


def __getattr__(name: str):
    if name in __all__:
        from medembed.evaluate import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'evaluate' has no attribute {name!r}")
