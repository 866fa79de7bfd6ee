"""napari writers for Labels layers: NIfTI, NRRD (3D Slicer segments), MetaImage and DICOM
SEG in the geometry of the source image, PNG and TIFF; and for Image layers (the widget's
attention, probability and fraction maps): float NIfTI, NRRD or MetaImage in the geometry of
the source image.

A label volume made from a NIfTI, NRRD, MetaImage or DICOM source is written in that
source's voxel order and geometry; class names and colours go into a JSON sidecar (and,
beside NIfTI, an ITK-SNAP label description; in NRRD, Slicer's segment fields; in DICOM SEG,
the segment descriptions). A layer one slice thick (the widget's per-slice maps) is written
on the source's whole grid, its slice found from where the layer sits, the other slices
empty (0 for labels, NaN for maps). docs/formats.md lists the formats.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from napari_apformer.errors import InputError
from napari_apformer.io.display import nifti_from_display, nifti_scale_translate
from napari_apformer.io.formats import (
    class_table_path,
    write_class_table,
    write_label_descriptions,
)
from napari_apformer.io.image_file import NiftiGeometry
from napari_apformer.io.images import write_image_labels
from napari_apformer.io.memory import require_memory
from napari_apformer.io.nifti import write_nifti_labels
from napari_apformer.plugin.layer_metadata import SourceInfo, class_table_of, mixed_planes_note


def write_nifti(path: str, data: np.ndarray, attributes: dict) -> list[str]:
    target = _target(Path(path), (".nii.gz", ".nii"), ".nii.gz")
    labels = _checked_labels(data, target, attributes)
    _warn_mixed_planes(attributes, target)
    source = SourceInfo.of(attributes.get("metadata"))
    if source is not None and source.nifti is not None:
        canonical = _on_source_grid(labels, attributes, source, target, 0)
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

    target = _target(Path(path), (".seg.nrrd", ".nrrd"), ".seg.nrrd")
    labels = _checked_labels(data, target, attributes)
    _warn_mixed_planes(attributes, target)
    source = _geometry_source(attributes, target, "NRRD")
    table = _class_table(attributes)
    write_seg_nrrd(
        target, _on_source_grid(labels, attributes, source, target, 0), source.nifti, table
    )
    return [str(target), *_write_classes(target, table)]


def write_mha(path: str, data: np.ndarray, attributes: dict) -> list[str]:
    """MetaImage labels (one file, `.mha`) in the source's geometry."""
    from napari_apformer.io.itk_image import write_itk_labels

    target = _target(Path(path), (".mha",), ".mha")
    labels = _checked_labels(data, target, attributes)
    _warn_mixed_planes(attributes, target)
    source = _geometry_source(attributes, target, "MetaImage")
    write_itk_labels(target, _on_source_grid(labels, attributes, source, target, 0), source.nifti)
    return [str(target), *_write_classes(target, _class_table(attributes))]


def write_dicom_seg(path: str, data: np.ndarray, attributes: dict) -> list[str]:
    """A DICOM Segmentation referencing the source series (the source must be DICOM)."""
    from napari_apformer.io.label_files import write_dicom_seg as write_seg

    target = _target(Path(path), (".dcm",), ".dcm")
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
    canonical = _on_source_grid(labels, attributes, source, target, 0)
    write_seg(target, canonical, source.nifti, table, source.path)
    return [str(target), *_write_classes(target, table)]


def write_png(path: str, data: np.ndarray, attributes: dict) -> list[str]:
    target = _target(Path(path), (".png",), ".png")
    write_image_labels(target, _checked_labels(data, target, attributes))
    return [str(target), *_write_classes(target, _class_table(attributes))]


def write_tiff(path: str, data: np.ndarray, attributes: dict) -> list[str]:
    target = _target(Path(path), (".tif", ".tiff"), ".tif")
    labels = _checked_labels(data, target, attributes)
    _warn_mixed_planes(attributes, target)
    write_image_labels(target, labels)
    return [str(target), *_write_classes(target, _class_table(attributes))]


def write_map_nifti(path: str, data: np.ndarray, attributes: dict) -> list[str]:
    """An image layer (a map of the widget, or an image opened with APFormer's reader) as a
    float32 NIfTI on its source image's voxel grid, with the source's affine and header."""
    from napari_apformer.io.map_files import write_nifti_map

    target = _target(Path(path), (".nii.gz", ".nii"), ".nii.gz")
    values, geometry = _map_values(data, attributes, target)
    write_nifti_map(target, values, geometry, _map_description(attributes), _limits(attributes))
    return [str(target)]


def write_map_nrrd(path: str, data: np.ndarray, attributes: dict) -> list[str]:
    """An image layer as a float32 NRRD in its source image's geometry."""
    from napari_apformer.io.map_files import write_itk_map

    target = _target(Path(path), (".nrrd",), ".nrrd")
    values, geometry = _map_values(data, attributes, target)
    write_itk_map(target, values, geometry, _map_fields(attributes))
    return [str(target)]


def write_map_mha(path: str, data: np.ndarray, attributes: dict) -> list[str]:
    """An image layer as a float32 MetaImage (`.mha`) in its source image's geometry."""
    from napari_apformer.io.map_files import write_itk_map

    target = _target(Path(path), (".mha",), ".mha")
    values, geometry = _map_values(data, attributes, target)
    write_itk_map(target, values, geometry, _map_fields(attributes))
    return [str(target)]


