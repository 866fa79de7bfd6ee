"""Which reader and writer a file name (or a DICOM folder) calls for.

One reader per format: NIfTI (nibabel, io.nifti), PNG/JPEG/TIFF (io.images), NRRD and
MetaImage (SimpleITK, io.itk_image), DICOM series (GDCM in SimpleITK, io.dicom). Volumes of
every format come as the same ImageFile (RAS voxel array, RAS affine, spacing). docs/formats.md
lists them with their writers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from napari_apformer.errors import InputError
from napari_apformer.io.files import compound_suffix, stem_of, write_atomically
from napari_apformer.io.image_file import ImageFile
from napari_apformer.io.images import read_image, write_image_labels
from napari_apformer.io.itk_image import (
    ITK_SUFFIXES,
    LABEL_SUFFIX_OF,
    NRRD_SUFFIXES,
    read_itk_image,
    write_itk_labels,
)
from napari_apformer.io.nifti import read_nifti, write_nifti_labels

NIFTI_SUFFIXES = (".nii", ".nii.gz")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
READABLE_SUFFIXES = NIFTI_SUFFIXES + IMAGE_SUFFIXES + ITK_SUFFIXES
# What write_labels writes (DICOM SEG is io.label_files.write_dicom_seg: it needs the series).
WRITABLE_SUFFIXES = (".nii", ".nii.gz", ".png", ".tif", ".tiff", ".nrrd", ".mha")
MAX_CLASS_VALUE = 2**32 - 1  # the largest label value a sidecar may name


def is_readable_name(path: Path) -> bool:
    return compound_suffix(path) in READABLE_SUFFIXES


def is_dicom_source(path: Path) -> bool:
    """A folder holding DICOM files (subfolders included) or a DICOMDIR: read with
    io.dicom (scan_dicom / read_dicom_folder), each series an image of its own."""
    from napari_apformer.io.dicom import is_dicom_source as found

    return found(Path(path))


def read_image_file(path: Path) -> ImageFile:
    """The image in a file, or the one volume series of a DICOM folder or DICOMDIR (a folder
    with several series: io.dicom.read_dicom_folder reads each)."""
    suffix = compound_suffix(path)
    if suffix in NIFTI_SUFFIXES:
        return read_nifti(path)
    if suffix in IMAGE_SUFFIXES:
        return read_image(path)
    if suffix in ITK_SUFFIXES:
        return read_itk_image(path)
    if Path(path).is_dir() or Path(path).name.upper() == "DICOMDIR":
        from napari_apformer.io.dicom import read_dicom

        return read_dicom(path)
    raise InputError(
        f"unsupported file type; expected one of {', '.join(READABLE_SUFFIXES)} "
        "or a folder of DICOM files",
        path,
    )


def label_suffix_for(source: Path) -> str:
    """Labels keep the source's format, except JPEG (lossy) which becomes PNG, detached NRRD
    and MetaImage headers (.nhdr, .mhd) which become single files (.nrrd, .mha), and DICOM
    (a folder or DICOMDIR) whose labels are NIfTI in the series' geometry."""
    suffix = compound_suffix(source)
    if suffix in (".jpg", ".jpeg"):
        return ".png"
    if suffix in LABEL_SUFFIX_OF:
        return LABEL_SUFFIX_OF[suffix]
    if Path(source).is_dir() or Path(source).name.upper() == "DICOMDIR":
        return ".nii.gz"
    return suffix


def source_stem(image: ImageFile) -> str:
    """The stem that names outputs for an image: the file's stem, or for a DICOM series the
    folder, series number and description ('study_s003_CT_abdomen')."""
    itk = image.nifti.itk if image.nifti is not None else None
    if itk is not None and itk.dicom is not None:
        return itk.dicom.name
    return stem_of(image.source)


def write_labels(
    path: Path, labels: np.ndarray, image: ImageFile, classes: list[dict] | None = None
) -> None:
    """Labels on the grid of `image.data`, in the format of `path`'s suffix. NRRD labels
    carry 3D Slicer's segment names and colours from `classes` (the sidecar's "labels"
    table); the other formats ignore it (see write_label_descriptions)."""
    suffix = compound_suffix(path)
    if suffix in NIFTI_SUFFIXES:
        write_nifti_labels(path, labels, image.nifti, image.spacing)
    elif suffix == ".nrrd":
        from napari_apformer.io.label_files import write_seg_nrrd

        write_seg_nrrd(path, labels, image.nifti, classes)
    elif suffix in ITK_SUFFIXES:
        write_itk_labels(path, labels, image.nifti)
    else:
        write_image_labels(path, labels)


def label_description_paths(labels_path: Path) -> list[Path]:
    """The files besides the JSON sidecar that describe a label file's classes to other
    viewers: the ITK-SNAP label description beside NIfTI labels; none for other formats."""
    from napari_apformer.io.label_files import itksnap_labels_path

    if compound_suffix(labels_path) in NIFTI_SUFFIXES:
        return [itksnap_labels_path(labels_path)]
    return []


def write_label_descriptions(
    labels_path: Path, classes: list[dict] | None, labels: np.ndarray | None = None
) -> list[Path]:
    """Write label_description_paths(labels_path) from the class table; returns them."""
    from napari_apformer.io.label_files import write_itksnap_labels

    paths = label_description_paths(labels_path)
    for path in paths:
        write_itksnap_labels(path, classes, labels)
    return paths


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
        return _segments_in_header(labels_path)
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


def _segments_in_header(labels_path: Path) -> list[dict] | None:
    """Without a JSON sidecar, an NRRD's 3D Slicer segment fields name the classes."""
    if compound_suffix(labels_path) not in NRRD_SUFFIXES or not labels_path.is_file():
        return None
    from napari_apformer.io.label_files import read_segments

    return read_segments(labels_path)
