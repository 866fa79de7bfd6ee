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
from functools import lru_cache

import numpy as np

from napari_apformer.engine.preprocess import Letterbox
from napari_apformer.model.base import MapSpec
from napari_apformer.plugin.image_source import ImageSource
from napari_apformer.plugin.layer_metadata import (
    CLASSES_KEY,
    class_colormap,
    class_features,
    rgba,
)

MASK_ON, MASK_OFF = 1, 2  # values of a mask layer (0 is napari's "no label")
# Where a mask is off (what is left out is what stands out): the first of these that is far
# from every class colour and from the attention's colormap (inferno: black, purple, red,
# yellow) and the query point (cyan).
MASK_COLOURS = ("#3cb44b", "#9a6324", "#808000", "#e6194b", "#911eb4")
MASK_MIN_DISTANCE = 120.0  # in RGB units (0..255 per channel)
KIND_COLORMAPS = {"probability": "viridis", "fraction": "viridis"}
UNIFORM = 1.0  # attention in multiples of uniform: at or below this it is transparent
SEGMENTATION, ATTENTION, QUERY = "segmentation", "attention", "query point"
CHANGED = "changed by pruning"  # pixels whose label an unpruned pass gives otherwise
CHANGED_COLOURS = ("#ff00ff", "#00ff00", "#ff0000")  # the first far from every class colour
OUTPUT_KEY = "napari_apformer_output"  # in the metadata of every layer made here: its role
CONTOUR = 1  # segmentation outline width (pixels) while the attention is shown


def mask_colour(table: Sequence[dict] = ()) -> str:
    """The shading of cells outside a mask: a colour no class of `table` is close to."""
    classes = [_rgb255(c["colour"]) for c in table if c.get("value", 1) != 0]
    best, best_distance = MASK_COLOURS[0], -1.0
    for colour in MASK_COLOURS:
        rgb = _rgb255(colour)
        distance = min((float(np.linalg.norm(rgb - c)) for c in classes), default=np.inf)
        if distance >= MASK_MIN_DISTANCE:
            return colour
        if distance > best_distance:
            best, best_distance = colour, distance
    return best


def changed_table(classes: Sequence[dict] = ()) -> list[dict]:
    """Classes of the "changed by pruning" layer: one value, in a colour far from the
    classes' (what it marks lies on top of the segmentation)."""
    taken = [_rgb255(c["colour"]) for c in classes if c.get("value", 1) != 0]
    colour = next(
        (
            c
            for c in CHANGED_COLOURS
            if min((float(np.linalg.norm(_rgb255(c) - t)) for t in taken), default=np.inf)
            >= MASK_MIN_DISTANCE
        ),
        CHANGED_COLOURS[0],
    )
    return [
        {"value": 0, "name": "same label unpruned", "colour": "#000000"},
        {"value": 1, "name": CHANGED, "colour": colour},
    ]


def mask_table(spec: MapSpec, classes: Sequence[dict] = ()) -> list[dict]:
    """Classes of a mask layer: cells in the mask clear, cells outside it shaded in a colour
    none of `classes` uses."""
    return [
        {"value": 0, "name": "none", "colour": "#000000"},
        {"value": MASK_ON, "name": spec.label, "colour": "#00000000"},
        {"value": MASK_OFF, "name": f"not {spec.label}", "colour": mask_colour(classes)},
    ]


