"""What a model family declares, so that the engine, the widget, the CLI and training need
no family's names: sizes, the input rule, run-time settings, the maps and counters a
prediction carries, and optional capabilities (small protocols checked with isinstance).

A family is a `SegmentationModel` subclass registered with `register_family`; a card's
`architecture` {family, variant, sizes} rebuilds it (`build_model`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

from napari_apformer.errors import InputError

SettingValue = float | list[float]


@dataclass(frozen=True)
class InputRule:
    """What input size the network takes: exactly `size` x `size`, or any height and width
    that are multiples of `multiple` (size None)."""

    size: int | None = None
    multiple: int = 1

    def check(self, height: int, width: int) -> None:
        if self.size is not None and (height, width) != (self.size, self.size):
            raise InputError(
                f"the network takes {self.size} x {self.size} inputs, got {height} x {width}"
            )
        if height % self.multiple or width % self.multiple:
            raise InputError(
                f"the network takes sizes that are multiples of {self.multiple}, got "
                f"{height} x {width}"
            )

    def describe(self) -> str:
        if self.size is not None:
            return f"{self.size} x {self.size}"
        return f"any multiple of {self.multiple}"


@dataclass(frozen=True)
class Setting:
    """A run-time knob: the widget makes a slider of it, the CLI `--set NAME=VALUE`."""

    name: str
    label: str
    low: float
    high: float
    default: SettingValue
    help: str
    per_layer: int = 0  # > 0: one value per layer (a single value is taken for all)
    step: float = 0.01
    # Open low end: the value must be greater than `low` (a threshold of 0 prunes everything).
    low_open: bool = False

    def check(self, value: object, source: object = None) -> SettingValue:
        """The value as a float, or a list of floats for a per-layer setting; InputError if
        it is out of range, NaN or the wrong length."""
        values = value if isinstance(value, Sequence) and not isinstance(value, str) else [value]
        try:
            numbers = [float(v) for v in values]  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise InputError(f"{self.name}: expected a number, got {value!r}", source) from None
        if not numbers:
            raise InputError(f"{self.name}: no value given", source)
        lower = "(" if self.low_open else "["
        for v in numbers:
            too_low = v <= self.low if self.low_open else v < self.low
            if not math.isfinite(v) or too_low or v > self.high:
                raise InputError(
                    f"{self.name} must be in {lower}{self.low:g}, {self.high:g}], got {v:g}",
                    source,
                )
        if not self.per_layer:
            if len(numbers) != 1:
                raise InputError(f"{self.name} takes one value, got {len(numbers)}", source)
            return numbers[0]
        if len(numbers) == 1:
            return numbers * self.per_layer
        if len(numbers) != self.per_layer:
            raise InputError(
                f"{self.name}: expected 1 or {self.per_layer} values, got {len(numbers)}", source
            )
        return numbers


@dataclass(frozen=True)
class MapSpec:
    """A per-slice map a prediction carries: (B, rows, cols) on a grid whose cells are
    `stride` x `stride` pixels of the model input. kind: "mask" (bool), "fraction" or
    "probability" (0..1)."""

    name: str
    label: str
    stride: int
    kind: str
    help: str = ""


@dataclass(frozen=True)
class CounterSpec:
    """A per-image count and what it is out of (kept tokens of all tokens, ...)."""

    name: str
    label: str


@dataclass
class Prediction:
    """What one forward pass gives: logits and the named extras the model declares.

    maps: name -> (B, rows, cols) (see MapSpec); counters: name -> (B, 2) [count, out of];
    flops: (B,) FLOPs this call spent per image; full_flops: (B,) what a plain pass at these
    settings would spend with nothing cached (None: the same as flops); attention: per image,
    what `QueryAttention.query_attention` needs (on request).
    """

    logits: torch.Tensor
    maps: dict[str, torch.Tensor] = field(default_factory=dict)
    counters: dict[str, torch.Tensor] = field(default_factory=dict)
    flops: torch.Tensor | None = None
    full_flops: torch.Tensor | None = None
    attention: list[Any] | None = None


class SegmentationModel(nn.Module):
    """The interface every family implements. Subclasses set `family`, build themselves from
    `sizes` and say how to recognise their checkpoints."""

    family: ClassVar[str]
    variants: ClassVar[Mapping[str, Mapping[str, Any]]]  # variant -> sizes

    def __init__(self, in_channels: int, n_classes: int, variant: str) -> None:
        super().__init__()
        self.in_channels, self.n_classes, self.variant = in_channels, n_classes, variant
        self.card = None  # ModelCard, set by load_model
        self.setting_values: dict[str, SettingValue] = {}  # defaults, from the card

    # -- what the family declares ------------------------------------------------------------
    @property
    def input_rule(self) -> InputRule:
        raise NotImplementedError

    def sizes(self) -> dict[str, Any]:
        """Every size needed to rebuild this network (JSON-serialisable)."""
        raise NotImplementedError

    @classmethod
    def from_sizes(
        cls, in_channels: int, n_classes: int, variant: str, sizes: Mapping[str, Any]
    ) -> SegmentationModel:
        raise NotImplementedError

    @classmethod
    def recognise(cls, state: Mapping[str, torch.Tensor]) -> dict[str, Any] | None:
        """For a foreign state_dict already in our naming (see `to_our_names`): the
        architecture {in_channels, n_classes, variant, sizes} it holds, or None if it is not
        this family's."""
        raise NotImplementedError

    @classmethod
    def to_our_names(cls, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A release's state_dict renamed to ours (identity where the names are the same)."""
        return dict(state)

    def declared_settings(self) -> list[Setting]:
        """Run-time settings with the family's own defaults (not the card's)."""
        return []

    def map_specs(self) -> list[MapSpec]:
        return []

    def counter_specs(self) -> list[CounterSpec]:
        return []

    def predict(self, x: torch.Tensor, want_attention: bool = False, **settings) -> Prediction:
        """x: (B, in_channels, H, W) in [0, 1], H and W as the input rule says."""
        raise NotImplementedError

    def reference_flops(self, height: int, width: int) -> int:
        """FLOPs of one plain pass with nothing pruned or cached (counted by torch)."""
        from torch.utils.flop_counter import FlopCounterMode

        device = next(self.parameters()).device
        x = torch.zeros(1, self.in_channels, height, width, device=device)
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            self.predict(x, **self.unpruned_settings())
        return int(counter.get_total_flops())

    def unpruned_settings(self) -> dict[str, SettingValue]:
        """Settings under which nothing is skipped (for the reference cost)."""
        return {}

    # -- derived -------------------------------------------------------------------------------
    def settings(self) -> list[Setting]:
        """The declared settings with this model's defaults (its card's values)."""
        out = []
        for s in self.declared_settings():
            default = self.setting_values.get(s.name, s.default)
            out.append(Setting(**{**s.__dict__, "default": default}))
        return out

    def resolve_settings(
        self, given: Mapping[str, object] | None = None, source: object = None
    ) -> dict[str, SettingValue]:
        """Every setting's value: `given` where set (not None), the defaults elsewhere."""
        given = {k: v for k, v in (given or {}).items() if v is not None}
        declared = {s.name: s for s in self.settings()}
        unknown = sorted(set(given) - set(declared))
        if unknown:
            known = ", ".join(declared) or "none"
            raise InputError(
                f"unknown setting {', '.join(unknown)} for {self.family} (settings: {known})",
                source,
            )
        return {n: s.check(given.get(n, s.default), source) for n, s in declared.items()}

    def set_defaults(self, values: Mapping[str, SettingValue]) -> None:
        """Make these checked values (a card's) the model's defaults."""
        self.setting_values = dict(values)

    def defaults(self) -> dict[str, SettingValue]:
        """The current defaults, as a card records them."""
        return {s.name: s.default for s in self.settings()}

    def architecture(self) -> dict[str, Any]:
        return {"family": self.family, "variant": self.variant, "sizes": self.sizes()}


@runtime_checkable
class CachedSplit(Protocol):
    """A costly part that does not depend on the settings (`encode`), reused by `decode`.

    `prepare_cache` may add settings-dependent work that later runs reuse (APFormer: layer 1
    at the current gate) and returns its FLOPs. Encoded values offer select(list)/cat/nbytes.
    """

    def encode(self, x: torch.Tensor) -> Any: ...

    def decode(self, encoded: Any, want_attention: bool = False, **settings) -> Prediction: ...

    def encode_flops(self, height: int, width: int) -> int: ...

    def prepare_cache(self, encoded: Any, **settings) -> int: ...


@runtime_checkable
class QueryAttention(Protocol):
    """Attention of one query point, per layer and head, after and before pruning."""

    def attention_grid(self, height: int, width: int) -> tuple[int, int, int]:
        """(rows, cols, stride) of the token grid for a model input of this size."""
        ...

    def attention_shape(self) -> tuple[int, int]:
        """(layers, heads)."""
        ...

    def attention_pruned(self) -> bool:
        """Whether the rows before pruning can differ from those after (the widget offers
        the "before pruning" view only then)."""
        ...

    def query_attention(
        self, state: Any, token: int, **settings
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(layers, heads, tokens) after and before pruning, from a Prediction.attention item."""
        ...


@runtime_checkable
class Trainable(Protocol):
    """What `apformer train` asks a family for."""

    def training_losses(
        self, x: torch.Tensor, target: torch.Tensor, step: int, **options
    ) -> dict[str, torch.Tensor]:
        """All loss terms and their weighted "total" for a batch (model in train mode)."""
        ...

    def parameter_groups(self, learning_rate: float, **options) -> list[dict[str, Any]]: ...


@runtime_checkable
class Searchable(Protocol):
    """Dimensions compression may slim: name -> per-layer sizes."""

    def searchable_dimensions(self) -> dict[str, list[int]]: ...


_FAMILIES: dict[str, type[SegmentationModel]] = {}


def register_family(cls: type[SegmentationModel]) -> type[SegmentationModel]:
    _FAMILIES[cls.family] = cls
    return cls


def families() -> dict[str, type[SegmentationModel]]:
    """Every registered family by name (the shipped ones are registered on import)."""
    from napari_apformer.model import apformer, mobileutr  # noqa: F401  (they register)

    return dict(_FAMILIES)


def family_class(name: str, source: object = None) -> type[SegmentationModel]:
    known = families()
    if name not in known:
        raise InputError(
            f"unknown model family {name!r}; known families: {', '.join(sorted(known))}", source
        )
    return known[name]


def build_model(
    family: str,
    in_channels: int,
    n_classes: int,
    variant: str | None = None,
    sizes: Mapping[str, Any] | None = None,
) -> SegmentationModel:
    """A family's network: `sizes` override the variant's sizes (variant default: the first)."""
    cls = family_class(family)
    variant = variant or next(iter(cls.variants))
    if variant not in cls.variants:
        raise InputError(
            f"unknown {family} variant {variant!r}; variants: {', '.join(cls.variants)}"
        )
    merged = {**cls.variants[variant], **(sizes or {})}
    return cls.from_sizes(in_channels, n_classes, variant, merged)
