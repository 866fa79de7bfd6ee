"""What the widget asks the engine for, run in worker threads: a model's declarations, one
slice live, the attention of another query point, or a volume.

Nothing here touches Qt or napari layers; results are handed back to the main thread. A
`Session` holds the segmenters (by weights and device), the prepared images and one lock
that serialises every use of a model, so a live slice or a query point can slip in between
two batches of a volume run, and nothing runs a model on the Qt thread.

The model runs on the array the command line gives it (`ImageSource.model_data`: the RAS
voxel array for NIfTI), so a file gets the same labels here and from `apformer predict`.
What a live run hands back (labels, maps, attention, the query point, the letterbox) is on
the shown slice's axes; a volume run's `result.labels` stays on the model array's axes
(`ImageSource.to_display` shows it).
"""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from hashlib import blake2b
from pathlib import Path

import numpy as np

from napari_apformer.engine.inference import (
    Progress,
    SegmentationJob,
    SegmentationResult,
    Segmenter,
)
from napari_apformer.engine.preprocess import Letterbox, PreparedImage
from napari_apformer.engine.stats import RunStats
from napari_apformer.model.base import (
    MapSpec,
    QueryAttention,
    SegmentationModel,
    Setting,
    SettingValue,
)
from napari_apformer.model.card import ModelCard
from napari_apformer.model.checkpoint import load_model
from napari_apformer.plugin.image_source import ImageSource
from napari_apformer.plugin.layers import SliceMaps

UNPRUNED_SLICES = 64  # unpruned labels kept (one small array per slice)


@dataclass(frozen=True)
class Settings:
    """Which weights on which device, and the model's run-time settings by name (absent: the
    weights' own values; a per-layer setting: one value for all layers or one per layer)."""

    weights: Path
    device: str
    values: Mapping[str, SettingValue] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelInfo:
    """What the widget builds its controls from: the model's declarations."""

    weights: Path
    family: str
    settings: list[Setting]  # defaults: the weights' card values
    map_specs: list[MapSpec]
    attention_shape: tuple[int, int] | None  # (layers, heads); None: no query attention
    attention_pruned: bool  # whether attention before pruning can differ from after
    card: ModelCard


@dataclass
class LiveRequest:
    generation: int
    image: ImageSource
    axis: int
    index: int
    settings: Settings
    query: tuple[float, float] | None  # (row, column) in slice pixels; None: centre of brain


@dataclass
class QueryView:
    """Attention of one query point, per layer and head, on the model's attention grid."""

    query: tuple[float, float]  # (row, column) in slice pixels
    after: np.ndarray  # (layers, heads, rows, cols), after pruning
    before: np.ndarray  # the same before pruning
    stride: int  # model pixels per grid cell


@dataclass
class LiveOutcome:
    request: LiveRequest
    maps: SliceMaps
    stats: RunStats
    settings: dict[str, SettingValue]  # every setting's effective value in this run
    card: ModelCard
    notices: list[str]  # the device ran out of memory or failed (see Segmenter._recover)
    attention: QueryView | None = None  # only for a model that offers QueryAttention
    params: int = 0  # the model's parameter count
    # Pixels of the shown slice whose label differs from an unpruned pass (h, w) bool, and
    # the settings of that pass; None for a model without pruning settings.
    changed: np.ndarray | None = None
    unpruned: dict[str, SettingValue] | None = None


