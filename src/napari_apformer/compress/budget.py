"""Which units extraction keeps: one global threshold per dimension over the magnitudes of
its factors in every layer, a per-layer floor, and a budget.

The budget is either a fraction of units kept per dimension (ViT-Slim: threshold = the
(1 - fraction) quantile of the factors of that dimension over all layers; we compare |z|, not
z), or a target fraction of the parameters and/or of the unpruned FLOPs: then every searched
dimension keeps the same fraction, the largest that meets every target (found by bisection;
the cost of a candidate is counted on the network it would build, on the meta device).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from napari_apformer.compress.capability import JointSearch
from napari_apformer.errors import InputError
from napari_apformer.model.base import SegmentationModel, build_model

DEFAULT_KEEP = 0.7  # the spec's suggested budget (b.4)
DEFAULT_SIZE = 256  # input side for FLOPs of a family that takes any multiple
BISECTION_STEPS = 30


@dataclass(frozen=True)
class Budget:
    """keep: dimension -> fraction of its units kept (over all layers). Searched dimensions
    not named keep `default_keep`, or, with a target (max_params / max_flops: fractions of
    the original's parameters / unpruned FLOPs), the largest common fraction that meets it.
    min_keep: per-layer floor per dimension (default: the family's); round_to: kept counts
    per layer rounded up to a multiple of this (capped at the layer's size)."""

    keep: Mapping[str, float] = field(default_factory=dict)
    default_keep: float = DEFAULT_KEEP
    max_params: float | None = None
    max_flops: float | None = None
    min_keep: Mapping[str, int] = field(default_factory=dict)
    round_to: int = 1

    @property
    def has_target(self) -> bool:
        return self.max_params is not None or self.max_flops is not None

    def check(self, dimensions: Sequence[str]) -> None:
        named = {f"budget for {d}": v for d, v in self.keep.items()}
        named["default budget"] = self.default_keep
        named["target fraction of parameters"] = self.max_params
        named["target fraction of FLOPs"] = self.max_flops
        for name, value in named.items():
            if value is not None and not (math.isfinite(value) and 0.0 < value <= 1.0):
                raise InputError(f"{name} must be in (0, 1], got {value:g}")
        unknown = sorted((set(self.keep) | set(self.min_keep)) - set(dimensions))
        if unknown:
            raise InputError(
                f"no searchable dimension {', '.join(unknown)} (there are {', '.join(dimensions)})"
            )
        for name, count in self.min_keep.items():
            if count < 1:
                raise InputError(f"the per-layer floor for {name} must be at least 1")
        if self.round_to < 1:
            raise InputError("round_to must be at least 1")


@dataclass
class Cost:
    params: int
    flops: int


@dataclass
class Selection:
    """What extraction keeps: one bool mask per layer for every searchable dimension."""

    keep: dict[str, list[torch.Tensor]]
    fractions: dict[str, float]  # the fraction each dimension was asked to keep
    thresholds: dict[str, float]  # |z| at or above which a unit was kept (before floors)
    cost: Cost
    base: Cost

    @property
    def counts(self) -> dict[str, list[int]]:
        return {name: [int(m.sum()) for m in masks] for name, masks in self.keep.items()}

    def kept_fraction(self, name: str) -> float:
        masks = self.keep[name]
        return sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks)

    @property
    def params_fraction(self) -> float:
        return self.cost.params / self.base.params

    @property
    def flops_fraction(self) -> float:
        return self.cost.flops / self.base.flops

    def summary(self) -> dict[str, Any]:
        """For the model card (JSON values)."""
        depth = len(next(iter(self.keep.values())))
        return {
            "fractions_asked": dict(self.fractions),
            "fractions_kept": {name: round(self.kept_fraction(name), 6) for name in self.keep},
            "thresholds": {name: float(t) for name, t in self.thresholds.items()},
            "params": self.cost.params,
            "base_params": self.base.params,
            "params_fraction": round(self.params_fraction, 6),
            "flops_unpruned": self.cost.flops,
            "base_flops_unpruned": self.base.flops,
            "flops_fraction": round(self.flops_fraction, 6),
            "layers": [
                {
                    **{f"kept_{name}": int(masks[i].sum()) for name, masks in self.keep.items()},
                    **{
                        f"kept_{name}_index": masks[i].nonzero().flatten().tolist()
                        for name, masks in self.keep.items()
                    },
                }
                for i in range(depth)
            ],
        }


def keep_masks(
    values: Sequence[torch.Tensor], fraction: float, floor: int = 1, round_to: int = 1
) -> tuple[list[torch.Tensor], float]:
    """Per-layer bool masks keeping about `fraction` of all units by one threshold on the
    values (factor magnitudes) of every layer, then at least `floor` units per layer and
    counts rounded up to a multiple of `round_to`; ties at the threshold are all kept.
    Returns the masks and the threshold."""
    flat = torch.cat([v.flatten() for v in values])
    if fraction >= 1.0:
        threshold = -math.inf
    elif fraction <= 0.0:
        threshold = math.inf
    else:
        ordered = torch.sort(flat).values
        threshold = float(ordered[min(len(ordered) - 1, int((1.0 - fraction) * len(ordered)))])
    masks = []
    for v in values:
        mask = v >= threshold
        size = v.numel()
        wanted = max(int(mask.sum()), min(floor, size))
        wanted = min(size, -(-wanted // round_to) * round_to)
        if wanted > int(mask.sum()):
            order = torch.argsort(v, descending=True, stable=True)
            mask = torch.zeros(size, dtype=torch.bool)
            mask[order[:wanted]] = True
        masks.append(mask)
    return masks, threshold


def cost_of(model: SegmentationModel, counts: Mapping[str, Sequence[int]]) -> Cost:
    """Parameters and unpruned FLOPs of the network keeping `counts` (built on the meta
    device: no memory, no time)."""
    searchable: JointSearch = model  # type: ignore[assignment]
    sizes = searchable.slimmed_sizes(counts)
    with torch.device("meta"):
        slim = build_model(model.family, model.in_channels, model.n_classes, model.variant, sizes)
    side = model.input_rule.size or DEFAULT_SIZE
    params = sum(p.numel() for p in slim.parameters())
    return Cost(int(params), int(slim.reference_flops(side, side)))


def select(
    model: SegmentationModel,
    factors: Mapping[str, Sequence[torch.Tensor]],
    budget: Budget,
    base: Cost | None = None,
) -> Selection:
    """The units to keep at `budget`, ranked by the magnitudes of `factors` (dimension -> one
    tensor per layer; a dimension without factors keeps everything). InputError if the
    budget cannot be met or names a dimension that has nothing to rank.

    base: the cost the fractions are taken of (default: `model` keeping every unit; the
    pipeline gives the base weights' own when it added a pixel classification module)."""
    searchable: JointSearch = model  # type: ignore[assignment]
    dimensions = searchable.searchable_dimensions()
    defaults = searchable.search_defaults()
    budget.check(list(dimensions))
    values = {
        name: [f.detach().abs().float().cpu().flatten() for f in layers]
        for name, layers in factors.items()
    }
    for name, layers in values.items():
        if [v.numel() for v in layers] != dimensions[name]:
            raise ValueError(f"factors of {name} do not match the model's sizes")
    fixed: dict[str, float] = {}
    free: list[str] = []
    for name in dimensions:
        asked = budget.keep.get(name)
        if name not in values:
            if asked is not None and asked < 1.0:
                raise InputError(
                    f"a budget below 1 for {name}, which was not searched (its L1 weight is 0): "
                    "there are no factors to rank its units"
                )
            fixed[name] = 1.0
        elif asked is not None:
            fixed[name] = asked
        elif budget.has_target:
            free.append(name)
        else:
            fixed[name] = budget.default_keep
    floors = {
        name: int(budget.min_keep.get(name, defaults.get(name, {}).get("min_keep", 1)))
        for name in dimensions
    }
    costs: dict[tuple, Cost] = {}

    def at(common: float) -> Selection:
        keep, thresholds, fractions = {}, {}, {}
        for name, sizes in dimensions.items():
            fraction = fixed.get(name, common)
            fractions[name] = fraction
            if name in values:
                keep[name], thresholds[name] = keep_masks(
                    values[name], fraction, floors[name], budget.round_to
                )
            else:
                keep[name] = [torch.ones(n, dtype=torch.bool) for n in sizes]
        counts = {name: [int(m.sum()) for m in masks] for name, masks in keep.items()}
        key = tuple(tuple(c) for c in counts.values())
        if key not in costs:
            costs[key] = cost_of(model, counts)
        return Selection(keep, fractions, thresholds, costs[key], base)

    def meets(selection: Selection) -> bool:
        return (budget.max_params is None or selection.params_fraction <= budget.max_params) and (
            budget.max_flops is None or selection.flops_fraction <= budget.max_flops
        )

    if base is None:
        base = cost_of(model, dimensions)
    if not free:
        chosen = at(1.0)
        if budget.has_target and not meets(chosen):
            raise InputError(_unreachable(chosen, "the fixed budgets"))
        return chosen
    if meets(top := at(1.0)):
        return top
    low = at(0.0)
    if not meets(low):
        raise InputError(_unreachable(low, "only the per-layer floors"))
    lo, hi = 0.0, 1.0  # meets at lo, not at hi
    for _ in range(BISECTION_STEPS):
        middle = (lo + hi) / 2
        if meets(at(middle)):
            lo = middle
        else:
            hi = middle
    return at(lo)


def check_reachable(model: SegmentationModel, searched: Sequence[str], budget: Budget) -> None:
    """Before a search: InputError if no factors of `searched` could meet the budget (the
    per-layer floors alone exceed a target), found with stand-in factors."""
    dimensions = model.searchable_dimensions()  # type: ignore[attr-defined]
    generator = torch.Generator().manual_seed(0)
    stand_in = {
        name: [torch.rand(n, generator=generator) for n in dimensions[name]] for name in searched
    }
    select(model, stand_in, budget)


def _unreachable(selection: Selection, what: str) -> str:
    return (
        f"the target cannot be met: keeping {what} leaves {100 * selection.params_fraction:.1f} % "
        f"of the parameters and {100 * selection.flops_fraction:.1f} % of the FLOPs (lower the "
        "per-layer floors or search more dimensions)"
    )
