"""The widget's choices remembered from one napari session to the next: weights, device and
the model's run-time settings, in a small JSON file of the user config folder.

napari 0.9 has plugin settings (`napari.settings.get_plugin_settings`), but they need a
schema in the manifest, fixed in advance, while ours depend on the weights (each family
declares its own settings, a per-layer setting has one value per layer); and their folder is
set once per process, so tests could not give each test its own. Hence a file of our own:
$APFORMER_CONFIG_DIR if set, else the platform's user config folder (platformdirs).

Reading never fails: a missing, unreadable or malformed file gives empty choices, and the
widget checks each value before using it (weights gone, a device not here, a setting out of
range: the default instead, silently).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from napari_apformer.weights import APP_NAME

CONFIG_ENV = "APFORMER_CONFIG_DIR"  # overrides the folder (tests point it at a temp folder)
FILE_NAME = "widget-settings.json"
VERSION = 1
log = logging.getLogger(__name__)


@dataclass
class Remembered:
    """What the widget showed last. weights: a name of the weights list ("other file..."
    included); weights_file: the file chosen under "other file..."; settings: the model's
    settings by name (a number, or one per layer); per_layer: which per-layer check boxes
    were ticked."""

    weights: str | None = None
    weights_file: str | None = None
    device: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    per_layer: dict[str, bool] = field(default_factory=dict)


def config_dir() -> Path:
    override = os.environ.get(CONFIG_ENV)
    if override:
        return Path(override).expanduser()
    try:
        import platformdirs
    except ImportError:  # napari depends on platformdirs; this is only a fallback
        return Path.home() / ".config" / APP_NAME
    return Path(platformdirs.user_config_dir(APP_NAME, appauthor=False))


def settings_file() -> Path:
    return config_dir() / FILE_NAME


def load() -> Remembered:
    """The remembered choices; empty ones when there are none or the file is not ours."""
    path = settings_file()
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return Remembered()
    except (OSError, UnicodeDecodeError, ValueError) as error:
        log.info("APFormer: remembered settings not read (%s: %s)", path, error)
        return Remembered()
    if not isinstance(raw, dict) or raw.get("version") != VERSION:
        return Remembered()

    def text(key: str) -> str | None:
        value = raw.get(key)
        return value if isinstance(value, str) else None

    settings = raw.get("settings")
    per_layer = raw.get("per_layer")
    return Remembered(
        weights=text("weights"),
        weights_file=text("weights_file"),
        device=text("device"),
        settings=dict(settings) if isinstance(settings, dict) else {},
        per_layer=(
            {k: v for k, v in per_layer.items() if isinstance(v, bool)}
            if isinstance(per_layer, dict)
            else {}
        ),
    )


def save(remembered: Remembered) -> None:
    """Write the file atomically (a temporary file renamed over it). A folder that cannot be
    written is logged, not raised: remembering is a convenience."""
    path = settings_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as out:
                json.dump({"version": VERSION, **asdict(remembered)}, out, indent=2)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as error:
        log.warning("APFormer: settings not remembered (%s: %s)", path, error)
