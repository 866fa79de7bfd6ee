"""The network, its losses and its weights (imports torch)."""

from napari_apformer.model.apformer import APFormer, ModelOutput
from napari_apformer.model.card import ModelCard
from napari_apformer.model.checkpoint import load_model, save_weights

__all__ = ["APFormer", "ModelCard", "ModelOutput", "load_model", "save_weights"]
