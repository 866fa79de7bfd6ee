"""The authors' checkpoints: recognising them and reading their sizes from the tensors.

Parameter names are the release's own, so a release state_dict loads unchanged; the sizes
(CNN widths, per-layer heads, head widths and MLP widths) are read off the tensor shapes.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from napari_apformer.model.apformer.network import PATCH

SIGNATURE = ("inc.double_conv.0.weight", "outc.conv.weight", "trans4.pred_class.weight")
LAYER = "trans4.transformer.layers.{}.{}"


def recognise(state: Mapping[str, torch.Tensor]) -> dict | None:
    """{in_channels, n_classes, variant, sizes} of an APFormer state_dict, None if the keys
    are not APFormer's."""
    if not all(key in state for key in SIGNATURE):
        return None
    widths = [
        int(state[f"{name}.double_conv.3.weight"].shape[0])
        for name in ("inc", "down1.maxpool_conv.1", "down2.maxpool_conv.1", "down3.maxpool_conv.1")
        if f"{name}.double_conv.3.weight" in state
    ]
    layers = []
    depth = 0
    while LAYER.format(depth, 0) + ".fn.headsita" in state:
        attention = LAYER.format(depth, 0) + ".fn."
        heads = int(state[attention + "headsita"].shape[0])
        dim_head = int(state[attention + "thresh_for_kv.weight"].shape[1])
        mlp = int(state[LAYER.format(depth, 1) + ".fn.net.0.weight"].shape[0])
        # The release scales by 1/sqrt(dim_head); a recorded scale (compressed weights) comes
        # from the card, not from the tensors.
        layers.append({"heads": heads, "dim_head": dim_head, "mlp": mlp, "scale": dim_head**-0.5})
        depth += 1
    table = state.get(LAYER.format(0, 0) + ".fn.relative_position_bias_table")
    if len(widths) != 4 or not layers or table is None:
        return None
    grid = (round(table.shape[0] ** 0.5) + 1) // 2
    return {
        "in_channels": int(state[SIGNATURE[0]].shape[1]),
        "n_classes": int(state[SIGNATURE[1]].shape[0]),
        "variant": "default",
        "sizes": {"input_size": grid * PATCH, "widths": widths, "layers": layers},
    }
