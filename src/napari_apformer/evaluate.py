"""Labels against a reference: per class Dice, volumes, 95 % Hausdorff distance and surface
Dice at a tolerance, in millimetres from the voxel spacing.

SimpleITK does the work: `LabelOverlapMeasuresImageFilter` gives Dice, `LabelContour` the
boundary voxels of a class (a voxel of the class with a face neighbour outside it; the volume
is padded by one voxel of background so that the image border counts as outside), and
`SignedMaurerDistanceMap` (with the image spacing) the distance from every voxel to the
nearest boundary voxel of the other mask. From those distances:

- HD95: the larger of the two directed 95th percentiles (reference boundary to prediction
  boundary, and back), as MONAI and DeepMind's surface-distance library compute it.
- Surface Dice at tolerance t (Nikolov et al. 2021): boundary voxels of either mask within t
  of the other's boundary, over all boundary voxels of both; counted per voxel (MONAI's
  default), not weighted by surface element area.

Both files are read with io.formats (any readable label format) into RAS voxel order, so a
prediction in another voxel order of the same grid is compared voxel for voxel; files on
different grids are refused. SimpleITK is imported only here, on use.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from napari_apformer.errors import InputError
from napari_apformer.io.image_file import ImageFile

HD_PERCENTILE = 95.0
GRID_TOLERANCE_MM = 1e-3  # voxel centres further apart than this: another grid
COLUMNS = (
    "reference",
    "prediction",
    "value",
    "class",
    "dice",
    "hd95_mm",
    "surface_dice",
    "tolerance_mm",
    "reference_ml",
    "prediction_ml",
    "volume_difference_ml",
    "reference_voxels",
    "prediction_voxels",
)


@dataclass
class ClassScore:
    """One class of one pair of files. NaN where a measure is undefined (both masks empty),
    inf for a distance to an empty mask."""

    value: int
    name: str
    dice: float
    hd95: float
    surface_dice: float
    reference_voxels: int
    prediction_voxels: int
    voxel_ml: float | None  # None when the spacing is not known to be in mm

    def row(self, reference: Path | str, prediction: Path | str, tolerance: float) -> dict:
        """A CSV row (COLUMNS): NaN as an empty cell, volumes in ml where known."""

        def ml(voxels: int) -> float | str:
            return round(voxels * self.voxel_ml, 4) if self.voxel_ml is not None else ""

        volume = (
            round((self.prediction_voxels - self.reference_voxels) * self.voxel_ml, 4)
            if self.voxel_ml is not None
            else ""
        )
        return {
            "reference": str(reference),
            "prediction": str(prediction),
            "value": self.value,
            "class": self.name,
            "dice": number(self.dice),
            "hd95_mm": number(self.hd95),
            "surface_dice": number(self.surface_dice),
            "tolerance_mm": tolerance,
            "reference_ml": ml(self.reference_voxels),
            "prediction_ml": ml(self.prediction_voxels),
            "volume_difference_ml": volume,
            "reference_voxels": self.reference_voxels,
            "prediction_voxels": self.prediction_voxels,
        }


def number(value: float) -> float | str:
    """A measure as a CSV cell: rounded, '' for NaN, 'inf' for infinity."""
    if math.isnan(value):
        return ""
    if math.isinf(value):
        return "inf"
    return round(value, 6)


def read_labels(path: Path) -> ImageFile:
    """A label file (any format io.formats reads) with integer values; InputError else."""
    from napari_apformer.io.formats import read_image_file

    image = read_image_file(path)
    data = image.data
    if image.rgb or data.ndim not in (2, 3):
        raise InputError("labels must be a 2D or 3D single-channel image", path)
    if data.dtype.kind == "f" and not (
        np.all(np.isfinite(data)) and np.array_equal(data, np.round(data))
    ):
        raise InputError("labels must hold whole numbers (class values)", path)
    if data.dtype.kind in "fi" and data.size and data.min() < 0:
        raise InputError("labels must not be negative", path)
    return image


def check_same_grid(reference: ImageFile, prediction: ImageFile) -> None:
    """InputError when the two are not on one voxel grid (shape, then voxel positions)."""
    where = f"{prediction.source} against {reference.source}"
    if reference.data.shape != prediction.data.shape:
        raise InputError(
            f"shapes differ: prediction {prediction.data.shape}, reference "
            f"{reference.data.shape} (in RAS voxel order); resample one onto the other's grid",
            where,
        )
    ref_geometry, pred_geometry = reference.nifti, prediction.nifti
    if ref_geometry is None or pred_geometry is None:
        return  # pixels only (PNG, TIFF): the shapes are all there is to compare
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in reference.data.shape])).reshape(3, -1)
    ref_points = canonical_affine(reference) @ np.vstack([corners, np.ones(corners.shape[1])])
    pred_points = canonical_affine(prediction) @ np.vstack([corners, np.ones(corners.shape[1])])
    apart = float(np.abs(ref_points - pred_points).max())
    if not apart <= GRID_TOLERANCE_MM:
        raise InputError(
            f"not on the same voxel grid: corresponding voxel centres are up to {apart:.3g} "
            "mm apart in scanner coordinates; resample the prediction onto the reference",
            where,
        )


def canonical_affine(image: ImageFile) -> np.ndarray:
    """The RAS affine of `image.data` (RAS voxel order) in scanner millimetres."""
    import nibabel as nib

    geometry = image.nifti
    assert geometry is not None
    return geometry.affine @ nib.orientations.inv_ornt_aff(
        geometry.reorientation.ornt, geometry.source_shape
    )


def class_names(reference: Path, prediction: Path) -> dict[int, str]:
    """Class value -> name from the prediction's sidecar (or NRRD segment fields), else the
    reference's; empty when neither has one."""
    from napari_apformer.io.formats import read_class_table

    for path in (prediction, reference):
        try:
            table = read_class_table(path)
        except InputError:
            table = None
        if table:
            return {int(e["value"]): str(e["name"]) for e in table}
    return {}


