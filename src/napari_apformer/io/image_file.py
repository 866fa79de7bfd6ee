"""What a reader hands on: pixels ready to slice, and what a writer needs to put labels back."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from napari_apformer.errors import InputError
from napari_apformer.io.geometry import Reorientation

if TYPE_CHECKING:
    from napari_apformer.io.acquisition import Acquisition
    from napari_apformer.io.dicom import DicomSeries

FLOAT32_MAX = float(np.finfo(np.float32).max)


def label_dtype(largest_label: int) -> type[np.unsignedinteger]:
    """uint8 where the labels fit, else uint16."""
    return np.uint8 if largest_label < 256 else np.uint16


def check_pixel_type(dtype: np.dtype, source: object, what: str = "pixel") -> None:
    """Integers, floats or booleans; InputError for complex, structured (colour NIfTI) and
    other types."""
    if dtype.kind not in "biuf" or dtype.fields is not None:
        raise InputError(f"unsupported {what} type {dtype}", source)


def check_float32_range(data: np.ndarray, source: object) -> None:
    """InputError when finite values are beyond float32, the model's input type (float64
    data, or a NIfTI scale slope that large): they would become inf there, then NaN."""
    if data.dtype.kind != "f" or data.dtype.itemsize <= 4:
        return
    largest = max(  # slice by slice: no full-size temporary
        (float(np.max(np.abs(part), where=np.isfinite(part), initial=0.0)) for part in data),
        default=0.0,
    )
    if largest > FLOAT32_MAX:
        raise InputError(
            f"values reach {largest:.3g}, beyond the float32 range (±{FLOAT32_MAX:.3g}) the "
            "model works in; rescale the image (or its scale slope) and try again",
            source,
        )


def spatial_ndim(data: np.ndarray, rgb: bool, source: object) -> int:
    """2 or 3 spatial axes (colour last when rgb); InputError for anything else."""
    spatial = data.ndim - int(rgb)
    if spatial not in (2, 3):
        raise InputError(
            f"{data.ndim}D data of shape {data.shape} is not supported: give a 2D image "
            "(grey or RGB) or a 3D volume",
            source,
        )
    return spatial


@dataclass(frozen=True)
class ItkGeometry:
    """The geometry of an NRRD, MetaImage or DICOM source as SimpleITK read it (LPS, as
    ITK and DICOM store it), kept so that labels written in its format carry exactly the
    numbers the source had. The RAS affine of `NiftiGeometry` is computed from these."""

    format: str  # "nrrd", "metaimage" or "dicom"
    dimension: int  # spatial axes in the file: 2 or 3
    origin: tuple[float, ...]
    spacing: tuple[float, ...]
    direction: tuple[float, ...]  # row-major, columns are the voxel axes (SimpleITK's order)
    dicom: DicomSeries | None = None  # the series read, for DICOM SEG and output names


@dataclass
class NiftiGeometry:
    """The source file's geometry, kept to write labels back on the same voxels.

    Volumes from NRRD, MetaImage and DICOM have one too (the one convention of the program:
    a RAS affine, and a NIfTI header made from it), with `itk` holding their own geometry.
    """

    affine: np.ndarray
    header: object  # nibabel header of the source
    reorientation: Reorientation
    source_shape: tuple[int, int, int]  # spatial shape in the file's own voxel order
    itk: ItkGeometry | None = None  # NRRD, MetaImage and DICOM sources only


@dataclass
class ImageFile:
    """An image read from disk.

    data: (Y, X) grey, (Y, X, C) colour, (Z, Y, X) volume or (Z, Y, X, C) colour volume.
    For NIfTI the three spatial axes are in RAS voxel order (see io.geometry), followed by the
    volumes of a 4D file when `series`; `nifti` keeps what is needed to return to the file's
    own order. NRRD, MetaImage and DICOM volumes are read into the same form (`nifti` set,
    its `itk` holding the source's own geometry); `source` is the folder of a DICOM series.
    """

    data: np.ndarray
    source: Path
    rgb: bool = False
    spacing: tuple[float, ...] | None = None  # per spatial axis of `data`, in mm where known
    nifti: NiftiGeometry | None = None
    series: bool = False  # NIfTI only: a 4th axis of volumes (time) after the spatial ones
    notes: tuple[str, ...] = ()  # warnings for the user (a broken transform replaced, ...)
    # what kind of scan the source states it is (io.acquisition): DICOM series set it when
    # read; for files, io.acquisition.of_image reads the BIDS name, sidecar and header
    acquisition: Acquisition | None = None
