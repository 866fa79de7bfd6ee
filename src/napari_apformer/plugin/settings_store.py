"""The widget's choices remembered from one napari session to the next, in napari's plugin
settings: File > Preferences > APFormer shows them, and napari keeps them in
`napari-apformer.yaml` beside its own settings file (so `NAPARI_CONFIG` moves both).

The manifest declares four fields (`configurations.widget` in napari.yaml): the weights, the
file chosen under "other file...", the device, and `run_settings`. napari's plugin settings
take flat strings, numbers and booleans only, while run-time settings depend on the weights
(each family declares its own; a per-layer setting has one value per layer). So
`run_settings` is one JSON text: for each weights (a list name, or the file's path), the
settings by name and which per-layer boxes were ticked. Each weights gets back its own.

Reading never fails: settings napari cannot give, or malformed text, give empty choices, and
the widget checks each value before using it (weights gone, a device not here, a setting out
of range: the default instead, silently).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

PLUGIN = "napari-apformer"
SECTION = "widget"  # the key under configurations in napari.yaml
log = logging.getLogger(__name__)


@dataclass
class WeightsSettings:
    """One weights' run-time settings by name (a number, or one per layer), and which
    per-layer check boxes were ticked."""

    settings: dict[str, Any] = field(default_factory=dict)
    per_layer: dict[str, bool] = field(default_factory=dict)


@dataclass
class Remembered:
    """What the widget showed last. weights: a name of the weights list ("other file..."
    included); weights_file: the file chosen under "other file..."; by_weights: the run-time
    settings of every weights used, keyed by `weights_key`."""

    weights: str | None = None
    weights_file: str | None = None
    device: str | None = None
    by_weights: dict[str, WeightsSettings] = field(default_factory=dict)


def weights_key(weights: str, weights_file: str | None) -> str:
    """Weights of the list by name; "other file..." by the file's path."""
    return weights_file if weights_file else weights


def _section() -> Any | None:
    """napari's settings object for our section; None where napari cannot give it (a plugin
    manager that does not know this plugin, settings that failed to build)."""
    try:
        from napari.settings import get_plugin_settings

        return getattr(get_plugin_settings(PLUGIN), SECTION)
    except Exception as error:  # remembering is a convenience: never fail the widget
        log.info("APFormer: napari's plugin settings are not available (%s)", error)
        return None


def parse_run_settings(text: str) -> dict[str, WeightsSettings]:
    try:
        raw = json.loads(text) if text else {}
    except ValueError:
        return {}
    if not isinstance(raw, dict):
        return {}
    parsed = {}
    for key, entry in raw.items():
        if not isinstance(entry, dict):
            continue
        settings = entry.get("settings")
        per_layer = entry.get("per_layer")
        parsed[str(key)] = WeightsSettings(
            settings=dict(settings) if isinstance(settings, dict) else {},
            per_layer=(
                {k: v for k, v in per_layer.items() if isinstance(v, bool)}
                if isinstance(per_layer, dict)
                else {}
            ),
        )
    return parsed


def load() -> Remembered:
    """The remembered choices; empty ones when there are none."""
    section = _section()
    if section is None:
        return Remembered()

    def text(name: str) -> str | None:
        value = getattr(section, name, None)
        return value if isinstance(value, str) and value else None

    return Remembered(
        weights=text("weights"),
        weights_file=text("weights_file"),
        device=text("device"),
        by_weights=parse_run_settings(getattr(section, "run_settings", "") or ""),
    )


def save(remembered: Remembered) -> None:
    """Hand the choices to napari, which writes its plugin settings file. A file that cannot
    be written is logged, not raised."""
    section = _section()
    if section is None:
        return
    run_settings = json.dumps(
        {
            key: {"settings": entry.settings, "per_layer": entry.per_layer}
            for key, entry in remembered.by_weights.items()
        },
        separators=(",", ":"),
    )
    try:
        section.update(
            {
                "weights": remembered.weights or "",
                "weights_file": remembered.weights_file or "",
                "device": remembered.device or "",
                "run_settings": run_settings,
            }
        )
    except (OSError, ValueError) as error:
        log.warning("APFormer: settings not remembered (%s)", error)
