"""The widget's output layers: made once per image layer, updated in place on every rerun.

All are aligned with the image layer (its scale and translate). Which per-slice maps there
are, what they are called and how they are drawn comes from the model's declarations
(`MapSpec`): a mask is shaded where it is off, a probability or a fraction is an image with a
colormap. A map lives on a grid of cells (`spec.stride` model pixels each); each image pixel
takes the value of the cell it lies in (`Letterbox.grid_to_image`), so maps are exact over
the cells, not smoothed. Per-slice maps are one slice thick and sit at the slice they were
computed for: napari shows them on that slice only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from napari_apformer.engine.preprocess import Letterbox
from napari_apformer.model.base import MapSpec
from napari_apformer.plugin.image_source import ImageSource
from napari_apformer.plugin.layer_metadata import (
    CLASSES_KEY,
    class_colormap,
    class_features,
)

MASK_ON, MASK_OFF = 1, 2  # values of a mask layer (0 is napari's "no label")
MASK_COLOUR = "#2038c0"  # where a mask is off: what is left out is what stands out
KIND_COLORMAPS = {"probability": "viridis", "fraction": "viridis"}
SEGMENTATION, ATTENTION, QUERY = "segmentation", "attention", "query point"


def mask_table(spec: MapSpec) -> list[dict]:
    """Classes of a mask layer: cells in the mask clear, cells outside it shaded."""
    return [
        {"value": 0, "name": "none", "colour": "#000000"},
        {"value": MASK_ON, "name": spec.label, "colour": "#00000000"},
        {"value": MASK_OFF, "name": f"not {spec.label}", "colour": MASK_COLOUR},
    ]


@dataclass
class SliceMaps:
    """What one live run shows on its slice: labels on the slice's own pixel grid, and the
    model's maps (name -> (rows, cols)) on the grids their specs give."""

    axis: int
    index: int
    labels: np.ndarray  # (h, w)
    maps: dict[str, np.ndarray]
    specs: Sequence[MapSpec]
    letterbox: Letterbox

    def on_image(self, spec: MapSpec) -> np.ndarray:
        """Map `spec` on the slice's pixels (h, w)."""
        return self.letterbox.grid_to_image(self.maps[spec.name], spec.stride)


