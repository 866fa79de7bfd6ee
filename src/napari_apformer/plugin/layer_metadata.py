"""What a layer carries so that labels made from it can be written back exactly, and how
class names and colours are put on a Labels layer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from napari_apformer.io.image_file import NiftiGeometry

METADATA_KEY = "napari_apformer"
CLASSES_KEY = "napari_apformer_classes"


@dataclass(frozen=True)
class SourceInfo:
    """The file an image layer came from; `nifti` is its geometry when it is a NIfTI file.

    spacing: the voxel size the file's reader gave (for NIfTI: of the RAS voxel axes), which
    the command line gives the model too; None for layers made before it was recorded.
    """

    path: Path | None
    nifti: NiftiGeometry | None = None
    series: bool = False
    spacing: tuple[float, ...] | None = None

    def to_metadata(self) -> dict:
        return {METADATA_KEY: self}

    @staticmethod
    def of(metadata: dict | None) -> SourceInfo | None:
        info = (metadata or {}).get(METADATA_KEY)
        return info if isinstance(info, SourceInfo) else None


def class_features(table: list[dict]) -> dict[str, list]:
    """Labels `features`: napari shows the class name of the label under the cursor."""
    return {"index": [c["value"] for c in table], "class": [c["name"] for c in table]}


def class_colormap(table: list[dict]):
    """napari colours for the classes; background (0) transparent, others as the table says."""
    from napari.utils.colormaps import DirectLabelColormap

    colours: dict = {None: np.zeros(4, np.float32)}
    for entry in table:
        colours[entry["value"]] = (
            np.zeros(4, np.float32) if entry["value"] == 0 else _rgba(entry["colour"])
        )
    return DirectLabelColormap(color_dict=colours)


def class_table_of(features, metadata: dict | None) -> list[dict] | None:
    """The class table of a Labels layer: from our metadata, else from `index`/`class` features."""
    table = (metadata or {}).get(CLASSES_KEY)
    if table:
        return table
    try:
        index, names = list(features["index"]), list(features["class"])
    except (KeyError, TypeError):
        return None
    return [
        {"value": int(v), "name": str(n), "colour": "#808080"}
        for v, n in zip(index, names, strict=True)
    ]


def _rgba(colour: str) -> np.ndarray:
    """'#rrggbb' or '#rrggbbaa' to RGBA in [0, 1]; grey for anything else."""
    text = colour.lstrip("#")
    try:
        values = [int(text[i : i + 2], 16) / 255 for i in range(0, len(text), 2)]
    except ValueError:
        values = []
    if len(values) not in (3, 4):
        values = [0.5, 0.5, 0.5]
    return np.array(values + [1.0] * (4 - len(values)), np.float32)
