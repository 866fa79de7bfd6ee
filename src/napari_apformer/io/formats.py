"""Which reader and writer a file name calls for."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from napari_apformer.errors import InputError
from napari_apformer.io.files import compound_suffix, stem_of, write_atomically
from napari_apformer.io.image_file import ImageFile
from napari_apformer.io.images import read_image, write_image_labels
from napari_apformer.io.nifti import read_nifti, write_nifti_labels

NIFTI_SUFFIXES = (".nii", ".nii.gz")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
READABLE_SUFFIXES = NIFTI_SUFFIXES + IMAGE_SUFFIXES
MAX_CLASS_VALUE = 2**32 - 1  # the largest label value a sidecar may name


def is_readable_name(path: Path) -> bool:
    return compound_suffix(path) in READABLE_SUFFIXES


def read_image_file(path: Path) -> ImageFile:
    suffix = compound_suffix(path)
    if suffix in NIFTI_SUFFIXES:
        return read_nifti(path)
    if suffix in IMAGE_SUFFIXES:
        return read_image(path)
    raise InputError(f"unsupported file type; expected one of {', '.join(READABLE_SUFFIXES)}", path)


def label_suffix_for(source: Path) -> str:
    """Labels keep the source's format, except JPEG (lossy) which becomes PNG."""
    suffix = compound_suffix(source)
    return ".png" if suffix in (".jpg", ".jpeg") else suffix


def write_labels(path: Path, labels: np.ndarray, image: ImageFile) -> None:
    """Labels on the grid of `image.data`, in the format of `path`'s suffix."""
    if compound_suffix(path) in NIFTI_SUFFIXES:
        write_nifti_labels(path, labels, image.nifti, image.spacing)
    else:
        write_image_labels(path, labels)


def class_table_path(labels_path: Path) -> Path:
    return labels_path.with_name(stem_of(labels_path) + ".json")


def write_class_table(labels_path: Path, table: dict) -> None:
    """The JSON sidecar that carries class names and colours with a label file."""
    text = json.dumps(table, indent=2) + "\n"
    write_atomically(class_table_path(labels_path), lambda tmp: tmp.write_text(text, "utf-8"))


def read_class_table(labels_path: Path) -> list[dict] | None:
    """The class names and colours beside a label file; None when there is no sidecar or it
    is not ours (no "labels" list: a BIDS sidecar, say). InputError naming the sidecar when
    it is ours but unusable (bad JSON, nesting too deep, values such as 1e999), so that the
    caller can warn and open the labels without it."""
    path = class_table_path(labels_path)
    if not path.is_file():
        return None
    try:
        table = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError, RecursionError) as error:
        detail = (
            "nested too deeply"
            if isinstance(error, RecursionError)
            else " ".join(str(error).split())[:200]
        )
        raise InputError(f"not a readable JSON class table ({detail})", path) from None
    if not isinstance(table, dict) or "labels" not in table:
        return None
    try:
        entries = [
            {"value": int(e["value"]), "name": str(e["name"]), "colour": str(e["colour"])}
            for e in table["labels"]
        ]
        if not all(0 <= e["value"] <= MAX_CLASS_VALUE for e in entries):
            raise ValueError("label value out of range")
    except (ValueError, KeyError, TypeError, OverflowError, RecursionError):
        raise InputError(
            "the class table needs entries with an integer value (0 to "
            f"{MAX_CLASS_VALUE}), a name and a colour",
            path,
        ) from None
    return entries or None
