"""What a layer carries so that labels made from it can be written back exactly, and how
class names and colours are put on a Labels layer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from napari_apformer.io.acquisition import Acquisition
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
    acquisition: Acquisition | None = None  # what kind of scan the file says it is

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
            np.zeros(4, np.float32) if entry["value"] == 0 else rgba(entry["colour"])
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


def rgba(colour: str) -> np.ndarray:
    """'#rrggbb' or '#rrggbbaa' to RGBA in [0, 1]; grey for anything else."""
    text = colour.lstrip("#")
    try:
        values = [int(text[i : i + 2], 16) / 255 for i in range(0, len(text), 2)]
    except ValueError:
        values = []
    if len(values) not in (3, 4):
        values = [0.5, 0.5, 0.5]
    return np.array(values + [1.0] * (4 - len(values)), np.float32)


# What a segmentation volume holds: the axis of the last complete volume run and the slices
# live runs wrote into it since along another axis (or, before any volume run, every slice
# a live run wrote). Kept in the Labels layer's metadata, so a writer can warn too.
PLANES_KEY = "napari_apformer_planes"


def note_volume_run(metadata: dict, axis_name: str) -> None:
    """A volume run along `axis_name` finished: every slice of the volume is from it."""
    metadata[PLANES_KEY] = {"volume_axis": axis_name, "live": []}


def note_live_plane(metadata: dict, axis_name: str, index: int) -> bool:
    """A live run wrote slice `index` along `axis_name`; True when that slice cuts across
    a finished volume run's slices (along another axis) and is the first to do so."""
    record = metadata.setdefault(PLANES_KEY, {"volume_axis": None, "live": []})
    volume_axis = record["volume_axis"]
    if volume_axis is not None and axis_name == volume_axis:
        return False
    plane = [axis_name, int(index)]
    if plane in record["live"]:
        return False
    record["live"].append(plane)
    return volume_axis is not None and len(record["live"]) == 1


def mixed_planes_note(metadata: dict | None) -> str | None:
    """A warning for saving (or showing) a segmentation volume that is not one volume run:
    None when it is."""
    record = (metadata or {}).get(PLANES_KEY)
    if not record or not record["live"]:
        return None
    axes = sorted({axis for axis, _ in record["live"]})
    count = len(record["live"])
    if record["volume_axis"] is None:
        return (
            f"the segmentation holds only the {count} slice(s) live runs made ({', '.join(axes)})"
            "; 'Run on volume' segments all of it"
        )
    return (
        f"the segmentation mixes the {record['volume_axis']} volume run with {count} "
        f"slice(s) from live runs along {', '.join(axes)}; run the volume again to save "
        "one consistent result"
    )
