"""Training data and training (the napari-free core)."""
