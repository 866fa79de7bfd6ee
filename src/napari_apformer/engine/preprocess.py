"""From a user's array to model inputs and back: checks, normalisation, letterboxing.

For a model of fixed input size (APFormer: 256 x 256) a slice of any size is resized to fit it
with its physical aspect ratio kept and padded (centred); for a model that takes multiples of
N, a slice keeps its pixels (resampled only to square pixels) and is padded up to the next
multiple. Model outputs are cropped and resized back so that the image's extent maps onto
itself exactly (pixel edges to pixel edges, align_corners=False both ways).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from napari_apformer.errors import InputError
from napari_apformer.io.image_file import spatial_ndim
from napari_apformer.model.base import InputRule
from napari_apformer.model.card import Normalisation

MIN_SIDE = 8
PERCENTILE_SAMPLE = 2**20  # voxels sampled (on a regular grid) to estimate percentiles
LUMINANCE = (0.299, 0.587, 0.114)
FIXED_256 = InputRule(size=256)


@dataclass(frozen=True)
class Letterbox:
    """Where an H x W slice sits inside the model input of model_height x model_width."""

    height: int
    width: int
    inner_height: int
    inner_width: int
    top: int
    left: int
    model_height: int
    model_width: int

    @staticmethod
    def fit(
        height: int,
        width: int,
        spacing: tuple[float, float] = (1.0, 1.0),
        rule: InputRule = FIXED_256,
    ) -> Letterbox:
        extent_y, extent_x = height * spacing[0], width * spacing[1]
        longest = max(extent_y, extent_x)
        if rule.size is not None:
            target_h = target_w = rule.size
            side = rule.size
        else:  # keep the longer side's pixel count, square the pixels, pad to the multiple
            side = max(height, width)
            target_h = _round_up(round(side * extent_y / longest), rule.multiple)
            target_w = _round_up(round(side * extent_x / longest), rule.multiple)
        inner_h = max(1, min(target_h, round(side * extent_y / longest)))
        inner_w = max(1, min(target_w, round(side * extent_x / longest)))
        return Letterbox(
            height,
            width,
            inner_h,
            inner_w,
            (target_h - inner_h) // 2,
            (target_w - inner_w) // 2,
            target_h,
            target_w,
        )

    def to_model(self, slices: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [0, 1] to (B, C, model_height, model_width), zero padded."""
        size = (self.inner_height, self.inner_width)
        if size != (self.height, self.width):
            shrink = self.inner_height < self.height or self.inner_width < self.width
            slices = F.interpolate(
                slices, size=size, mode="bilinear", align_corners=False, antialias=shrink
            )
        bottom = self.model_height - self.top - self.inner_height
        right = self.model_width - self.left - self.inner_width
        return F.pad(slices, (self.left, right, self.top, bottom))

    def to_image(self, maps: torch.Tensor) -> torch.Tensor:
        """(B, K, model_height, model_width) maps (logits) to (B, K, H, W) on the slice's grid."""
        inner = maps[
            ..., self.top : self.top + self.inner_height, self.left : self.left + self.inner_width
        ]
        if inner.shape[-2:] == (self.height, self.width):
            return inner
        return F.interpolate(
            inner, size=(self.height, self.width), mode="bilinear", align_corners=False
        )

    def grid_shape(self, stride: int) -> tuple[int, int]:
        """Rows and columns of a map whose cells are stride x stride model pixels."""
        return self.model_height // stride, self.model_width // stride

    def grid_scale(self, stride: int) -> tuple[float, float]:
        """Size of one grid cell in slice pixels (rows, columns)."""
        return (stride * self.height / self.inner_height, stride * self.width / self.inner_width)

    def grid_translate(self, stride: int) -> tuple[float, float]:
        """Centre of cell (0, 0) in slice pixel coordinates (pixel centres at integers)."""
        sy, sx = self.height / self.inner_height, self.width / self.inner_width
        return ((stride / 2 - self.top) * sy - 0.5, (stride / 2 - self.left) * sx - 0.5)

    def grid_to_image(self, grid: np.ndarray, stride: int) -> np.ndarray:
        """(..., rows, cols) cell values to (..., H, W): each pixel takes the cell it lies in."""
        rows = _cell_of(self.height, self.inner_height, self.top, stride, grid.shape[-2])
        cols = _cell_of(self.width, self.inner_width, self.left, stride, grid.shape[-1])
        return grid[..., rows[:, None], cols[None, :]]

    def grid_index(self, row: float, col: float, stride: int) -> int:
        """Row-major index of the cell that slice pixel (row, col) lies in."""
        n_rows, n_cols = self.grid_shape(stride)
        r = _cell_of(self.height, self.inner_height, self.top, stride, n_rows)
        c = _cell_of(self.width, self.inner_width, self.left, stride, n_cols)
        row_i = int(np.clip(round(row), 0, self.height - 1))
        col_i = int(np.clip(round(col), 0, self.width - 1))
        return int(r[row_i]) * n_cols + int(c[col_i])


def _cell_of(size: int, inner: int, offset: int, stride: int, cells: int) -> np.ndarray:
    centres = (np.arange(size) + 0.5) * inner / size + offset  # in model pixels
    return np.clip(np.floor(centres / stride).astype(np.intp), 0, cells - 1)