@lru_cache(maxsize=16)
def image_cells(box: Letterbox, stride: int) -> np.ndarray:
    """(rows, cols) bool, read-only: the grid cells that some pixel of the slice lies in,
    that is the tokens over the image rather than over the letterbox's padding. Cached: a
    live run asks for it several times per slider move, with the same letterbox."""
    rows, cols = box.grid_shape(stride)
    index = box.grid_to_image(np.arange(rows * cols).reshape(rows, cols), stride)
    cells = np.zeros(rows * cols, bool)
    cells[np.unique(index)] = True
    cells.flags.writeable = False
    return cells.reshape(rows, cols)


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

    def over_image(self, spec: MapSpec) -> np.ndarray:
        """The values of map `spec` at the tokens over the image (not the padding), flat."""
        return self.maps[spec.name][image_cells(self.letterbox, spec.stride)]


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
        metadata = {CLASSES_KEY: table, OUTPUT_KEY: SEGMENTATION, **source_metadata(image)}
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
            self._slice_layer(image, maps, role, spec, plane, table)
        for role in [r for r in self._layers if r.startswith("map:") and r not in roles]:
            self.remove(role)  # maps of weights used before, which these do not declare

    def show_changed(
        self,
        image: ImageSource,
        maps: SliceMaps,
        changed: np.ndarray | None,
        classes: Sequence[dict],
    ) -> None:
        """The pixels of the slice whose label differs from an unpruned pass (1), one slice
        thick like the maps; hidden when first made (the read-out gives the share). None:
        the model has no pruning to compare with, and the layer goes."""
        if changed is None:
            self.remove(CHANGED)
            return
        data = changed.astype(np.uint8).reshape(image.slice_shape_for_layer(maps.axis))
        scale, translate = image.slice_placement(maps.axis, maps.index)
        table = changed_table(classes)
        layer = self.get(CHANGED)
        if layer is not None and layer.data.shape == data.shape:
            if layer.metadata.get(CLASSES_KEY) != table:
                _set_classes(layer, table)
            update_in_place(layer, data, translate)
            return
        if layer is not None:
            self.viewer.layers.remove(layer)
        layer = self.viewer.add_labels(
            data,
            name=self.name(CHANGED),
            scale=scale,
            translate=translate,
            axis_labels=image.axis_labels,
            units=image.units,
            metadata={OUTPUT_KEY: CHANGED, **source_metadata(image)},
            opacity=0.8,
            visible=False,
        )
        _set_classes(layer, table)
        self._layers[CHANGED] = layer

    def show_attention(
        self,
        image: ImageSource,
        axis: int,
        index: int,
        box: Letterbox,
        weights: np.ndarray,
        stride: int,
    ) -> float:
        """weights: (rows, cols) attention of the query (one head, or the mean of the heads)
        on a grid of `stride` pixel cells. Shown in multiples of uniform attention (1 = the
        query attends to every token of the grid alike): transparent at uniform or less,
        then more opaque and brighter up to this map's own peak, so a weak head is as
        readable as a strong one and the image stays visible where the query does not look.
        Returns the peak. While the layer is shown the segmentation is drawn as outlines."""
        tokens = weights.size
        values = box.grid_to_image(weights * tokens, stride).astype(np.float32)
        data = values.reshape(image.slice_shape_for_layer(axis))
        scale, translate = image.slice_placement(axis, index)
        top = float(values.max())
        limits = (UNIFORM, top) if top > UNIFORM else (0.0, max(top, UNIFORM))
        layer = self.get(ATTENTION)
        if layer is not None and layer.data.shape == data.shape:
            update_in_place(layer, data, translate, limits)
            self._attention_visibility()
            return top
        if layer is not None:
            self.viewer.layers.remove(layer)
        layer = self.viewer.add_image(
            data,
            name=self.name(ATTENTION),
            scale=scale,
            translate=translate,
            colormap=attention_colormap(),
            blending="translucent",
            opacity=0.9,
            contrast_limits=limits,
            axis_labels=image.axis_labels,
            units=image.units,
            metadata={
                OUTPUT_KEY: ATTENTION,
                "value": "x uniform (1 = attention spread evenly over all tokens)",
                **source_metadata(image),
            },
        )
        layer.colorbar.visible = True
        layer.events.visible.connect(self._attention_visibility)
        self._layers[ATTENTION] = layer
        self._attention_visibility()
        return top

    def _attention_visibility(self, *_: object) -> None:
        """The segmentation as outlines while the attention is shown, filled otherwise."""
        seg, attention = self.get(SEGMENTATION), self.get(ATTENTION)
        contour = CONTOUR if attention is not None and attention.visible else 0
        if seg is not None and seg.contour != contour:
            seg.contour = contour

    def remove_attention(self) -> None:
        """For weights without query-point attention: no stale attention or query point."""
        self.remove(ATTENTION)
        self.remove(QUERY)
        self._attention_visibility()

    def show_query(self, image: ImageSource, world: tuple[float, ...]) -> None:
        """A cross at the query point; placed like the image (its scale and translate), so
        that the viewer's slider steps stay the image's."""
        scale = np.asarray(image.scale, float)
        translate = np.asarray(image.translate, float)
        point = ((np.asarray(world, float) - translate) / scale)[None]
        layer = self.get(QUERY)
        if layer is None:
            axis_labels, units = image.spatial_axes()
            layer = self.viewer.add_points(
                point,
                scale=image.scale,
                translate=image.translate,
                axis_labels=axis_labels,
                units=units,
                name=self.name(QUERY),
                symbol="cross",
                face_color="cyan",
                border_color="cyan",
                size=6,
            )
            self._layers[QUERY] = layer
        elif not np.allclose(layer.data, point):
            layer.data = point

    def _slice_layer(
        self,
        image: ImageSource,
        maps: SliceMaps,
        role: str,
        spec: MapSpec,
        plane: np.ndarray,
        classes: Sequence[dict],
    ) -> None:
        data = plane.reshape(image.slice_shape_for_layer(maps.axis))
        scale, translate = image.slice_placement(maps.axis, maps.index)
        layer = self.get(role)
        if layer is not None and layer.data.shape == data.shape:
            if spec.kind == "mask" and layer.metadata.get(CLASSES_KEY) != mask_table(spec, classes):
                _set_classes(layer, mask_table(spec, classes))
            update_in_place(layer, data, translate)
            return
        if layer is not None:
            self.viewer.layers.remove(layer)
        common = {
            "metadata": {OUTPUT_KEY: role, **source_metadata(image)},
            "name": self.name(spec.label),
            "scale": scale,
            "translate": translate,
            "axis_labels": image.axis_labels,
            "units": image.units,
        }
        if spec.kind == "mask":
            layer = self.viewer.add_labels(data, opacity=0.5, **common)
            _set_classes(layer, mask_table(spec, classes))
        else:
            layer = self.viewer.add_image(
                data.astype(np.float32),
                colormap=KIND_COLORMAPS.get(spec.kind, "viridis"),
                contrast_limits=(0.0, 1.0),
                visible=False,
                **common,
            )
        self._layers[role] = layer


