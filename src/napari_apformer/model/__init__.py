"""Model families, their cards and their weights (imports torch)."""

from napari_apformer.model.apformer import APFormer, ModelOutput
from napari_apformer.model.base import (
    Prediction,
    SegmentationModel,
    Setting,
    build_model,
    families,
    register_family,
)
from napari_apformer.model.card import ModelCard
from napari_apformer.model.checkpoint import load_model, save_weights

__all__ = [
    "APFormer",
    "ModelCard",
    "ModelOutput",
    "Prediction",
    "SegmentationModel",
    "Setting",
    "build_model",
    "families",
    "load_model",
    "register_family",
    "save_weights",
]