class OutputLayers:
    """The layers for one image layer, keyed by role; recreated if the user deleted one.

    Roles: "segmentation", "attention", "query point" and "map:<name>" for each declared
    map; layers are named "<image> <role or map label>".
    """

    def __init__(self, viewer, image: ImageSource) -> None:
        self.viewer, self.image_name = viewer, image.name
        self._layers: dict[str, object] = {}

    def name(self, label: str) -> str:
        return f"{self.image_name} {label}"

    def get(self, role: str):
        layer = self._layers.get(role)
        return layer if layer is not None and layer in self.viewer.layers else None

    def remove(self, role: str) -> None:
        layer = self.get(role)
        if layer is not None:
            self.viewer.layers.remove(layer)
        self._layers.pop(role, None)

    def remove_all(self) -> None:
        for role in list(self._layers):
            self.remove(role)

    def segmentation(self, image: ImageSource, table: list[dict], n_classes: int):
        """The Labels layer for the whole image (created empty the first time)."""
        layer = self.get(SEGMENTATION)
        dtype = np.uint8 if n_classes <= 256 else np.uint16
        if layer is not None and layer.data.shape == image.spatial_shape:
            if layer.metadata.get(CLASSES_KEY) != table:
                _set_classes(layer, table)
            return layer
        if layer is not None:
            self.viewer.layers.remove(layer)
        metadata = {CLASSES_KEY: table}
        if image.source is not None:
            metadata.update(image.source.to_metadata())
        axis_labels, units = image.spatial_axes()
        layer = self.viewer.add_labels(
            np.zeros(image.spatial_shape, dtype),
            name=self.name(SEGMENTATION),
            scale=image.scale,
            translate=image.translate,
            axis_labels=axis_labels,
            units=units,
            metadata=metadata,
            opacity=0.5,
        )
        _set_classes(layer, table)
        self._layers[SEGMENTATION] = layer
        return layer

    def show_slice(self, image: ImageSource, maps: SliceMaps, table: list[dict], n_classes: int):
        seg = self.segmentation(image, table, n_classes)
        if image.spatial_ndim == 3:
            index = [slice(None)] * 3
            index[maps.axis] = maps.index
            seg.data[tuple(index)] = maps.labels
        else:
            seg.data[...] = maps.labels
        seg.refresh()
        roles = set()
        for spec in maps.specs:
            role = f"map:{spec.name}"
            roles.add(role)
            plane = maps.on_image(spec)
            if spec.kind == "mask":
                plane = np.where(plane, MASK_ON, MASK_OFF).astype(np.uint8)
            self._slice_layer(image, maps, role, spec, plane)
        for role in [r for r in self._layers if r.startswith("map:") and r not in roles]:
            self.remove(role)  # maps of weights used before, which these do not declare

    def show_attention(
        self,
        image: ImageSource,
        axis: int,
        index: int,
        box: Letterbox,
        heads: np.ndarray,
        stride: int,
    ) -> None:
        """heads: (H, rows, cols) attention of the query on a grid of `stride` pixel cells;
        shown as (mean, head 1..H) on an axis."""
        stack = np.concatenate([heads.mean(axis=0, keepdims=True), heads])
        maps = box.grid_to_image(stack, stride).astype(np.float32)  # (H + 1, h, w)
        if image.spatial_ndim == 3:
            maps = np.expand_dims(maps, axis=1 + axis)
        maps = maps.reshape((maps.shape[0], *(1,) * len(image.leading_index), *maps.shape[1:]))
        scale, translate = image.slice_placement(axis, index)
        layer = self.get(ATTENTION)
        top = float(maps.max()) or 1.0
        if layer is None or layer.data.shape != maps.shape:
            if layer is not None:
                self.viewer.layers.remove(layer)
            layer = self.viewer.add_image(
                maps,
                name=self.name(ATTENTION),
                scale=(1.0, *scale),
                translate=(0.0, *translate),
                colormap="inferno",
                blending="additive",
                opacity=0.8,
                contrast_limits=(0.0, top),
                axis_labels=("head (0 = mean)", *image.axis_labels),
                units=("pixel", *image.units),
            )
            self._layers[ATTENTION] = layer
        else:
            layer.contrast_limits = (0.0, top)
            _update_in_place(layer, maps, (0.0, *translate))

    def remove_attention(self) -> None:
        """For weights without query-point attention: no stale attention or query point."""
        self.remove(ATTENTION)
        self.remove(QUERY)

    def show_query(self, image: ImageSource, world: tuple[float, ...]) -> None:
        layer = self.get(QUERY)
        point = np.asarray([world], dtype=float)
        if layer is None:
            axis_labels, units = image.spatial_axes()
            layer = self.viewer.add_points(
                point,
                axis_labels=axis_labels,
                units=units,
                name=self.name(QUERY),
                symbol="cross",
                face_color="cyan",
                border_color="cyan",
                size=6 * max(image.scale),
            )
            self._layers[QUERY] = layer
        elif not np.allclose(layer.data, point):
            layer.data = point

    def _slice_layer(
        self, image: ImageSource, maps: SliceMaps, role: str, spec: MapSpec, plane: np.ndarray
    ) -> None:
        data = plane.reshape(image.slice_shape_for_layer(maps.axis))
        scale, translate = image.slice_placement(maps.axis, maps.index)
        layer = self.get(role)
        if layer is not None and layer.data.shape == data.shape:
            _update_in_place(layer, data, translate)
            return
        if layer is not None:
            self.viewer.layers.remove(layer)
        common = {
            "name": self.name(spec.label),
            "scale": scale,
            "translate": translate,
            "axis_labels": image.axis_labels,
            "units": image.units,
        }
        if spec.kind == "mask":
            layer = self.viewer.add_labels(data, opacity=0.5, **common)
            _set_classes(layer, mask_table(spec))
        else:
            layer = self.viewer.add_image(
                data.astype(np.float32),
                colormap=KIND_COLORMAPS.get(spec.kind, "viridis"),
                contrast_limits=(0.0, 1.0),
                visible=False,
                **common,
            )
        self._layers[role] = layer


def _update_in_place(layer, data: np.ndarray, translate: tuple) -> None:
    """New values for a layer of the same shape. Writing into the array and refreshing is
    much cheaper than assigning `data` or `translate`, which make napari recompute the
    extent of every layer (tens of ms per layer, measured in benchmarks/bench_widget.py)."""
    if not np.allclose(layer.translate, translate):
        layer.translate = translate
    layer.data[...] = data
    layer.refresh()


def _set_classes(layer, table: list[dict]) -> None:
    layer.metadata[CLASSES_KEY] = table
    layer.features = class_features(table)
    layer.colormap = class_colormap(table)


def legend_html(table: list[dict]) -> str:
    """Coloured squares and class names, for a Qt label."""
    items = [
        f'<span style="color:{c["colour"]}">&#9632;</span> {c["name"]}'
        for c in table
        if c["value"] != 0
    ]
    return "<br>".join(items)