def evaluate_pair(
    reference_path: Path, prediction_path: Path, tolerance: float
) -> list[ClassScore]:
    """Every class in the class table or in either file (not the background, 0)."""
    reference, prediction = read_labels(reference_path), read_labels(prediction_path)
    check_same_grid(reference, prediction)
    names = class_names(reference_path, prediction_path)
    spacing = reference.spacing or (1.0,) * reference.data.ndim
    in_mm = reference.spacing is not None and reference.nifti is not None
    voxel_ml = math.prod(abs(float(s)) for s in spacing) / 1000 if in_mm else None
    return evaluate_arrays(reference.data, prediction.data, spacing, tolerance, names, voxel_ml)


def evaluate_arrays(
    reference: np.ndarray,
    prediction: np.ndarray,
    spacing: tuple[float, ...],
    tolerance: float,
    names: dict[int, str] | None = None,
    voxel_ml: float | None = None,
) -> list[ClassScore]:
    """The array-level core of evaluate_pair (the napari panel calls it with layers): two
    label arrays of one shape, `spacing` per axis in mm; every class in `names` or in either
    array but the background (0)."""
    scores = iter_class_scores(reference, prediction, spacing, tolerance, names, voxel_ml)
    return [score for score, _ in scores]


def iter_class_scores(
    reference: np.ndarray,
    prediction: np.ndarray,
    spacing: tuple[float, ...],
    tolerance: float,
    names: dict[int, str] | None = None,
    voxel_ml: float | None = None,
) -> Iterator[tuple[ClassScore, int]]:
    """evaluate_arrays one class at a time: (score, number of classes), so that a caller can
    show progress or stop between classes."""
    names = names or {}
    if reference.shape != prediction.shape:
        raise InputError(
            f"shapes differ: prediction {prediction.shape}, reference {reference.shape}"
        )
    ref, pred = reference.astype(np.int64), prediction.astype(np.int64)
    values = sorted({*names, *np.unique(ref).tolist(), *np.unique(pred).tolist()} - {0})
    for v in values:
        name = names.get(v, f"class {v}")
        yield score_class(ref == v, pred == v, spacing, tolerance, v, name, voxel_ml), len(values)


