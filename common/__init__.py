"""The bottom layer: small helpers every phase shares (devices, hashing, atomic writes, HDF5 strings,
split order, normalisation, chunked embedding) and the retrieval ranking that training and
evaluation both report. Imports nothing else of medembed."""
