"""Where trained heads meet backbones (the upper level of the adapt phase).

The rest of `adapt/` works on cached features only and never imports a backbone. This package
joins the two: the one-file fine-tuned checkpoint (`finetuned`), unlocking tower blocks and
running their tops from cached mid-layer activations (`towers`), the batches that feed them
(`sources`), and the training that moves them: periodic unfreezing and LiT mode (`unfreeze`).
Opening a run with its backbone to encode new inputs is `medembed.model.runs`, the layer above.
"""
