"""napari-apformer: segment medical images with APFormer and watch its pruning.

Importing the package is cheap (no torch); the model lives in `napari_apformer.model`, the
inference engine in `napari_apformer.engine`.
"""

__version__ = "0.1.0"