class Session:
    """Segmenters by (weights, device), prepared images by what they depend on, one lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._segmenters: dict[tuple[Path, str], Segmenter] = {}
        self._prepared: dict[tuple, PreparedImage] = {}
        # The last live run, for new query points.
        self._last_live: tuple[LiveOutcome, SegmentationResult, Segmenter] | None = None
        # Labels of unpruned passes by weights, device, letterbox and slice pixels (see
        # unpruned_labels): one pass per slice, whatever the sliders do afterwards.
        self._unpruned: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self.unpruned_runs = 0  # passes run (not taken from _unpruned), for tests

    def segmenter(self, settings: Settings) -> Segmenter:
        key = (settings.weights, settings.device)
        with self.lock:
            if key not in self._segmenters:
                self._segmenters.clear()  # one model in memory at a time
                self._prepared.clear()
                self._unpruned.clear()
                self._last_live = None
                self._segmenters[key] = Segmenter(load_model(settings.weights), settings.device)
            return self._segmenters[key]

    def close(self) -> None:
        """Let go of the model, its caches and the prepared images. Without the lock, so that
        closing never waits for a batch; a run still going keeps what it holds until it ends."""
        self._segmenters.clear()
        self._prepared.clear()
        self._unpruned.clear()
        self._last_live = None

    def describe(self, settings: Settings) -> ModelInfo:
        """Load the weights (kept for the runs that follow) and say what the model declares."""
        segmenter = self.segmenter(settings)
        model = segmenter.model
        return ModelInfo(
            settings.weights,
            model.family,
            model.settings(),
            model.map_specs(),
            model.attention_shape() if isinstance(model, QueryAttention) else None,
            isinstance(model, QueryAttention) and model.attention_pruned(),
            segmenter.card,
        )

    def prepared(self, segmenter: Segmenter, image: ImageSource, axis: int) -> PreparedImage:
        """The image as the command line prepares it (model array, axis and spacing);
        `axis` is the shown array's slice axis."""
        key = (id(segmenter), id(image.data), image.data.shape, image.leading_index, axis)
        if key not in self._prepared:
            if len(self._prepared) > 8:
                self._prepared.clear()
            self._prepared[key] = segmenter.prepare(
                image.model_data(),
                rgb=image.rgb,
                axis=image.model_axis(axis),
                spacing=image.model_spacing(),
                source=image.name,
            )
        return self._prepared[key]

    def run_live(self, request: LiveRequest) -> LiveOutcome:
        settings = request.settings
        segmenter = self.segmenter(settings)
        prepared = self.prepared(segmenter, request.image, request.axis)
        watch = isinstance(segmenter.model, QueryAttention)
        with self.lock:
            result = segmenter.start(
                prepared,
                slices=[request.index],
                attention_slices=[request.index] if watch else (),
                cache=True,
                **settings.values,
            ).finish()
            image = request.image
            plane = prepared_slice(result.labels, prepared, request.index)
            labels = image.plane_to_display(plane)
            view = None
            if watch:
                query = request.query or foreground_centre(labels)
                view = _query_view(segmenter, result, image, request.index, query)
            unpruned = unpruned_values(segmenter.model)
            changed = None
            if unpruned is not None:
                if _same_settings(result.settings, unpruned):
                    reference = plane  # this run is the unpruned pass
                else:
                    reference = self.unpruned_labels(segmenter, prepared, request.index, unpruned)
                changed = image.plane_to_display(plane != reference)
        maps = SliceMaps(
            request.axis,
            request.index,
            labels,
            {name: image.plane_to_display(values[0]) for name, values in result.maps.items()},
            result.map_specs,
            shown_letterbox(result.letterbox, image),
        )
        outcome = LiveOutcome(
            request,
            maps,
            result.stats,
            result.settings,
            segmenter.card,
            result.notices,
            view,
            model_params(segmenter.model),
            changed,
            unpruned,
        )
        self._last_live = (outcome, result, segmenter)
        return outcome

    def unpruned_labels(
        self,
        segmenter: Segmenter,
        prepared: PreparedImage,
        index: int,
        unpruned: dict[str, SettingValue],
    ) -> np.ndarray:
        """Labels of slice `index` (on the model slice's axes) from a pass with `unpruned`
        settings, run once per weights, device and slice pixels. Call it with the lock held,
        after a live run of that slice filled the encoder cache: this pass then decodes only,
        and leaves the cache as the live run prepared it (cache=False)."""
        pixels = np.ascontiguousarray(prepared.slice_input(index))
        key = (
            segmenter.card.sha256 or segmenter.card.name,
            str(segmenter.device),
            prepared.letterbox,
            blake2b(pixels, digest_size=16).digest(),
        )
        if key in self._unpruned:
            self._unpruned.move_to_end(key)
            return self._unpruned[key]
        result = segmenter.start(prepared, slices=[index], cache=False, **unpruned).finish()
        labels = prepared_slice(result.labels, prepared, index).copy()
        self.unpruned_runs += 1
        self._unpruned[key] = labels
        while len(self._unpruned) > UNPRUNED_SLICES:
            self._unpruned.popitem(last=False)
        return labels

    def attention_at(self, outcome: LiveOutcome, query: tuple[float, float]) -> QueryView | None:
        """The attention of another query point in the last live run (no rerun of the model,
        but its attention rows: call it from a worker, it waits for the lock). None when
        `outcome` is no longer the last live run or its model has no query attention."""
        with self.lock:
            last = self._last_live
            if last is None or last[0] is not outcome or outcome.attention is None:
                return None
            _, result, segmenter = last
            request = outcome.request
            return _query_view(segmenter, result, request.image, request.index, query)

    def volume_steps(
        self, settings: Settings, image: ImageSource, axis: int
    ) -> Iterator[tuple[SegmentationJob, Progress | None, ModelCard]]:
        """(job, progress, card) after each batch; the first item (progress None) is the start.
        The job's labels are on the model array's axes (`image.to_display` shows them)."""
        segmenter = self.segmenter(settings)
        prepared = self.prepared(segmenter, image, axis)
        job = segmenter.start(prepared, **settings.values)
        yield job, None, segmenter.card
        while True:
            with self.lock:
                try:
                    progress = next(job)
                except StopIteration:
                    return
            yield job, progress, segmenter.card


