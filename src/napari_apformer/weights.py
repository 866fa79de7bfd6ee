"""The weights that ship with the package (`weights/` in the repository)."""

from __future__ import annotations

from pathlib import Path

DEFAULT_WEIGHTS = "mni152-tissue"


def weights_dir() -> Path:
    """`napari_apformer/weights` in an installed wheel, the repository's `weights/` otherwise."""
    packaged = Path(__file__).parent / "weights"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[2] / "weights"


def shipped_weights() -> dict[str, Path]:
    """Name -> safetensors file of every shipped weights file."""
    folder = weights_dir()
    return {p.stem: p for p in sorted(folder.glob("*.safetensors"))} if folder.is_dir() else {}


def resolve_weights(name_or_path: str | Path | None) -> Path:
    """A shipped name (default: the default weights) or a path to a weights file."""
    name = DEFAULT_WEIGHTS if name_or_path is None else str(name_or_path)
    return shipped_weights().get(name, Path(name))
