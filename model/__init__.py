"""A trained run as something that embeds: the layer evaluation and serving both stand on.

`runs` opens any run reference (a run folder, an unfreezing run folder, its fine-tuned checkpoint)
with the backbone that encodes new raw images and captions for it, and points runs at a new
dataset encoded by that backbone; `embedding.EmbeddingModel` is a run, a baseline or a pair of heads
reduced to two raw-feature -> embedding maps and its query-bank ranking; `thumbnails` and `grids`
draw pool images and a query's hits. `evaluate` scores these models and `serve` answers queries with
them; neither imports the other, so everything the two share lives here or below.
"""
