"""Importance factors of the joint search as torch parametrizations, and the slicing helpers
the families share (APFormer's `apformer/search.py`, MobileUtr's `mobileutr/search.py`).

A factor that scales an output unit of a Linear (a row of its weight and bias) or an input
unit (a column of its weight) is a parametrization of those tensors: the network's own
forward pass is unchanged, factors of 1 change no bit of its output, and the folded weights
of the smaller network are exactly the tensors the search model computed with.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize


class UnitScale(nn.Module):
    """Parametrization of a Linear's weight: column u times units[u] (a mask on input unit
    u, e.g. an MLP hidden unit after its activation)."""

    def __init__(self, units: int) -> None:
        super().__init__()
        self.units = nn.Parameter(torch.ones(units))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.units.to(weight.dtype)[None, :]


def scales(module: nn.Module, tensor: str = "weight") -> list[nn.Module]:
    """The parametrizations registered on `module.<tensor>` (none: [])."""
    if not parametrize.is_parametrized(module, tensor):
        return []
    return list(module.parametrizations[tensor])  # type: ignore[index,arg-type]


def remove_factors(modules: Sequence[nn.Module]) -> None:
    """Back to the plain tensors (the factors are dropped, not folded)."""
    for module in modules:
        for tensor in _parametrized(module):
            parametrize.remove_parametrizations(module, tensor, leave_parametrized=False)


def effective_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state_dict of the plain network, every parametrized tensor as the forward pass
    sees it (the factors folded in)."""
    state = {k: v for k, v in model.state_dict().items() if ".parametrizations." not in k}
    for name, module in model.named_modules():
        for tensor in _parametrized(module):
            state[f"{name}.{tensor}"] = getattr(module, tensor).detach()
    return state


def _parametrized(module: nn.Module) -> list[str]:
    """The names of the tensors of `module` that have parametrizations."""
    if not parametrize.is_parametrized(module):
        return []
    return list(module.parametrizations)  # type: ignore[arg-type]


def kept_index(
    keep: Mapping[str, Sequence[torch.Tensor]], name: str, layer: int, size: int
) -> torch.Tensor:
    """The indices of the units of dimension `name` that layer `layer` (of `size` units)
    keeps: all where `keep` has no masks for the dimension."""
    masks = keep.get(name)
    if masks is None:
        return torch.arange(size)
    mask = torch.as_tensor(masks[layer], dtype=torch.bool).cpu()
    if mask.shape != (size,):
        raise ValueError(f"layer {layer}: a {name} mask of shape {tuple(mask.shape)}, not {size}")
    if not mask.any():
        raise ValueError(f"layer {layer}: the {name} mask keeps nothing")
    return mask.nonzero().flatten()
