"""Phase 4, evaluate: scoring runs beside their baselines, and what is built on scored embeddings.

Metric modules (retrieval, zeroshot, fewshot, detection) each expose `compute(...) -> dict` of
flat named numbers, `chance(...) -> dict` with the same keys, and `METRIC`, their section of an
evaluation (`metric.Metric`), listed once in `metrics.METRICS`. `pipeline.run_eval` ties them into
`cli.py eval` (report, plots, one JSON per run); `search.Searcher` backs `cli.py search` and the
search page; `index` and `export` give FAISS indexes and clip-retrieval style embedding folders.
"""
