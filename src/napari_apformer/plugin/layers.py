"""The widget's output layers: made once per image layer, updated in place on every rerun.

All are aligned with the image layer (its scale and translate). Token maps come from the
32 x 32 grid with each image pixel taking the value of the 8 x 8 patch it lies in
(Letterbox.token_grid_to_image), so they are exact over the patches, not smoothed.
Per-slice maps are one slice thick and sit at the slice they were computed for: napari shows
them on that slice only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from napari_apformer.engine.preprocess import Letterbox
from napari_apformer.plugin.image_source import ImageSource
from napari_apformer.plugin.layer_metadata import (
    CLASSES_KEY,
    class_colormap,
    class_features,
)

KEPT, PRUNED = 1, 2
TOKEN_TABLE = [  # kept tokens clear, pruned ones shaded: the pruned area is what stands out
    {"value": 0, "name": "none", "colour": "#000000"},
    {"value": KEPT, "name": "kept token", "colour": "#00000000"},
    {"value": PRUNED, "name": "pruned token", "colour": "#2038c0"},
]
ROLES = (
    "segmentation",
    "attention",
    "kept tokens",
    "background probability",
    "kept dependencies",
    "query point",
)


@dataclass
class SliceMaps:
    """What one live run shows on its slice, on the slice's own pixel grid."""

    axis: int
    index: int
    labels: np.ndarray  # (h, w)
    keep: np.ndarray  # (32, 32) bool
    background_probability: np.ndarray  # (32, 32)
    kept_dependency_fraction: np.ndarray  # (32, 32)
    letterbox: Letterbox


class OutputLayers:
    """The layers for one image layer, keyed by role; recreated if the user deleted one."""

    def __init__(self, viewer, image: ImageSource) -> None:
        self.viewer, self.image_name = viewer, image.name
        self._layers: dict[str, object] = {}

    def name(self, role: str) -> str:
        return f"{self.image_name} {role}"

    def get(self, role: str):
        layer = self._layers.get(role)
        return layer if layer is not None and layer in self.viewer.layers else None

    def remove_all(self) -> None:
        for role in ROLES:
            layer = self.get(role)
            if layer is not None:
                self.viewer.layers.remove(layer)
        self._layers.clear()

    def segmentation(self, image: ImageSource, table: list[dict], n_classes: int):
        """The Labels layer for the whole image (created empty the first time)."""
        layer = self.get("segmentation")
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
            name=self.name("segmentation"),
            scale=image.scale,
            translate=image.translate,
            axis_labels=axis_labels,
            units=units,
            metadata=metadata,
            opacity=0.5,
        )
        _set_classes(layer, table)
        self._layers["segmentation"] = layer
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
        box = maps.letterbox
        kept = np.where(box.token_grid_to_image(maps.keep), KEPT, PRUNED).astype(np.uint8)
        self._slice_layer(image, maps, "kept tokens", kept, labels=True)
        self._slice_layer(
            image,
            maps,
            "background probability",
            box.token_grid_to_image(maps.background_probability),
        )
        self._slice_layer(
            image,
            maps,
            "kept dependencies",
            box.token_grid_to_image(maps.kept_dependency_fraction),
        )

    def show_attention(
        self, image: ImageSource, axis: int, index: int, box: Letterbox, heads: np.ndarray
    ) -> None:
        """heads: (H, 32, 32) attention of the query; shown as (mean, head 1..H) on an axis."""
        stack = np.concatenate([heads.mean(axis=0, keepdims=True), heads])
        maps = box.token_grid_to_image(stack).astype(np.float32)  # (H + 1, h, w)
        if image.spatial_ndim == 3:
            maps = np.expand_dims(maps, axis=1 + axis)
        maps = maps.reshape((maps.shape[0], *(1,) * len(image.leading_index), *maps.shape[1:]))
        scale, translate = image.slice_placement(axis, index)
        layer = self.get("attention")
        top = float(maps.max()) or 1.0
        if layer is None or layer.data.shape != maps.shape:
            if layer is not None:
                self.viewer.layers.remove(layer)
            layer = self.viewer.add_image(
                maps,
                name=self.name("attention"),
                scale=(1.0, *scale),
                translate=(0.0, *translate),
                colormap="inferno",
                blending="additive",
                opacity=0.8,
                contrast_limits=(0.0, top),
                axis_labels=("head (0 = mean)", *image.axis_labels),
                units=("pixel", *image.units),
            )
            self._layers["attention"] = layer
        else:
            layer.contrast_limits = (0.0, top)
            _update_in_place(layer, maps, (0.0, *translate))

    def show_query(self, image: ImageSource, world: tuple[float, ...]) -> None:
        layer = self.get("query point")
        point = np.asarray([world], dtype=float)
        if layer is None:
            axis_labels, units = image.spatial_axes()
            layer = self.viewer.add_points(
                point,
                axis_labels=axis_labels,
                units=units,
                name=self.name("query point"),
                symbol="cross",
                face_color="cyan",
                border_color="cyan",
                size=6 * max(image.scale),
            )
            self._layers["query point"] = layer
        elif not np.allclose(layer.data, point):
            layer.data = point

    def _slice_layer(
        self,
        image: ImageSource,
        maps: SliceMaps,
        role: str,
        plane: np.ndarray,
        labels: bool = False,
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
            "name": self.name(role),
            "scale": scale,
            "translate": translate,
            "axis_labels": image.axis_labels,
            "units": image.units,
        }
        if labels:
            layer = self.viewer.add_labels(data, opacity=0.5, **common)
            _set_classes(layer, TOKEN_TABLE)
        else:
            layer = self.viewer.add_image(
                data.astype(np.float32),
                colormap="viridis",
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
