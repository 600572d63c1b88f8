"""Serving what a run learned, above evaluation: `search.Searcher` (a run's pool, ready for queries)
backs `cli.py search`, the search page and JSON API (`page`), FAISS indexes (`index`), the
clip-retrieval style export (`export`) and "why did it match" maps (`explain`).

Nothing here imports the eval pipeline: scoring and serving share only what lies below them (the
cache's pool image paths and captions, the run's models and query-bank offsets, the metric helpers).
"""
