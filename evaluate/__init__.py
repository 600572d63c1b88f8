"""Phase 4, evaluate: scoring runs beside their baselines.

Metric modules (retrieval, zeroshot, fewshot, detection) each expose `compute(...) -> dict` of
flat named numbers, `chance(...) -> dict` with the same keys, and `METRIC`, their section of an
evaluation (`metric.Metric`), listed once in `metrics.METRICS`. `pipeline.run_eval` ties them into
`cli.py eval` (report, plots, one JSON per run). Serving what a run learned (search, the page,
indexes, export, explanation maps) is `medembed.serve`, beside this layer: neither imports the
other, and what both need (a run as a model, `medembed.model`) lies below them.
"""
