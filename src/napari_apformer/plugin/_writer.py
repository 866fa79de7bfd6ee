"""napari writers for Labels layers: NIfTI (geometry of the source image), PNG and TIFF.

A label volume made from a NIfTI image is written in that file's voxel order with its
affine, header and transform codes; class names and colours go into a JSON sidecar.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from napari_apformer.errors import InputError
from napari_apformer.io.display import nifti_from_display
from napari_apformer.io.formats import class_table_path, write_class_table
from napari_apformer.io.images import write_image_labels
from napari_apformer.io.nifti import write_nifti_labels
from napari_apformer.plugin.layer_metadata import SourceInfo, class_table_of


def write_nifti(path: str, data: np.ndarray, attributes: dict) -> list[str]:
    target = _with_suffix(Path(path), (".nii.gz", ".nii"), ".nii.gz")
    labels = _checked_labels(data, target)
    source = SourceInfo.of(attributes.get("metadata"))
    if source is not None and source.nifti is not None:
        geometry = source.nifti
        expected = geometry.reorientation.canonical_shape(geometry.source_shape)[::-1]
        if labels.shape != expected:
            raise InputError(
                f"labels of shape {labels.shape} do not match the source image "
                f"{source.path} (shown as {expected})",
                target,
            )
        canonical = nifti_from_display(labels)
        write_nifti_labels(target, canonical, source.nifti)
    else:
        write_nifti_labels(
            target, labels, None, attributes.get("scale"), attributes.get("translate")
        )
    return [str(target), *_write_classes(target, attributes)]


def write_png(path: str, data: np.ndarray, attributes: dict) -> list[str]:
    target = _with_suffix(Path(path), (".png",), ".png")
    write_image_labels(target, _checked_labels(data, target))
    return [str(target), *_write_classes(target, attributes)]


def write_tiff(path: str, data: np.ndarray, attributes: dict) -> list[str]:
    target = _with_suffix(Path(path), (".tif", ".tiff"), ".tif")
    write_image_labels(target, _checked_labels(data, target))
    return [str(target), *_write_classes(target, attributes)]


def _checked_labels(data: np.ndarray, target: Path) -> np.ndarray:
    labels = np.asarray(data)
    if not np.issubdtype(labels.dtype, np.integer) or labels.min(initial=0) < 0:
        raise InputError("labels must be non-negative integers", target)
    if labels.max(initial=0) > np.iinfo(np.uint16).max:
        raise InputError("label values above 65535 cannot be written", target)
    return labels


def _write_classes(target: Path, attributes: dict) -> list[str]:
    table = class_table_of(attributes.get("features"), attributes.get("metadata"))
    if not table:
        return []
    write_class_table(target, {"labels": table})
    return [str(class_table_path(target))]


def _with_suffix(path: Path, allowed: tuple[str, ...], default: str) -> Path:
    return path if path.name.lower().endswith(allowed) else path.with_name(path.name + default)