def _map_values(data, attributes: dict, target: Path) -> tuple[np.ndarray, NiftiGeometry]:
    """The layer's values (float32, RAS voxel order) on its source's whole grid, NaN where
    it has none; InputError, before anything is written, for a layer without a source
    geometry, a colour image, or one that is not on its source's grid."""
    name = attributes.get("name") or "this layer"
    source = SourceInfo.of(attributes.get("metadata"))
    if source is None or source.nifti is None:
        raise InputError(
            f"'{name}' carries no source geometry: only maps made by the APFormer widget "
            "from (and images opened with APFormer's reader from) a NIfTI, NRRD, MetaImage "
            "or DICOM file can be saved in a scanner geometry; save it as TIFF instead",
            target,
        )
    if attributes.get("rgb") or attributes.get("multiscale"):
        kind = "a colour image" if attributes.get("rgb") else "multiscale"
        raise InputError(f"'{name}' is {kind}; maps are single-channel volumes", target)
    values = np.asarray(data)
    if values.dtype.kind not in "biuf":
        raise InputError(f"'{name}' holds {values.dtype} values, not numbers", target)
    geometry = source.nifti
    shape = geometry.reorientation.canonical_shape(geometry.source_shape)
    require_memory(2 * 4 * int(np.prod(shape)), target, "writing this map")
    return _on_source_grid(values, attributes, source, target, np.nan, np.float32), geometry


def _map_description(attributes: dict) -> str:
    """What the map is: the layer's name, and what its values mean where the widget said."""
    what = (attributes.get("metadata") or {}).get("value")
    name = str(attributes.get("name") or "map")
    return f"{name}: {what}" if isinstance(what, str) and what else name


def _map_fields(attributes: dict) -> dict[str, str]:
    fields = {"apformer_map": _map_description(attributes)}
    limits = _limits(attributes)
    if limits is not None:
        fields["apformer_display_range"] = f"{limits[0]:g} {limits[1]:g}"
    return fields


def _limits(attributes: dict) -> tuple[float, float] | None:
    """The layer's contrast limits (the window napari shows it with), if it has finite ones."""
    try:
        low, high = (float(v) for v in attributes.get("contrast_limits") or ())
    except (TypeError, ValueError):
        return None
    return (low, high) if np.isfinite([low, high]).all() and low < high else None


def _on_source_grid(
    data,
    attributes: dict,
    source: SourceInfo,
    target: Path,
    fill: float,
    dtype: type | None = None,
) -> np.ndarray:
    """A layer shown by napari back in its source's RAS voxel order, on the source's whole
    grid: a layer of the source's shape as it is; a layer one slice thick (the widget's
    per-slice maps) at the source slice it sits on, `fill` elsewhere. Leading axes of length
    one (a 4D source's volume) are dropped. InputError for any other shape, or a slice that
    does not sit on the source's grid."""
    geometry = source.nifti
    assert geometry is not None
    expected = tuple(geometry.reorientation.canonical_shape(geometry.source_shape)[::-1])
    layer = np.asarray(data)
    lead = layer.ndim - 3
    if lead > 0 and all(n == 1 for n in layer.shape[:lead]):
        layer = layer.reshape(layer.shape[lead:])
    out_type = dtype or layer.dtype
    if layer.shape == expected:
        return nifti_from_display(layer.astype(out_type, copy=False))
    thin = [a for a in range(3) if layer.ndim == 3 and layer.shape[a] != expected[a]]
    if len(thin) != 1 or layer.shape[thin[0]] != 1:
        raise InputError(
            f"the layer's values of shape {np.shape(data)} do not match the source image "
            f"{source.path} (shown as {expected}, or one slice of it)",
            target,
        )
    axis = thin[0]
    index = _slice_index(attributes, geometry, axis, expected[axis], source, target)
    volume = np.full(expected, fill, dtype=out_type)
    where = [slice(None)] * 3
    where[axis] = slice(index, index + 1)
    volume[tuple(where)] = layer
    return nifti_from_display(volume)


def _placement(attributes: dict, key: str, default: float) -> np.ndarray:
    """The layer's scale or translate along its last three axes."""
    value = attributes.get(key)
    return np.asarray((default,) * 3 if value is None else value, float)[-3:]


def _slice_index(
    attributes: dict,
    geometry: NiftiGeometry,
    axis: int,
    count: int,
    source: SourceInfo,
    target: Path,
) -> int:
    """The source slice along napari axis `axis` a one-slice layer sits on, from its scale
    and translate against the source's placement (io.display)."""
    scale, translate = nifti_scale_translate(geometry)
    layer_scale = _placement(attributes, "scale", 1.0)
    layer_translate = _placement(attributes, "translate", 0.0)
    position = float((layer_translate[axis] - translate[axis]) / scale[axis])
    index = round(position)
    others = [a for a in range(3) if a != axis]
    on_grid = (
        np.allclose(layer_scale, scale, rtol=1e-6, atol=1e-6)
        and np.allclose(layer_translate[others], np.asarray(translate)[others], atol=1e-3)
        and abs(position - index) * scale[axis] <= 1e-3
        and 0 <= index < count
    )
    if not on_grid:
        raise InputError(
            "this one-slice layer does not sit on a slice of its source image "
            f"{source.path} (was the image layer moved or rescaled?)",
            target,
        )
    return index


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


def _target(path: Path, allowed: tuple[str, ...], default: str) -> Path:
    """The file to write: `path`, or `path` with `default` appended when it lacks one of the
    `allowed` suffixes. napari's save dialog confirmed replacing `path` only: a file already
    at the appended name is refused, never replaced unasked."""
    if path.name.lower().endswith(allowed):
        return path
    target = path.with_name(path.name + default)
    if target.exists():
        raise InputError(
            f"{target.name} already exists and was not the name confirmed for saving; "
            f"give the whole name ({target.name}) to replace it",
            target,
        )
    return target