def attention_colormap():
    """inferno, transparent at the bottom of the contrast range and opaque at the top."""
    from napari.utils.colormaps import Colormap, ensure_colormap

    steps = np.linspace(0.0, 1.0, 32)
    colours = ensure_colormap("inferno").map(steps).copy()
    colours[:, 3] = np.sqrt(steps)
    return Colormap(colours, name="attention (inferno, fading)", controls=steps)


def _rgb255(colour: str) -> np.ndarray:
    return rgba(colour)[:3].astype(float) * 255


def update_in_place(
    layer, data: np.ndarray, translate: tuple, limits: tuple[float, float] | None = None
) -> None:
    """New values for a layer of the same shape. Writing into the array and refreshing is
    much cheaper than assigning `data` or `translate`, which make napari recompute the
    extent of every layer (tens of ms per layer, measured in benchmarks/bench_widget.py);
    with the same shape and place the extent is unchanged, so the refresh skips it too. Values,
    place and contrast that did not change (the first layer's attention, the background
    probability, when only the token threshold moved) redraw nothing: a refresh and a new
    colour bar cost 10 to 20 ms each (measured), the comparison well under one."""
    moved = not np.allclose(layer.translate, translate)
    same_limits = limits is None or [float(v) for v in layer.contrast_limits] == list(limits)
    if not moved and same_limits and np.array_equal(layer.data, data):
        return
    if moved:
        layer.translate = translate
    layer.data[...] = data
    if limits is None:
        layer.refresh(extent=moved)
    else:  # the setter redraws the thumbnail (from the new values): the refresh need not
        layer.contrast_limits = limits
        layer.refresh(extent=moved, thumbnail=False)


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


def source_metadata(image: ImageSource) -> dict:
    """The source file's geometry, so our writers can put a layer back on the file's grid."""
    return image.source.to_metadata() if image.source is not None else {}
