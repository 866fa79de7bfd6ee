"""MobileUtr's searchable dimensions: learnable importance factors for compression and the
physically smaller network they leave (issue 15; docs/compression.md,
../shared/spec/joint_search.md b.2).

The search covers the attention and MLP of the bottleneck blocks (LGL blocks first, then
the transformer blocks; they hold about half the parameters); the ConvUtr embedding, LocalAgg
and the decoder are not searched. Two kinds of factor per block, each initialised to 1:

- `head_channels` (R^dim_qk): channel j of every head (shared by the heads, as APFormer's).
  Transformer blocks (sample 1): on Q, K and V, so Q K^T sees z_j^2 and V sees z_j; proj's
  input columns follow V. LGL blocks (sample 2): on Q and K only. Their attention output goes
  through the depthwise `LocalProp` (with a bias) and a LayerNorm over all its channels, so a
  value channel at zero still changes the output: removing V channels there would not
  compute what the search model computed, and V is kept whole.
- `mlp_hidden` (R^hidden): hidden units of the MLP, after the GELU.

`qkv` has a bias, so scaling output channel j of q, k (and v) is scaling that row of its
weight and its bias: both are parametrized by the same factors. The MLP factor scales columns
of fc2 (`model.factors.UnitScale`). The softmax scale stays the one recorded in the block's
sizes (1/sqrt(C / h) of the release) whatever width a block keeps.

One global threshold per dimension covers both stages: LGL and transformer factors of
`head_channels` act alike on the scores (z^2 through Q K^T), and a per-block record of the
kept units needs every dimension over the same blocks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from napari_apformer.errors import InputError
from napari_apformer.model.base import build_model
from napari_apformer.model.factors import (
    UnitScale,
    effective_state,
    kept_index,
    remove_factors,
    scales,
)
from napari_apformer.model.mobileutr.blocks import BlockSizes, LGLBlock

if TYPE_CHECKING:
    from napari_apformer.model.mobileutr.network import MobileUtr

HEAD_CHANNELS, MLP_HIDDEN = "head_channels", "mlp_hidden"
DIMENSIONS = (HEAD_CHANNELS, MLP_HIDDEN)

# Our defaults: the spec's L1 weights (b.4); floors scaled to MobileUtr's narrow heads (16 and
# 32 channels, against APFormer's 128).
SEARCH_DEFAULTS: dict[str, dict[str, Any]] = {
    HEAD_CHANNELS: {
        "label": "head channels (one per channel of a head, shared by the heads: on Q, K and V "
        "in the transformer stage, on Q and K in the LGL stage)",
        "lambda": 1e-4,
        "min_keep": 4,
    },
    MLP_HIDDEN: {"label": "MLP hidden units", "lambda": 1e-4, "min_keep": 32},
}


class QKVChannelScale(nn.Module):
    """Parametrization of `qkv`'s weight and bias (rows [q; k; v], each head-major): the rows
    of channel j of every head's query and key, and with `values` its value, times
    channels[j]."""

    def __init__(self, heads: int, dim_qk: int, dim_v: int, values: bool) -> None:
        super().__init__()
        if values and dim_v != dim_qk:
            raise ValueError("values share the query/key factors only at equal widths")
        self.heads, self.dim_v, self.values = heads, dim_v, values
        self.channels = nn.Parameter(torch.ones(dim_qk))

    def forward(self, tensor: torch.Tensor) -> torch.Tensor:
        per_head = self.channels.to(tensor.dtype).repeat(self.heads)
        value = per_head if self.values else per_head.new_ones(self.heads * self.dim_v)
        rows = torch.cat([per_head, per_head, value])
        return tensor * rows.view(-1, *([1] * (tensor.dim() - 1)))


def _blocks(model: MobileUtr) -> list[tuple[str, LGLBlock]]:
    """(state_dict prefix, block) of every bottleneck block, LGL blocks first."""
    return [
        *((f"lklgl_bottleneck.{i}.", b) for i, b in enumerate(model.lklgl_bottleneck)),
        *((f"transformer_bottleneck.{i}.", b) for i, b in enumerate(model.transformer_bottleneck)),
    ]


def _values_searched(block: LGLBlock) -> bool:
    """Whether `head_channels` also covers V: in the transformer stage (no LocalProp)."""
    return block.SelfAttn.attn.sample == 1


def searchable_dimensions(model: MobileUtr) -> dict[str, list[int]]:
    """Dimension -> per-block number of factors (units that extraction may remove)."""
    return {
        HEAD_CHANNELS: [s.dim_qk for s in model.block_sizes],
        MLP_HIDDEN: [s.mlp for s in model.block_sizes],
    }


def add_search_factors(
    model: MobileUtr, dimensions: Sequence[str]
) -> dict[str, list[nn.Parameter]]:
    """Attach factors (all 1: the output does not change) for `dimensions`."""
    unknown = sorted(set(dimensions) - set(DIMENSIONS))
    if unknown:
        raise InputError(
            f"MobileUtr has no searchable dimension {', '.join(unknown)} (it has "
            f"{', '.join(DIMENSIONS)})"
        )
    if search_factors(model):
        raise ValueError("this model already has search factors")
    for (_, block), sizes in zip(_blocks(model), model.block_sizes, strict=True):
        attn, mlp = block.SelfAttn.attn, block.SelfAttn.mlp
        if HEAD_CHANNELS in dimensions:
            scale = QKVChannelScale(model.heads, sizes.dim_qk, sizes.dim_v, _values_searched(block))
            scale = scale.to(attn.qkv.weight.device)
            parametrize.register_parametrization(attn.qkv, "weight", scale)
            parametrize.register_parametrization(attn.qkv, "bias", scale)
        if MLP_HIDDEN in dimensions:
            scale = UnitScale(sizes.mlp).to(mlp.fc2.weight.device)
            parametrize.register_parametrization(mlp.fc2, "weight", scale)
    return search_factors(model)


def search_factors(model: MobileUtr) -> dict[str, list[nn.Parameter]]:
    """The attached factors: dimension -> one parameter per block (dimensions without
    factors are left out)."""
    found: dict[str, list[nn.Parameter]] = {}
    for _, block in _blocks(model):
        for scale in scales(block.SelfAttn.attn.qkv):
            if isinstance(scale, QKVChannelScale):
                found.setdefault(HEAD_CHANNELS, []).append(scale.channels)
        for scale in scales(block.SelfAttn.mlp.fc2):
            if isinstance(scale, UnitScale):
                found.setdefault(MLP_HIDDEN, []).append(scale.units)
    return found


def remove_search_factors(model: MobileUtr) -> None:
    """Back to the plain weights (the factors are dropped, not folded)."""
    remove_factors(
        [m for _, b in _blocks(model) for m in (b.SelfAttn.attn.qkv, b.SelfAttn.mlp.fc2)]
    )


def slimmed_sizes(model: MobileUtr, counts: Mapping[str, Sequence[int]]) -> dict[str, Any]:
    """The sizes of the network that keeps `counts` units per block (dimensions not given
    keep all); each block keeps its softmax scale, LGL blocks their value width."""
    full = searchable_dimensions(model)
    blocks = []
    for i, ((_, block), sizes) in enumerate(zip(_blocks(model), model.block_sizes, strict=True)):
        kept = {name: int(counts.get(name, full[name])[i]) for name in DIMENSIONS}
        for name, value in kept.items():
            if not 1 <= value <= full[name][i]:
                raise ValueError(f"block {i}: {value} {name} kept of {full[name][i]}")
        channels = kept[HEAD_CHANNELS]
        dim_v = channels if _values_searched(block) else sizes.dim_v
        blocks.append(asdict(BlockSizes(channels, dim_v, kept[MLP_HIDDEN], sizes.scale)))
    return {**model.sizes(), "blocks": blocks}


def head_major(heads: int, width: int, kept: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """Indices of channels `kept` of every head in a head-major block of heads x width."""
    starts = offset + width * torch.arange(heads, device=kept.device)
    return (starts[:, None] + kept[None, :]).flatten()


@torch.no_grad()
def slimmed(model: MobileUtr, keep: Mapping[str, Sequence[torch.Tensor]]) -> MobileUtr:
    """A physically smaller MobileUtr that keeps the units `keep` marks (dimension -> one
    bool mask per block; dimensions not given keep all), with the current factors folded
    into its weights: it computes what `model` computes with the removed units' factors set
    to 0 (up to float rounding). Same device and mode as `model`, no card."""
    state = effective_state(model)
    full = searchable_dimensions(model)
    indices = [
        {name: kept_index(keep, name, i, full[name][i]) for name in DIMENSIONS}
        for i in range(len(model.block_sizes))
    ]
    counts = {name: [len(ix[name]) for ix in indices] for name in DIMENSIONS}
    slim = build_model(
        model.family,
        model.in_channels,
        model.n_classes,
        model.variant,
        slimmed_sizes(model, counts),
    )
    device = next(model.parameters()).device
    h = model.heads
    blocks = zip(_blocks(model), model.block_sizes, indices, strict=True)
    for (prefix, block), sizes, ix in blocks:
        channels, units = ix[HEAD_CHANNELS].to(device), ix[MLP_HIDDEN].to(device)
        qk_rows, v_rows = h * sizes.dim_qk, h * sizes.dim_v
        queries = head_major(h, sizes.dim_qk, channels)
        keys = head_major(h, sizes.dim_qk, channels, qk_rows)
        if _values_searched(block):
            values = head_major(h, sizes.dim_v, channels, 2 * qk_rows)
            proj = prefix + "SelfAttn.attn.proj.weight"
            state[proj] = state[proj].index_select(1, head_major(h, sizes.dim_v, channels))
        else:
            values = torch.arange(2 * qk_rows, 2 * qk_rows + v_rows, device=device)
        rows = torch.cat([queries, keys, values])
        for tensor in ("weight", "bias"):
            key = f"{prefix}SelfAttn.attn.qkv.{tensor}"
            state[key] = state[key].index_select(0, rows)
        mlp = prefix + "SelfAttn.mlp."
        state[mlp + "fc1.weight"] = state[mlp + "fc1.weight"].index_select(0, units)
        state[mlp + "fc1.bias"] = state[mlp + "fc1.bias"].index_select(0, units)
        state[mlp + "fc2.weight"] = state[mlp + "fc2.weight"].index_select(1, units)
    slim.load_state_dict({k: v.clone() for k, v in state.items()})
    slim.setting_values = dict(model.setting_values)
    return slim.to(device).train(model.training)