def _round_up(value: int, multiple: int) -> int:
    return max(multiple, -(-value // multiple) * multiple)


@dataclass
class PreparedImage:
    """A checked image, ready to give model inputs slice by slice without copying the volume.

    data: (Y, X[, C]) or (Z, Y, X[, C]) as given; slices are taken across spatial `axis`.
    """

    data: np.ndarray
    rgb: bool
    axis: int
    low: float
    high: float
    in_channels: int
    letterbox: Letterbox
    source: object = None

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return self.data.shape[: self.data.ndim - int(self.rgb)]

    @property
    def is_volume(self) -> bool:
        return len(self.spatial_shape) == 3

    @property
    def n_slices(self) -> int:
        return self.spatial_shape[self.axis] if self.is_volume else 1

    def slice_pixels(self, index: int) -> np.ndarray:
        """Slice `index` as stored: (H, W) or (H, W, C)."""
        if not self.is_volume:
            return self.data
        return np.take(self.data, index, axis=self.axis)

    def slice_input(self, index: int) -> np.ndarray:
        """(in_channels, H, W) float32 in [0, 1]. A grey slice for a 3-channel model is
        repeated in all three channels, as the releases feed grey data."""
        pixels = np.array(self.slice_pixels(index), dtype=np.float32)  # a copy: never the user's
        if self.rgb:
            pixels = pixels[..., :3]
            if self.in_channels == 1:
                pixels = pixels @ np.asarray(LUMINANCE, dtype=np.float32)
                pixels = pixels[None]
            else:
                pixels = np.moveaxis(pixels, -1, 0)
        else:
            pixels = np.repeat(pixels[None], self.in_channels, axis=0)
        scale = self.high - self.low
        if scale <= 0:
            return np.zeros_like(pixels)
        return np.clip((pixels - self.low) / scale, 0.0, 1.0, out=pixels)


def prepare_image(
    data: np.ndarray,
    *,
    in_channels: int,
    normalisation: Normalisation,
    rule: InputRule,
    rgb: bool = False,
    axis: int = 0,
    spacing: tuple[float, ...] | None = None,
    source: object = None,
) -> PreparedImage:
    """Check an image and work out its intensity range and letterbox. Raises InputError."""
    data = np.asarray(data)
    if data.size == 0:
        raise InputError(f"empty image of shape {data.shape}", source)
    if data.dtype == np.bool_:
        data = data.view(np.uint8)
    if not np.issubdtype(data.dtype, np.integer) and not np.issubdtype(data.dtype, np.floating):
        raise InputError(f"unsupported pixel type {data.dtype}", source)
    if rgb and (data.ndim not in (3, 4) or data.shape[-1] not in (3, 4)):
        raise InputError(f"colour images need 3 or 4 channels last, got shape {data.shape}", source)
    spatial = spatial_ndim(data, rgb, source)
    if not rgb and in_channels not in (1, 3):
        raise InputError(
            f"these weights expect {in_channels} channels; a grey image feeds 1 or 3", source
        )
    if rgb and in_channels not in (1, 3):
        raise InputError(f"these weights expect {in_channels} channels", source)
    if spatial == 3 and not 0 <= axis < 3:
        raise InputError(f"slice axis must be 0, 1 or 2, got {axis}", source)
    shape = data.shape[:spatial]
    plane = [i for i in range(spatial) if spatial == 2 or i != axis]
    height, width = shape[plane[0]], shape[plane[1]]
    if min(height, width) < MIN_SIDE:
        raise InputError(
            f"slices of {height} x {width} pixels are too small: at least "
            f"{MIN_SIDE} pixels on each side are needed",
            source,
        )
    _check_finite(data, source)
    low, high = intensity_range(data[..., :3] if rgb else data, normalisation)
    plane_spacing = (1.0, 1.0)
    if spacing is not None:
        plane_spacing = (abs(float(spacing[plane[0]])), abs(float(spacing[plane[1]])))
        if not all(math.isfinite(s) and s > 0 for s in plane_spacing):
            plane_spacing = (1.0, 1.0)
    letterbox = Letterbox.fit(height, width, plane_spacing, rule)
    return PreparedImage(data, rgb, axis, low, high, in_channels, letterbox, source)


def intensity_range(data: np.ndarray, normalisation: Normalisation) -> tuple[float, float]:
    """The card's percentiles, estimated on a regular subsample of at most ~1M voxels."""
    step = max(1, math.ceil((data.size / PERCENTILE_SAMPLE) ** (1 / data.ndim)))
    sample = np.asarray(data[(slice(None, None, step),) * data.ndim], dtype=np.float64)
    low, high = np.percentile(sample, [normalisation.low, normalisation.high])
    return float(low), float(high)


def _check_finite(data: np.ndarray, source: object) -> None:
    if not np.issubdtype(data.dtype, np.floating):
        return
    bad = sum(
        int(data[i].size - np.count_nonzero(np.isfinite(data[i]))) for i in range(data.shape[0])
    )
    if bad:
        raise InputError(
            f"{bad} of {data.size} values are not finite (NaN or inf); replace "
            "them (for example with 0) and try again",
            source,
        )
