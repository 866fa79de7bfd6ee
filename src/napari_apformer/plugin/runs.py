"""What the widget asks the engine for, run in worker threads: one slice live, or a volume.

Nothing here touches Qt or napari layers; results are handed back to the main thread. One
lock serialises use of the engine, so a live slice can slip in between two batches of a
volume run.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from napari_apformer.engine.inference import (
    Progress,
    SegmentationJob,
    SegmentationResult,
    Segmenter,
)
from napari_apformer.engine.preprocess import PreparedImage
from napari_apformer.engine.stats import RunStats
from napari_apformer.model.card import ModelCard
from napari_apformer.model.checkpoint import load_model
from napari_apformer.plugin.image_source import ImageSource
from napari_apformer.plugin.layers import SliceMaps


@dataclass(frozen=True)
class Settings:
    weights: Path
    device: str
    token_threshold: float
    gates: float | tuple[float, ...]


@dataclass
class LiveRequest:
    generation: int
    image: ImageSource
    axis: int
    index: int
    settings: Settings
    query: tuple[float, float] | None  # (row, column) in slice pixels; None: centre of brain


@dataclass
class LiveOutcome:
    request: LiveRequest
    maps: SliceMaps
    stats: RunStats
    token_threshold: float
    gates: list[float]
    query: tuple[float, float]
    attention_after: np.ndarray  # (layers, heads, 32, 32)
    attention_before: np.ndarray
    card: ModelCard
    notices: list[str]  # the device ran out of memory or failed (see Segmenter._recover)


class Engine:
    """Segmenters by (weights, device), prepared images by what they depend on, one lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._segmenters: dict[tuple[Path, str], Segmenter] = {}
        self._prepared: dict[tuple, PreparedImage] = {}
        # The last live run, for new query points (kept apart from the lock on purpose: a
        # click must not wait for a volume batch).
        self._last_live: tuple[LiveOutcome, SegmentationResult, Segmenter] | None = None

    def segmenter(self, settings: Settings) -> Segmenter:
        key = (settings.weights, settings.device)
        with self.lock:
            if key not in self._segmenters:
                self._segmenters.clear()  # one model in memory at a time
                self._prepared.clear()
                self._segmenters[key] = Segmenter(load_model(settings.weights), settings.device)
            return self._segmenters[key]

    def prepared(self, segmenter: Segmenter, image: ImageSource, axis: int) -> PreparedImage:
        key = (id(segmenter), id(image.data), image.data.shape, image.leading_index, axis)
        if key not in self._prepared:
            if len(self._prepared) > 8:
                self._prepared.clear()
            spacing = image.scale if image.is_nifti else None
            self._prepared[key] = segmenter.prepare(
                image.data, rgb=image.rgb, axis=axis, spacing=spacing, source=image.name
            )
        return self._prepared[key]

    def run_live(self, request: LiveRequest) -> LiveOutcome:
        settings = request.settings
        segmenter = self.segmenter(settings)
        prepared = self.prepared(segmenter, request.image, request.axis)
        with self.lock:
            result = segmenter.start(
                prepared,
                slices=[request.index],
                token_threshold=settings.token_threshold,
                gate=settings.gates,
                attention_slices=[request.index],
                cache=True,
            ).finish()
        labels = prepared_slice(result.labels, prepared, request.index)
        query = request.query or foreground_centre(labels)
        token = result.letterbox.token_index(*query)
        after, before = segmenter.attention(result, request.index, token)
        maps = SliceMaps(
            request.axis,
            request.index,
            labels,
            result.keep[0],
            result.background_probability[0],
            result.kept_dependency_fraction[0],
            result.letterbox,
        )
        outcome = LiveOutcome(
            request,
            maps,
            result.stats,
            result.token_threshold,
            result.gates,
            query,
            after,
            before,
            segmenter.card,
            result.notices,
        )
        self._last_live = (outcome, result, segmenter)
        return outcome

    def attention_at(self, outcome: LiveOutcome, query: tuple[float, float]) -> LiveOutcome:
        """The last live outcome with the attention of another query point (no rerun)."""
        if self._last_live is None or self._last_live[0] is not outcome:
            return outcome
        _, result, segmenter = self._last_live
        token = result.letterbox.token_index(*query)
        after, before = segmenter.attention(result, outcome.request.index, token)
        outcome.query, outcome.attention_after, outcome.attention_before = query, after, before
        return outcome

    def volume_steps(
        self, settings: Settings, image: ImageSource, axis: int
    ) -> Iterator[tuple[SegmentationJob, Progress | None, ModelCard]]:
        """(job, progress, card) after each batch; the first item (progress None) is the start."""
        segmenter = self.segmenter(settings)
        prepared = self.prepared(segmenter, image, axis)
        job = segmenter.start(
            prepared, token_threshold=settings.token_threshold, gate=settings.gates
        )
        yield job, None, segmenter.card
        while True:
            with self.lock:
                try:
                    progress = next(job)
                except StopIteration:
                    return
            yield job, progress, segmenter.card


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
