"""Voxel orientation: to the closest canonical (RAS) voxel order and exactly back.

Only axis permutations and flips are applied, never resampling, so every label voxel maps
back onto the source voxel it was computed for and the source affine stays valid.
"""

from __future__ import annotations

from dataclasses import dataclass

import nibabel as nib
import numpy as np

# Names of the canonical (RAS) axes a slice is taken across.
SLICE_AXES = {"sagittal": 0, "coronal": 1, "axial": 2}


@dataclass(frozen=True)
class Reorientation:
    """Source voxel axes -> RAS voxel axes: ornt[i] = (canonical axis of source axis i, +1/-1)."""

    ornt: np.ndarray

    @staticmethod
    def from_affine(affine: np.ndarray) -> Reorientation:
        return Reorientation(nib.orientations.io_orientation(affine))

    @property
    def inverse(self) -> np.ndarray:
        inverse = np.zeros_like(self.ornt)
        for source_axis, (canonical_axis, flip) in enumerate(self.ornt):
            inverse[int(canonical_axis)] = (source_axis, flip)
        return inverse

    def to_canonical(self, data: np.ndarray) -> np.ndarray:
        """A view (no copy) of the first three axes in RAS order."""
        return nib.orientations.apply_orientation(data, self.ornt)

    def from_canonical(self, data: np.ndarray) -> np.ndarray:
        return nib.orientations.apply_orientation(data, self.inverse)

    def canonical_shape(self, shape: tuple[int, ...]) -> tuple[int, int, int]:
        out = [1, 1, 1]
        for source_axis, (canonical_axis, _) in enumerate(self.ornt):
            out[int(canonical_axis)] = int(shape[source_axis])
        return out[0], out[1], out[2]

    def canonical_zooms(self, zooms: tuple[float, ...]) -> tuple[float, float, float]:
        out = [1.0, 1.0, 1.0]
        for source_axis, (canonical_axis, _) in enumerate(self.ornt):
            out[int(canonical_axis)] = float(zooms[source_axis])
        return out[0], out[1], out[2]


def is_oblique(affine: np.ndarray, tolerance: float = 1e-3) -> bool:
    """True if the voxel axes are not aligned with the world axes."""
    directions = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    return bool(np.any((np.abs(directions) > tolerance) & (np.abs(directions) < 1 - tolerance)))
