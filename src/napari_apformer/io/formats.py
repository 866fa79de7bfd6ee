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
    """The class names and colours beside a label file, or None when there are none (or the
    sidecar is not ours: a label file must open even when its sidecar is odd)."""
    path = class_table_path(labels_path)
    try:
        entries = json.loads(path.read_text("utf-8"))["labels"]
        return [
            {"value": int(e["value"]), "name": str(e["name"]), "colour": str(e["colour"])}
            for e in entries
        ]
    except (OSError, ValueError, KeyError, TypeError):
        return None
