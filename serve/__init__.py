"""Serving what a run learned, beside evaluation: `search.Searcher` (a run's pool, ready for queries)
backs `cli.py search`, the search page and JSON API (`page`), FAISS indexes (`index`), the
clip-retrieval style export (`export`) and "why did it match" maps (`explain`).

Nothing here imports `medembed.evaluate`: scoring and serving share only what lies below them (the
cache's pool image paths and captions, the run as a model with its query-bank offsets and the grids
that draw its hits, `medembed.model`, and the ranking math, `common.ranking`).
"""
