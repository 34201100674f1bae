"""The RA-CM3 generator: model construction, retrieval-augmented training, decoding."""
