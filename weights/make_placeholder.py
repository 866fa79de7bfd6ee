"""Write the randomly initialised placeholder weights (used until trained weights ship).

python weights/make_placeholder.py
"""

from pathlib import Path

import torch

from napari_apformer.model import APFormer, ModelCard, save_weights
from napari_apformer.model.card import ClassInfo, Normalisation
from napari_apformer.weights import DEFAULT_WEIGHTS

torch.manual_seed(0)
model = APFormer(in_channels=1, n_classes=4)
card = ModelCard(
    name=DEFAULT_WEIGHTS,
    in_channels=1,
    classes=[ClassInfo(0, "background", "#000000")]
    + [ClassInfo(k, f"class {k}", c) for k, c in ((1, "#e6194b"), (2, "#3cb44b"), (3, "#4363d8"))],
    normalisation=Normalisation("percentile", 0.5, 99.5),
    token_threshold=0.9,
    gates=[-2.0] * 4,
    placeholder=True,
    description="Randomly initialised APFormer (torch.manual_seed(0)); NOT trained. It exists so "
    "that the command line and the engine run end to end before trained weights ship; its labels "
    "mean nothing.",
    training={"command": "python weights/make_placeholder.py", "data": "none"},
    licence="MIT (no data involved)",
)
save_weights(model, card, Path(__file__).parent / DEFAULT_WEIGHTS)
print(f"wrote {DEFAULT_WEIGHTS}.safetensors and .json")