def csv_text(rows: list[dict]) -> str:
    """Rows (ClassScore.row) as CSV text with the COLUMNS header, spreadsheet-safe cells."""
    from napari_apformer.cohort import spreadsheet_safe

    text = io.StringIO()
    writer = csv.DictWriter(text, COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: spreadsheet_safe(v) for k, v in row.items()})
    return text.getvalue()


def score_class(
    reference: np.ndarray,
    prediction: np.ndarray,
    spacing: tuple[float, ...],
    tolerance: float,
    value: int = 1,
    name: str = "class 1",
    voxel_ml: float | None = None,
) -> ClassScore:
    """Dice, HD95 and surface Dice of two boolean masks on one grid (`spacing` per axis, mm)."""
    n_ref, n_pred = int(reference.sum()), int(prediction.sum())
    if n_ref == 0 and n_pred == 0:
        nan = float("nan")
        return ClassScore(value, name, nan, nan, nan, 0, 0, voxel_ml)
    if n_ref == 0 or n_pred == 0:
        return ClassScore(value, name, 0.0, math.inf, 0.0, n_ref, n_pred, voxel_ml)
    dice = overlap_dice(reference, prediction)
    to_pred, to_ref = boundary_distances(reference, prediction, spacing)
    hd95 = max(
        float(np.percentile(to_pred, HD_PERCENTILE)), float(np.percentile(to_ref, HD_PERCENTILE))
    )
    within = int((to_pred <= tolerance).sum() + (to_ref <= tolerance).sum())
    surface = within / (len(to_pred) + len(to_ref))
    return ClassScore(value, name, dice, hd95, surface, n_ref, n_pred, voxel_ml)


def _sitk():
    from napari_apformer.io.itk_image import import_sitk

    return import_sitk("apformer evaluate")


def _image(sitk, mask: np.ndarray, spacing: tuple[float, ...]):
    """A uint8 SimpleITK image of a mask padded by one background voxel; SimpleITK's axes
    are the array's reversed, so the spacing is too."""
    image = sitk.GetImageFromArray(np.pad(mask, 1).astype(np.uint8))
    image.SetSpacing([float(abs(s)) for s in spacing[::-1]])
    return image


def overlap_dice(reference: np.ndarray, prediction: np.ndarray) -> float:
    """Dice of two non-empty masks by LabelOverlapMeasuresImageFilter."""
    sitk = _sitk()
    spacing = (1.0,) * reference.ndim
    measures = sitk.LabelOverlapMeasuresImageFilter()
    measures.Execute(_image(sitk, reference, spacing), _image(sitk, prediction, spacing))
    return float(measures.GetDiceCoefficient(1))


def boundary_distances(
    reference: np.ndarray, prediction: np.ndarray, spacing: tuple[float, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """Distances (mm) from each boundary voxel of `reference` to the nearest boundary voxel
    of `prediction`, and back."""
    sitk = _sitk()
    ref_image, pred_image = _image(sitk, reference, spacing), _image(sitk, prediction, spacing)
    ref_edge = sitk.GetArrayFromImage(sitk.LabelContour(ref_image)) > 0
    pred_edge = sitk.GetArrayFromImage(sitk.LabelContour(pred_image)) > 0

    def distance_to(edge: np.ndarray) -> np.ndarray:
        edges = sitk.GetImageFromArray(edge.astype(np.uint8))
        edges.CopyInformation(ref_image)
        distance = sitk.SignedMaurerDistanceMap(
            edges, insideIsPositive=False, squaredDistance=False, useImageSpacing=True
        )
        # Voxels of the boundary itself come out as 0 or negative (inside the shell): 0.
        return np.maximum(sitk.GetArrayFromImage(distance), 0.0)

    return distance_to(pred_edge)[ref_edge], distance_to(ref_edge)[pred_edge]
