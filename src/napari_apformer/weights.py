"""Weights by name: those that ship with the package (`weights/` in the repository) and the
user's own (fine-tuned in the widget, in the user weights folder)."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_WEIGHTS = "mni152-tissue"
USER_WEIGHTS_ENV = "APFORMER_USER_WEIGHTS"  # overrides the user weights folder
APP_NAME = "napari-apformer"
USER_SUFFIX = " (yours)"  # after a user weights name that a shipped one already has


def weights_dir() -> Path:
    """`napari_apformer/weights` in an installed wheel, the repository's `weights/` otherwise."""
    packaged = Path(__file__).parent / "weights"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[2] / "weights"


def shipped_weights() -> dict[str, Path]:
    """Name -> safetensors file of every shipped weights file."""
    folder = weights_dir()
    return {p.stem: p for p in sorted(folder.glob("*.safetensors"))} if folder.is_dir() else {}


def shown_path(path: Path) -> str:
    """A path as the widget shows it: under the home folder as ~/..., so that messages and
    screenshots do not spell out the user's home."""
    try:
        return str(Path("~") / path.relative_to(Path.home()))
    except ValueError:
        return str(path)


def user_weights_dir() -> Path:
    """Where the widget saves fine-tuned weights: $APFORMER_USER_WEIGHTS if set, else
    `weights` in the platform's user data folder (platformdirs, which napari depends on;
    ~/.local/share/napari-apformer/weights without it). Not created here."""
    override = os.environ.get(USER_WEIGHTS_ENV)
    if override:
        return Path(override).expanduser()
    try:
        import platformdirs
    except ImportError:  # a command-line install without napari
        return Path.home() / ".local" / "share" / APP_NAME / "weights"
    return Path(platformdirs.user_data_dir(APP_NAME, appauthor=False)) / "weights"


def user_weights() -> dict[str, Path]:
    """Name -> safetensors file of the user's weights that have their card beside them
    (temporary and previous copies, whose names start with a dot, are left out)."""
    folder = user_weights_dir()
    if not folder.is_dir():
        return {}
    return {
        p.stem: p
        for p in sorted(folder.glob("*.safetensors"))
        if not p.name.startswith(".") and p.with_suffix(".json").is_file()
    }


def available_weights() -> dict[str, Path]:
    """The shipped weights, then the user's; a user name that a shipped one already has gets
    USER_SUFFIX."""
    names = shipped_weights()
    for name, path in user_weights().items():
        names[f"{name}{USER_SUFFIX}" if name in names else name] = path
    return names


def resolve_weights(name_or_path: str | Path | None) -> Path:
    """A shipped name (default: the default weights), a user weights name (when no file of
    that name exists here) or a path to a weights file."""
    name = DEFAULT_WEIGHTS if name_or_path is None else str(name_or_path)
    shipped = shipped_weights()
    if name in shipped:
        return shipped[name]
    if not Path(name).exists():
        mine = user_weights()
        if name in mine:
            return mine[name]
    return Path(name)
