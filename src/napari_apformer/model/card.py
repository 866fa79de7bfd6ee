"""The model card: what a weights file is for, how to build and feed it (JSON beside the
tensors).

Version 2 records the architecture ({family, variant, sizes}: every size needed to build the
network) and the defaults of the family's run-time settings. Version 1 cards (APFormer only,
`token_threshold` and `gates` at the top level) are read as APFormer with the release's sizes.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from napari_apformer.errors import InputError

CARD_VERSION = 2
DEFAULT_COLOURS = [
    "#000000",
    "#e6194b",
    "#3cb44b",
    "#4363d8",
    "#ffe119",
    "#f58231",
    "#911eb4",
    "#46f0f0",
    "#f032e6",
    "#bcf60c",
    "#fabebe",
    "#008080",
    "#e6beff",
    "#9a6324",
    "#800000",
    "#000075",
]


@dataclass
class ClassInfo:
    value: int
    name: str
    colour: str


@dataclass
class Normalisation:
    """Intensities to [0, 1]: the `low` and `high` percentiles of the image map to 0 and 1."""

    method: str = "percentile"
    low: float = 0.5
    high: float = 99.5

    def __post_init__(self) -> None:
        if self.method != "percentile" or not 0.0 <= self.low < self.high <= 100.0:
            raise ValueError(f"unsupported normalisation {self}")


@dataclass
class ModelCard:
    name: str
    in_channels: int
    classes: list[ClassInfo]
    normalisation: Normalisation = field(default_factory=Normalisation)
    # {family, variant, sizes}; empty: read from the tensors (foreign checkpoints)
    architecture: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)  # defaults of run-time settings
    placeholder: bool = False  # randomly initialised weights: results mean nothing
    sha256: str | None = None  # of the safetensors file, checked on load
    description: str = ""
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    licence: str = ""
    # What the weights were not made for, one short line each; front ends show them
    limits: list[str] = field(default_factory=list)
    # The scans the weights were made for, as files state them (io.acquisition):
    # {"modality": "MR", "contrasts": ["T1w"]}; front ends warn on another kind. Empty: unknown.
    made_for: dict[str, Any] = field(default_factory=dict)
    card_version: int = CARD_VERSION

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.classes]

    def class_table(self) -> list[dict]:
        """Value, name and colour of each class, as label sidecars and napari layers carry them."""
        return [asdict(c) for c in self.classes]

    @staticmethod
    def generic(name: str, in_channels: int, n_classes: int) -> ModelCard:
        """A card for weights that came without one (the authors' checkpoints)."""
        classes = [
            ClassInfo(
                k,
                "background" if k == 0 else f"class {k}",
                DEFAULT_COLOURS[k % len(DEFAULT_COLOURS)],
            )
            for k in range(n_classes)
        ]
        # The release scales inputs to [0, 1] without clipping outliers: min-max does that.
        return ModelCard(name, in_channels, classes, Normalisation(low=0.0, high=100.0))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @property
    def family(self) -> str | None:
        return self.architecture.get("family")

    @staticmethod
    def from_json(text: str, source: object) -> ModelCard:
        try:
            raw = json.loads(text)
            if not isinstance(raw, dict):
                raise ValueError("not a JSON object")
            if raw.get("card_version") == 1:
                raw = _from_version_1(raw)
            if raw.get("card_version") != CARD_VERSION:
                raise ValueError(f"card_version {raw.get('card_version')!r} is not 1 or 2")
            if not isinstance(raw.get("architecture", {}), dict) or not isinstance(
                raw.get("settings", {}), dict
            ):
                raise ValueError("architecture and settings must be objects")
            if not isinstance(raw.get("limits", []), list) or not all(
                isinstance(line, str) for line in raw.get("limits", [])
            ):
                raise ValueError("limits must be a list of strings")
            _check_made_for(raw.get("made_for", {}))
            raw["classes"] = [ClassInfo(**c) for c in raw["classes"]]
            raw["normalisation"] = Normalisation(**raw["normalisation"])
            card = ModelCard(**raw)
        except (ValueError, TypeError, KeyError, AttributeError) as error:
            raise InputError(f"not a valid model card ({error})", source) from None
        values = [c.value for c in card.classes]
        if values != list(range(len(values))):
            raise InputError(f"class values must be 0..K-1 in order, got {values}", source)
        return card

    @staticmethod
    def read(path: Path) -> ModelCard:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise InputError(f"cannot read the model card ({error})", path) from None
        return ModelCard.from_json(text, path)


def _check_made_for(made_for: object) -> None:
    if not isinstance(made_for, dict) or set(made_for) - {"modality", "contrasts"}:
        raise ValueError('made_for must be an object with "modality" and "contrasts"')
    contrasts = made_for.get("contrasts", [])
    if not isinstance(made_for.get("modality", ""), str) or not (
        isinstance(contrasts, list) and all(isinstance(c, str) for c in contrasts)
    ):
        raise ValueError("made_for: modality is a string, contrasts a list of strings")


def _from_version_1(raw: dict) -> dict:
    """A version 1 card (APFormer with the release's sizes) in version 2's terms."""
    raw = dict(raw)
    settings = {}
    if "token_threshold" in raw:
        settings["token_threshold"] = raw.pop("token_threshold")
    if "gates" in raw:
        settings["gate"] = raw.pop("gates")
    raw["settings"] = settings
    raw["architecture"] = {"family": "apformer", "variant": "default"}
    raw["card_version"] = CARD_VERSION
    return raw
