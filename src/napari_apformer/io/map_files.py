"""Float maps (attention, probabilities, fractions) written in a source image's geometry:
NIfTI, NRRD or MetaImage, float32, on the source's own voxel grid.

A map arrives as a volume in RAS voxel order on the source's grid (what io readers give and
napari shows transposed); it is written back in the source's voxel order with its affine
(NIfTI: both transforms and their codes, as for labels) or its ITK origin, spacing and
direction (NRRD, MetaImage), exactly as labels are (io.nifti, io.itk_image). Voxels where
the map has no value (slices it was not computed on) hold NaN.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from napari_apformer.errors import InputError
from napari_apformer.io.files import compound_suffix, write_atomically
from napari_apformer.io.image_file import NiftiGeometry
from napari_apformer.io.itk_image import WRITABLE_SUFFIXES, import_sitk, itk_geometry_of
from napari_apformer.io.nifti import _transform

NIFTI_DESCRIP_BYTES = 80


def source_voxels(values: np.ndarray, geometry: NiftiGeometry) -> np.ndarray:
    """A RAS-order volume on the source's grid back in the source's own voxel order (float32)."""
    voxels = geometry.reorientation.from_canonical(values).reshape(geometry.source_shape)
    return np.ascontiguousarray(voxels, dtype=np.float32)


def write_nifti_map(
    path: Path,
    values: np.ndarray,
    geometry: NiftiGeometry,
    description: str = "",
    limits: tuple[float, float] | None = None,
) -> None:
    """`values` (RAS voxel order, the source's canonical shape) as a float32 NIfTI with the
    source's header, affine, sform and qform (and their codes). `description` goes into the
    header's descrip (80 bytes), `limits` into cal_min/cal_max (the display window)."""
    out = nib.Nifti1Image(source_voxels(values, geometry), geometry.affine, geometry.header.copy())
    out.set_data_dtype(np.float32)
    out.header.set_slope_inter(1.0, 0.0)
    out.header.set_intent(0)
    out.header["descrip"] = description.encode("ascii", "replace")[:NIFTI_DESCRIP_BYTES]
    if limits is not None:
        out.header["cal_min"], out.header["cal_max"] = float(limits[0]), float(limits[1])
    else:
        out.header["cal_min"], out.header["cal_max"] = 0.0, 0.0
    for name in ("sform", "qform"):
        transform, _ = _transform(geometry.header, name)
        code = int(geometry.header[f"{name}_code"]) if transform is not None else 0
        getattr(out, f"set_{name}")(geometry.affine if transform is None else transform, code)
    write_atomically(path, lambda tmp: nib.save(out, str(tmp)))


def write_itk_map(
    path: Path,
    values: np.ndarray,
    geometry: NiftiGeometry,
    metadata: dict[str, str] | None = None,
) -> None:
    """`values` (RAS voxel order) as a float32 NRRD or MetaImage (.mha) with the source's
    origin, spacing and direction (a NIfTI source's computed from its affine; refused when it
    shears), compressed, one file; `metadata` becomes header fields."""
    suffix = compound_suffix(path)
    if suffix not in WRITABLE_SUFFIXES:
        raise InputError(f"maps are written as single files: {', '.join(WRITABLE_SUFFIXES)}", path)
    sitk = import_sitk("writing NRRD or MetaImage maps", path)
    itk = itk_geometry_of(geometry, path)
    voxels = source_voxels(values, geometry)
    if itk.dimension == 2:
        voxels = voxels[:, :, 0]
    image = sitk.GetImageFromArray(np.ascontiguousarray(voxels.T))
    image.SetOrigin(itk.origin)
    image.SetSpacing(itk.spacing)
    image.SetDirection(itk.direction)
    for key, value in (metadata or {}).items():
        image.SetMetaData(key, value)
    io_name = "NrrdImageIO" if suffix == ".nrrd" else "MetaImageIO"

    def write(tmp: Path) -> None:
        writer = sitk.ImageFileWriter()
        writer.SetFileName(str(tmp))
        writer.SetImageIO(io_name)
        writer.UseCompressionOn()
        writer.Execute(image)

    write_atomically(path, write)
