"""Phase 3, adapt: projection heads trained on cached features (seconds on a CPU).

The core (config, heads, losses, data, state, trainer, closed_form, checkpoint, run) reads only
the cache and never a backbone: `trainer.train` runs `state.fit` over batches of cached features.
`adapt.tuning` is the level above it, where heads meet backbones: runs opened as models, the
fine-tuned checkpoint, periodic unfreezing and LiT mode.
"""
