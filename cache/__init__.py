"""Phase 2, cache: the HDF5 feature store, one file per dataset x split x backbone (`reader`,
`writer`), its provenance rules (`provenance`), and crash-safe writing (`parts`, `lock`, `shards`)."""
