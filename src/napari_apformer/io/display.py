"""How an image file is laid out in napari, and back (no napari import here).

napari shows arrays with axes (z, y, x). A NIfTI file's RAS voxel array (i, j, k) is shown as
(k, j, i), with the voxel size as `scale` and the first voxel's world position as `translate`,
so napari's world coordinates are scanner millimetres (z = S, y = A, x = R). A 4D file's
volumes come first: (t, z, y, x). Other images are shown as they are stored, in pixels.
Oblique files are placed on the nearest axis-aligned grid (the voxels stay exact; only their
drawn position is approximate); `oblique` says so.
"""

from __future__ import annotations

from dataclasses import dataclass

import nibabel as nib
import numpy as np

from napari_apformer.io.geometry import is_oblique
from napari_apformer.io.image_file import ImageFile, NiftiGeometry

SPATIAL_AXIS_LABELS = ("z", "y", "x")
NIFTI_TIME_UNITS = {"sec": "s", "msec": "ms", "usec": "us"}


@dataclass(frozen=True)
class Placement:
    """Where a displayed array sits in napari's world (one entry per displayed axis)."""

    scale: tuple[float, ...]
    translate: tuple[float, ...]
    axis_labels: tuple[str, ...]
    units: tuple[str, ...]
    oblique: bool = False

    def spatial(self, ndim: int) -> Placement:
        """The last `ndim` axes (the spatial ones), for layers made from one volume."""
        return Placement(
            self.scale[-ndim:],
            self.translate[-ndim:],
            self.axis_labels[-ndim:],
            self.units[-ndim:],
            self.oblique,
        )


def display_array(image: ImageFile) -> np.ndarray:
    """The array napari shows: a transposed view for NIfTI, the data itself otherwise."""
    if image.nifti is None:
        return image.data
    return image.data.transpose((3, 2, 1, 0) if image.series else (2, 1, 0))


def nifti_from_display(labels: np.ndarray) -> np.ndarray:
    """A (z, y, x) label volume shown by napari back to the RAS voxel order (i, j, k)."""
    return labels.transpose(2, 1, 0)


def placement(image: ImageFile) -> Placement:
    if image.nifti is None:
        spatial = image.data.ndim - int(image.rgb)
        spacing = tuple(image.spacing or (1.0,) * spatial)
        return Placement(
            spacing, (0.0,) * spatial, SPATIAL_AXIS_LABELS[-spatial:], ("pixel",) * spatial
        )
    scale, translate = nifti_scale_translate(image.nifti)
    labels, units = SPATIAL_AXIS_LABELS, ("mm",) * 3
    if image.series:
        header = image.nifti.header
        time_unit = NIFTI_TIME_UNITS.get(header.get_xyzt_units()[1], "pixel")
        step = float(header.get_zooms()[3]) if time_unit != "pixel" else 1.0
        scale, translate = (step if step > 0 else 1.0, *scale), (0.0, *translate)
        labels, units = ("t", *labels), (time_unit, *units)
    return Placement(scale, translate, labels, units, is_oblique(image.nifti.affine))


def nifti_scale_translate(
    geometry: NiftiGeometry,
) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Voxel size and first-voxel position of the RAS voxel array, in napari's (z, y, x)."""
    ornt = geometry.reorientation.ornt
    ras = geometry.affine @ nib.orientations.inv_ornt_aff(ornt, geometry.source_shape)
    zooms = np.sqrt((ras[:3, :3] ** 2).sum(axis=0))
    scale = tuple(float(z) if z > 0 else 1.0 for z in zooms[::-1])
    translate = tuple(float(t) for t in ras[:3, 3][::-1])
    return scale, translate  # type: ignore[return-value]
