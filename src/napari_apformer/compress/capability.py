"""What compression asks of a family beyond `model.base.Searchable`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from napari_apformer.errors import InputError
from napari_apformer.model.base import SegmentationModel


@runtime_checkable
class JointSearch(Protocol):
    """Importance factors on searchable dimensions and the smaller network they leave.

    A dimension is a kind of unit (APFormer: head_channels, heads, mlp_hidden) with a number
    of units per layer. Factors are multiplicative masks (1 at the start: the output does
    not change) that the forward pass applies while they are attached.
    """

    def searchable_dimensions(self) -> dict[str, list[int]]:
        """Dimension -> per-layer number of units."""
        ...

    def search_defaults(self) -> dict[str, dict[str, Any]]:
        """Dimension -> {"label", "lambda" (default L1 weight; 0: not searched), "min_keep"}."""
        ...

    def add_search_factors(self, dimensions: Sequence[str]) -> dict[str, list[nn.Parameter]]:
        """Attach factors (all 1) for these dimensions; dimension -> one per layer."""
        ...

    def search_factors(self) -> dict[str, list[nn.Parameter]]:
        """The attached factors (dimensions without factors are left out)."""
        ...

    def remove_search_factors(self) -> None: ...

    def slimmed_sizes(self, counts: Mapping[str, Sequence[int]]) -> dict[str, Any]:
        """The family's sizes for a network keeping `counts` units per layer."""
        ...

    def slimmed(self, keep: Mapping[str, Sequence[torch.Tensor]]) -> SegmentationModel:
        """The physically smaller network keeping the units marked in `keep` (one bool
        mask per layer), factors folded into its weights."""
        ...


def joint_search(model: SegmentationModel, source: object = None) -> JointSearch:
    """The model as a JointSearch, or an InputError naming its family."""
    if not isinstance(model, JointSearch):
        raise InputError(
            f"the {model.family} family has no searchable dimensions: it cannot be compressed",
            source,
        )
    return model