def _query_view(
    segmenter: Segmenter,
    result: SegmentationResult,
    image: ImageSource,
    index: int,
    query: tuple[float, float],
) -> QueryView:
    """Attention rows of the query point (shown slice pixels) in a run with
    attention_slices, on the shown slice's axes."""
    box = result.letterbox
    _, _, stride = segmenter.model.attention_grid(box.model_height, box.model_width)
    token = box.grid_index(*image.point_to_model(*query), stride)
    after, before = segmenter.attention(result, index, token)
    return QueryView(query, image.plane_to_display(after), image.plane_to_display(before), stride)


def unpruned_values(model: SegmentationModel) -> dict[str, SettingValue] | None:
    """The settings of the pass that labels are compared with: what the model says prunes
    nothing (`unpruned_settings`), its weights' own values for the other settings (fixed, so
    that moving a slider never asks for another unpruned pass). None for a model without
    settings or without anything to switch off (nothing to compare)."""
    unpruned = model.unpruned_settings()
    if not model.settings() or not unpruned:
        return None
    return model.resolve_settings({**model.defaults(), **unpruned})


def _same_settings(a: Mapping[str, SettingValue], b: Mapping[str, SettingValue]) -> bool:
    if a.keys() != b.keys():
        return False
    return all(np.allclose(np.asarray(a[k], float), np.asarray(b[k], float)) for k in a)


def model_params(model: SegmentationModel) -> int:
    return sum(p.numel() for p in model.parameters())


def shown_letterbox(box: Letterbox, image: ImageSource) -> Letterbox:
    """The letterbox of the shown slice: the model slice's with rows and columns swapped
    where the shown slice is its transpose (its grid maps are swapped the same way)."""
    if not image.transposed:
        return box
    return dataclasses.replace(
        box,
        height=box.width,
        width=box.height,
        inner_height=box.inner_width,
        inner_width=box.inner_height,
        top=box.left,
        left=box.top,
        model_height=box.model_width,
        model_width=box.model_height,
    )


def prepared_slice(labels: np.ndarray, prepared: PreparedImage, index: int) -> np.ndarray:
    return np.take(labels, index, axis=prepared.axis) if prepared.is_volume else labels


def foreground_centre(labels: np.ndarray) -> tuple[float, float]:
    """The foreground pixel nearest the foreground's centroid; the slice centre if none."""
    rows, cols = np.nonzero(labels)
    if rows.size == 0:
        return (labels.shape[0] - 1) / 2, (labels.shape[1] - 1) / 2
    cy, cx = rows.mean(), cols.mean()
    nearest = int(np.argmin((rows - cy) ** 2 + (cols - cx) ** 2))
    return float(rows[nearest]), float(cols[nearest])
