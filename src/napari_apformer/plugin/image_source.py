"""The part of a napari image layer the widget segments, and where its slices sit.

Works for any image layer, whatever opened it: 2D grey or RGB, 3D volumes, and volumes along
leading axes (4D NIfTI: the volume shown now is used). No napari import: a layer is read
through its attributes only.

The model sees what the command line and training give it. For NIfTI that is the RAS voxel
array (i, j, k) as `io.nifti` reads it, while napari shows it reversed, (z, y, x) = (k, j, i)
(`io.display`): `model_data` turns the shown volume back, so each slice the model sees is the
transpose of the slice on screen, and `to_display` / `plane_to_display` turn what comes back
(labels, maps, attention) onto the screen's axes. Other images are shown as stored.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from napari_apformer.errors import InputError
from napari_apformer.io.display import nifti_from_display
from napari_apformer.plugin.layer_metadata import SourceInfo

NIFTI_AXIS_NAMES = ("axial", "coronal", "sagittal")  # napari axes z, y, x of a NIfTI layer


@dataclass
class ImageSource:
    """One 2D image or 3D volume of a layer: `data` is (Y, X[, C]) or (Z, Y, X[, C])."""

    name: str
    data: np.ndarray
    rgb: bool
    leading_index: tuple[int, ...]  # position along the layer's leading (e.g. time) axes
    scale: tuple[float, ...]  # of the spatial axes (napari world units per pixel)
    translate: tuple[float, ...]
    source: SourceInfo | None
    axis_labels: tuple[str, ...]  # of the layer's leading and spatial axes
    units: tuple[str, ...]
    # The layer's scale and translate along its leading axes (a 4D file's time axis: the
    # volumes' spacing in ms, say): layers of one volume sit where it is shown.
    leading_scale: tuple[float, ...] = ()
    leading_translate: tuple[float, ...] = ()

    def spatial_axes(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """Axis labels and units of the spatial axes."""
        n = self.spatial_ndim
        return self.axis_labels[-n:], self.units[-n:]

    @property
    def spatial_ndim(self) -> int:
        return self.data.ndim - int(self.rgb)

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return self.data.shape[: self.spatial_ndim]

    @property
    def is_nifti(self) -> bool:
        return self.source is not None and self.source.nifti is not None

    # -- what the model sees (the command line's orientation) and back -------------------
    @property
    def transposed(self) -> bool:
        """Whether the model's array is the shown one reversed (a NIfTI volume)."""
        return self.is_nifti and self.spatial_ndim == 3 and not self.rgb

    def model_data(self) -> np.ndarray:
        """The array the model runs on: for NIfTI the RAS voxel array (a view, no copy)."""
        return nifti_from_display(self.data) if self.transposed else self.data

    def model_axis(self, axis: int) -> int:
        """The model array's axis that is the shown array's `axis`."""
        return 2 - axis if self.transposed else axis

    def model_spacing(self) -> tuple[float, ...]:
        """Voxel size along the model array's spatial axes: the file's, as its reader gave
        it to the command line; else the layer's scale."""
        if self.source is not None and self.source.spacing is not None:
            spacing = tuple(float(s) for s in self.source.spacing)
            if len(spacing) == self.spatial_ndim:
                return spacing
        return tuple(reversed(self.scale)) if self.transposed else tuple(self.scale)

    def to_display(self, volume: np.ndarray) -> np.ndarray:
        """A volume on the model array's axes (labels) on the shown axes (a view)."""
        return nifti_from_display(volume) if self.transposed else volume

    def plane_to_display(self, plane: np.ndarray) -> np.ndarray:
        """(..., rows, cols) on a model slice's axes onto the shown slice's (a view)."""
        return np.swapaxes(plane, -1, -2) if self.transposed else plane

    def point_to_model(self, row: float, col: float) -> tuple[float, float]:
        """(row, column) of a shown slice in the model slice's pixels, and back (the same)."""
        return (col, row) if self.transposed else (row, col)

    def axis_names(self) -> list[str]:
        """Names for the slice axis choice of a volume (empty for 2D)."""
        if self.spatial_ndim == 2:
            return []
        if self.is_nifti:
            return [f"{n} ({a})" for n, a in zip(NIFTI_AXIS_NAMES, "zyx", strict=True)]
        return [f"axis {i} ({a})" for i, a in enumerate("zyx")]

    def slice_placement(self, axis: int, index: int) -> tuple[tuple, tuple]:
        """Scale and translate of a one-slice-thick layer at slice `index` along `axis`, with
        the layer's leading axes as length-1 axes at the current position (with the image's
        own scale there, so that the viewer's steps along them do not change)."""
        translate = list(self.translate)
        if self.spatial_ndim == 3:
            translate[axis] += index * self.scale[axis]
        lead_scale, lead_translate = self.leading_placement()
        return lead_scale + tuple(self.scale), lead_translate + tuple(translate)

    def leading_placement(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Scale and translate along the leading axes of a layer of the current volume only."""
        lead = len(self.leading_index)
        scale = self.leading_scale if len(self.leading_scale) == lead else (1.0,) * lead
        start = self.leading_translate if len(self.leading_translate) == lead else (0.0,) * lead
        translate = tuple(
            float(t + i * s) for t, i, s in zip(start, self.leading_index, scale, strict=True)
        )
        return tuple(float(s) for s in scale), translate

    def slice_shape_for_layer(self, axis: int) -> tuple[int, ...]:
        """Shape of a one-slice map layer (leading axes of length 1, slice axis of length 1)."""
        shape = list(self.spatial_shape)
        if self.spatial_ndim == 3:
            shape[axis] = 1
        return (1,) * len(self.leading_index) + tuple(shape)

    def slice_index_at(self, world_point: tuple[float, ...], axis: int) -> int:
        """The slice along `axis` under the viewer's current world position."""
        if self.spatial_ndim == 2:
            return 0
        value = world_point[len(world_point) - 3 + axis]
        index = round((value - self.translate[axis]) / self.scale[axis])
        return int(np.clip(index, 0, self.spatial_shape[axis] - 1))

    def plane_position(self, world_point: tuple[float, ...], axis: int) -> tuple[float, float]:
        """(row, column) in slice pixels of a world position (trailing spatial axes)."""
        spatial = list(world_point[-self.spatial_ndim :])
        pixels = [(w - t) / s for w, t, s in zip(spatial, self.translate, self.scale, strict=True)]
        if self.spatial_ndim == 3:
            del pixels[axis]
        return pixels[0], pixels[1]

    def world_of_plane(self, axis: int, index: int, row: float, col: float) -> tuple[float, ...]:
        """World position (trailing spatial axes) of slice pixel (row, col)."""
        pixels = [row, col]
        if self.spatial_ndim == 3:
            pixels.insert(axis, float(index))
        return tuple(t + p * s for p, t, s in zip(pixels, self.translate, self.scale, strict=True))


def image_source(layer, world_point: tuple[float, ...] | None = None) -> ImageSource:
    """The 2D/3D image of an image layer at the viewer's position; InputError if unusable."""
    data = layer.data
    if getattr(layer, "multiscale", False):
        data = data[0]  # full resolution
    rgb = bool(getattr(layer, "rgb", False))
    spatial = min(3, data.ndim - int(rgb))
    if spatial < 2:
        raise InputError(f"layer '{layer.name}' has {data.ndim} dimension(s); 2 or more needed")
    lead = data.ndim - int(rgb) - spatial
    leading_index: tuple[int, ...] = ()
    if lead:
        point = world_point or (0.0,) * data.ndim
        position = layer.world_to_data(point) if world_point is not None else (0,) * data.ndim
        leading_index = tuple(
            int(np.clip(round(position[i]), 0, data.shape[i] - 1)) for i in range(lead)
        )
    volume = np.asarray(data[leading_index] if lead else data)
    scale = tuple(float(s) for s in layer.scale[lead : lead + spatial])
    translate = tuple(float(t) for t in layer.translate[lead : lead + spatial])
    return ImageSource(
        layer.name,
        volume,
        rgb,
        leading_index,
        scale,
        translate,
        SourceInfo.of(layer.metadata),
        tuple(str(a) for a in layer.axis_labels[: lead + spatial]),
        tuple(str(u) for u in layer.units[: lead + spatial]),
        tuple(float(s) for s in layer.scale[:lead]),
        tuple(float(t) for t in layer.translate[:lead]),
    )
