"""Where trained heads meet backbones (the upper level of the adapt phase).

The rest of `adapt/` works on cached features only and never imports a backbone. This package
joins the two: a run opened as a model that encodes new raw images and captions (`runs`), the
one-file fine-tuned checkpoint (`checkpoint`), unlocking tower blocks and running their tops from
cached mid-layer activations (`towers`), the batches that feed them (`sources`), and the training
that moves them: periodic unfreezing and LiT mode (`unfreeze`).
"""
