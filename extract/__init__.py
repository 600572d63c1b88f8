"""Phase 1, extract: datasets in any supported layout (`datasets`, `records`, `synthetic`), the
backbone registry (`backbones`), and the resumable job that runs a frozen backbone once over a
dataset and writes the cache (`pipeline`, `worker`, `distributed`)."""
