"""Pictures: attention maps, PCA maps of patch features, 2-D embeddings, training curves."""
