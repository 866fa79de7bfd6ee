"""APFormer's searchable dimensions: learnable importance factors for compression and the
physically smaller network they leave (issue 15; docs/compression.md,
../shared/spec/joint_search.md b.1).

Three kinds of factor, per transformer layer, each initialised to 1:

- `head_channels` (R^dim_head): channel j of every head, on Q, K and V alike (the "uniform"
  variant of ViT-Slim, our choice: `thresh_for_kv` is shared by all heads and every layer
  stays rectangular). Q K^T sees z_j^2, V sees z_j.
- `heads` (R^heads): whole heads, on Q, K and V (off by default).
- `mlp_hidden` (R^mlp): hidden units of the FFN, after the ReLU.

The factors are multiplicative masks in the forward pass. `to_qkv` has no bias, so scaling
channel j of q, k and v right after the head split is the same as scaling those rows of its
weight (the dependency ratio `thresh_for_kv(q)` then sees the masked q, as it must); a mask
after the ReLU is the same as scaling that column of the FFN's second Linear (the dropout
between them is elementwise). Both are torch parametrizations of those weights, so the
network's own forward pass is unchanged, and the folded weights of the smaller network are
exactly the products the search model computes. The softmax scale stays the one recorded in
the layer's sizes (1/sqrt(128) in the release) whatever width a layer keeps.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from napari_apformer.errors import InputError
from napari_apformer.model.apformer.attention import LayerSizes
from napari_apformer.model.base import build_model
from napari_apformer.model.factors import (
    UnitScale,
    effective_state,
    kept_index,
    remove_factors,
    scales,
)

if TYPE_CHECKING:
    from napari_apformer.model.apformer.network import APFormer

HEAD_CHANNELS, HEADS, MLP_HIDDEN = "head_channels", "heads", "mlp_hidden"
DIMENSIONS = (HEAD_CHANNELS, HEADS, MLP_HIDDEN)
LAYER = "trans4.transformer.layers.{}"

# The spec's suggested defaults (b.4): L1 weight per factor (summed), per-layer floor.
SEARCH_DEFAULTS: dict[str, dict[str, Any]] = {
    HEAD_CHANNELS: {
        "label": "head channels (one per channel of a head, shared by Q, K, V and all heads)",
        "lambda": 1e-4,
        "min_keep": 8,
    },
    HEADS: {"label": "whole attention heads", "lambda": 0.0, "min_keep": 1},
    MLP_HIDDEN: {"label": "MLP hidden units", "lambda": 1e-4, "min_keep": 32},
}


class QKVScale(nn.Module):
    """Parametrization of `to_qkv.weight` (rows [q; k; v], each head-major): row
    (t, h, j) times channels[j] * head_factors[h]."""

    def __init__(self, heads: int, dim_head: int, channels: bool, whole_heads: bool) -> None:
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        self.channels = nn.Parameter(torch.ones(dim_head)) if channels else None
        self.head_factors = nn.Parameter(torch.ones(heads)) if whole_heads else None

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        rows = weight.view(3, self.heads, self.dim_head, weight.shape[-1])
        if self.channels is not None:
            rows = rows * self.channels.to(weight.dtype)[None, None, :, None]
        if self.head_factors is not None:
            rows = rows * self.head_factors.to(weight.dtype)[None, :, None, None]
        return rows.reshape(weight.shape)


def searchable_dimensions(model: APFormer) -> dict[str, list[int]]:
    """Dimension -> per-layer number of factors (units that extraction may remove)."""
    sizes = model.layer_sizes
    return {
        HEAD_CHANNELS: [s.dim_head for s in sizes],
        HEADS: [s.heads for s in sizes],
        MLP_HIDDEN: [s.mlp for s in sizes],
    }


def _layers(model: APFormer) -> list[tuple[nn.Linear, nn.Linear]]:
    """(to_qkv, the FFN's second Linear) of each layer."""
    return [(attn.fn.to_qkv, ffn.fn.net[3]) for attn, ffn in model.trans4.transformer.layers]


def add_search_factors(model: APFormer, dimensions: Sequence[str]) -> dict[str, list[nn.Parameter]]:
    """Attach factors (all 1: the output does not change) for `dimensions`."""
    unknown = sorted(set(dimensions) - set(DIMENSIONS))
    if unknown:
        raise InputError(
            f"APFormer has no searchable dimension {', '.join(unknown)} (it has "
            f"{', '.join(DIMENSIONS)})"
        )
    if search_factors(model):
        raise ValueError("this model already has search factors")
    wanted = set(dimensions)
    for (qkv, fc2), sizes in zip(_layers(model), model.layer_sizes, strict=True):
        if wanted & {HEAD_CHANNELS, HEADS}:
            scale = QKVScale(sizes.heads, sizes.dim_head, HEAD_CHANNELS in wanted, HEADS in wanted)
            parametrize.register_parametrization(qkv, "weight", scale.to(qkv.weight.device))
        if MLP_HIDDEN in wanted:
            scale = UnitScale(sizes.mlp).to(fc2.weight.device)
            parametrize.register_parametrization(fc2, "weight", scale)
    return search_factors(model)


def search_factors(model: APFormer) -> dict[str, list[nn.Parameter]]:
    """The attached factors: dimension -> one parameter per layer (dimensions without
    factors are left out)."""
    found: dict[str, list[nn.Parameter]] = {}
    for qkv, fc2 in _layers(model):
        for scale in scales(qkv):
            if isinstance(scale, QKVScale):
                if scale.channels is not None:
                    found.setdefault(HEAD_CHANNELS, []).append(scale.channels)
                if scale.head_factors is not None:
                    found.setdefault(HEADS, []).append(scale.head_factors)
        for scale in scales(fc2):
            if isinstance(scale, UnitScale):
                found.setdefault(MLP_HIDDEN, []).append(scale.units)
    return found


def remove_search_factors(model: APFormer) -> None:
    """Back to the plain weights (the factors are dropped, not folded)."""
    remove_factors([m for pair in _layers(model) for m in pair])


def slimmed_sizes(model: APFormer, counts: Mapping[str, Sequence[int]]) -> dict[str, Any]:
    """The sizes of the network that keeps `counts` units per layer (dimensions not given
    keep all); each layer keeps its softmax scale."""
    full = searchable_dimensions(model)
    layers = []
    for i, sizes in enumerate(model.layer_sizes):
        kept = {name: int(counts.get(name, full[name])[i]) for name in DIMENSIONS}
        for name, value in kept.items():
            if not 1 <= value <= full[name][i]:
                raise ValueError(f"layer {i}: {value} {name} kept of {full[name][i]}")
        layers.append(
            asdict(LayerSizes(kept[HEADS], kept[HEAD_CHANNELS], kept[MLP_HIDDEN], sizes.scale))
        )
    return {**model.sizes(), "layers": layers}


@torch.no_grad()
def slimmed(model: APFormer, keep: Mapping[str, Sequence[torch.Tensor]]) -> APFormer:
    """A physically smaller APFormer that keeps the units `keep` marks (dimension -> one
    bool mask per layer; dimensions not given keep all), with the current factors folded
    into its weights: it computes what `model` computes with the removed units' factors set
    to 0 (up to float rounding). Same device and mode as `model`, no card."""
    state = effective_state(model)
    indices = []
    for i, sizes in enumerate(model.layer_sizes):
        indices.append(
            {
                HEADS: kept_index(keep, HEADS, i, sizes.heads),
                HEAD_CHANNELS: kept_index(keep, HEAD_CHANNELS, i, sizes.dim_head),
                MLP_HIDDEN: kept_index(keep, MLP_HIDDEN, i, sizes.mlp),
            }
        )
    counts = {name: [len(ix[name]) for ix in indices] for name in DIMENSIONS}
    new_sizes = slimmed_sizes(model, counts)
    slim = build_model(model.family, model.in_channels, model.n_classes, model.variant, new_sizes)
    device = next(model.parameters()).device
    for i, (sizes, ix) in enumerate(zip(model.layer_sizes, indices, strict=True)):
        heads, channels, units = (ix[n].to(device) for n in (HEADS, HEAD_CHANNELS, MLP_HIDDEN))
        h, d = sizes.heads, sizes.dim_head
        attention, ffn = LAYER.format(i) + ".0.fn.", LAYER.format(i) + ".1.fn.net."
        qkv = state[attention + "to_qkv.weight"]
        qkv = qkv.view(3, h, d, -1).index_select(1, heads).index_select(2, channels)
        state[attention + "to_qkv.weight"] = qkv.reshape(-1, qkv.shape[-1])
        state[attention + "thresh_for_kv.weight"] = state[
            attention + "thresh_for_kv.weight"
        ].index_select(1, channels)
        out = state[attention + "to_out.0.weight"]
        out = out.view(out.shape[0], h, d).index_select(1, heads).index_select(2, channels)
        state[attention + "to_out.0.weight"] = out.reshape(out.shape[0], -1)
        state[attention + "headsita"] = state[attention + "headsita"].index_select(0, heads)
        table = attention + "relative_position_bias_table"
        state[table] = state[table].index_select(1, heads)
        state[ffn + "0.weight"] = state[ffn + "0.weight"].index_select(0, units)
        state[ffn + "0.bias"] = state[ffn + "0.bias"].index_select(0, units)
        state[ffn + "3.weight"] = state[ffn + "3.weight"].index_select(1, units)
    slim.load_state_dict({k: v.clone() for k, v in state.items()})
    slim.setting_values = dict(model.setting_values)
    return slim.to(device).train(model.training)
