"""napari writers for Labels layers: NIfTI, NRRD (3D Slicer segments), MetaImage and DICOM
SEG in the geometry of the source image, PNG and TIFF.

A label volume made from a NIfTI, NRRD, MetaImage or DICOM source is written in that
source's voxel order and geometry; class names and colours go into a JSON sidecar (and,
beside NIfTI, an ITK-SNAP label description; in NRRD, Slicer's segment fields; in DICOM SEG,
the segment descriptions). docs/formats.md lists the formats.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from napari_apformer.errors import InputError
from napari_apformer.io.display import nifti_from_display
from napari_apformer.io.formats import (
    class_table_path,
    write_class_table,
    write_label_descriptions,
)
from napari_apformer.io.images import write_image_labels
from napari_apformer.io.nifti import write_nifti_labels
from napari_apformer.plugin.layer_metadata import SourceInfo, class_table_of, mixed_planes_note


def write_nifti(path: str, data: np.ndarray, attributes: dict) -> list[str]:
    target = _with_suffix(Path(path), (".nii.gz", ".nii"), ".nii.gz")
    labels = _checked_labels(data, target, attributes)
    _warn_mixed_planes(attributes, target)
    source = SourceInfo.of(attributes.get("metadata"))
    if source is not None and source.nifti is not None:
        canonical = _canonical_labels(labels, source, target)
        write_nifti_labels(target, canonical, source.nifti)
    else:
        write_nifti_labels(
            target, labels, None, attributes.get("scale"), attributes.get("translate")
        )
    table = _class_table(attributes)
    descriptions = write_label_descriptions(target, table, labels)
    return [str(target), *_write_classes(target, table), *map(str, descriptions)]


def write_nrrd(path: str, data: np.ndarray, attributes: dict) -> list[str]:
    """NRRD labels in the source's geometry with 3D Slicer's segment fields (`.seg.nrrd`
    opens in Slicer as a segmentation)."""
    from napari_apformer.io.label_files import write_seg_nrrd

    target = _with_suffix(Path(path), (".seg.nrrd", ".nrrd"), ".seg.nrrd")
    labels = _checked_labels(data, target, attributes)
    _warn_mixed_planes(attributes, target)
    source = _geometry_source(attributes, target, "NRRD")
    table = _class_table(attributes)
    write_seg_nrrd(target, _canonical_labels(labels, source, target), source.nifti, table)
    return [str(target), *_write_classes(target, table)]


def write_mha(path: str, data: np.ndarray, attributes: dict) -> list[str]:
    """MetaImage labels (one file, `.mha`) in the source's geometry."""
    from napari_apformer.io.itk_image import write_itk_labels

    target = _with_suffix(Path(path), (".mha",), ".mha")
    labels = _checked_labels(data, target, attributes)
    _warn_mixed_planes(attributes, target)
    source = _geometry_source(attributes, target, "MetaImage")
    write_itk_labels(target, _canonical_labels(labels, source, target), source.nifti)
    return [str(target), *_write_classes(target, _class_table(attributes))]


def write_dicom_seg(path: str, data: np.ndarray, attributes: dict) -> list[str]:
    """A DICOM Segmentation referencing the source series (the source must be DICOM)."""
    from napari_apformer.io.label_files import write_dicom_seg as write_seg

    target = _with_suffix(Path(path), (".dcm",), ".dcm")
    labels = _checked_labels(data, target, attributes)
    _warn_mixed_planes(attributes, target)
    source = SourceInfo.of(attributes.get("metadata"))
    if source is None or source.nifti is None:
        raise InputError(
            "DICOM SEG needs labels made on a DICOM series opened with APFormer's reader; "
            "this layer has no source series",
            target,
        )
    table = _class_table(attributes)
    canonical = _canonical_labels(labels, source, target)
    write_seg(target, canonical, source.nifti, table, source.path)
    return [str(target), *_write_classes(target, table)]


def write_png(path: str, data: np.ndarray, attributes: dict) -> list[str]:
    target = _with_suffix(Path(path), (".png",), ".png")
    write_image_labels(target, _checked_labels(data, target, attributes))
    return [str(target), *_write_classes(target, _class_table(attributes))]


def write_tiff(path: str, data: np.ndarray, attributes: dict) -> list[str]:
    target = _with_suffix(Path(path), (".tif", ".tiff"), ".tif")
    labels = _checked_labels(data, target, attributes)
    _warn_mixed_planes(attributes, target)
    write_image_labels(target, labels)
    return [str(target), *_write_classes(target, _class_table(attributes))]


def _geometry_source(attributes: dict, target: Path, format_name: str) -> SourceInfo:
    """The layer's source image with a geometry; InputError when it has none."""
    source = SourceInfo.of(attributes.get("metadata"))
    if source is None or source.nifti is None:
        raise InputError(
            f"{format_name} labels need the geometry of a NIfTI, NRRD, MetaImage or DICOM "
            "source opened with APFormer's reader; write PNG or TIFF labels for this layer",
            target,
        )
    return source


def _canonical_labels(labels: np.ndarray, source: SourceInfo, target: Path) -> np.ndarray:
    """Labels as shown by napari back in the source's RAS voxel order (checked shape)."""
    geometry = source.nifti
    assert geometry is not None
    expected = geometry.reorientation.canonical_shape(geometry.source_shape)[::-1]
    if labels.shape != expected:
        raise InputError(
            f"labels of shape {labels.shape} do not match the source image "
            f"{source.path} (shown as {expected})",
            target,
        )
    return nifti_from_display(labels)


def _warn_mixed_planes(attributes: dict, target: Path) -> None:
    note = mixed_planes_note(attributes.get("metadata"))
    if note:
        from napari.utils.notifications import show_warning

        show_warning(f"{note} ({target})")


def _checked_labels(data: np.ndarray, target: Path, attributes: dict) -> np.ndarray:
    """The labels to write; InputError, before anything is written, for values no label
    file holds or a sidecar path taken by a file apformer did not write (a BIDS sidecar)."""
    from napari_apformer.cohort import sidecar_blocker

    blocker = sidecar_blocker(target) if _class_table(attributes) else None
    if blocker:
        raise InputError(blocker)
    labels = np.asarray(data)
    if not np.issubdtype(labels.dtype, np.integer) or labels.min(initial=0) < 0:
        raise InputError("labels must be non-negative integers", target)
    if labels.max(initial=0) > np.iinfo(np.uint16).max:
        raise InputError("label values above 65535 cannot be written", target)
    return labels


def _class_table(attributes: dict) -> list[dict] | None:
    return class_table_of(attributes.get("features"), attributes.get("metadata"))


def _write_classes(target: Path, table: list[dict] | None) -> list[str]:
    if not table:
        return []
    write_class_table(target, {"labels": table})
    return [str(class_table_path(target))]


def _with_suffix(path: Path, allowed: tuple[str, ...], default: str) -> Path:
    return path if path.name.lower().endswith(allowed) else path.with_name(path.name + default)
