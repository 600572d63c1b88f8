"""Phase 3: projection heads trained on cached features (seconds on a CPU), and the retrieval
metric shared with evaluation. Entry points live in `adapt.run`: `train`, `load_run`, `fit_closed_form`."""
