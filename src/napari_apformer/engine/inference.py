"""The one place that turns an image array into segmentation results.

    segmenter = Segmenter(load_model(path), device="auto")
    image = segmenter.prepare(array, axis=2, spacing=(1, 1, 1), source=path)
    job = segmenter.start(image)          # an iterator: one Progress per batch; stop to cancel
    for progress in job: ...
    result = job.result

The engine knows the family interface (`model.base`) only: the input rule (letterbox),
the settings, the maps and counters a prediction declares, and the optional capabilities.

With `start(..., cache=True)` (live use: a slice on screen whose settings will move) and a
model that offers a `CachedSplit`, each slice keeps what `encode` gives, plus whatever
`prepare_cache` adds (APFormer: layer 1 at the current gate), keyed by the weights and the
exact model input. Any later run of that slice reads them, so a setting change runs only
`decode`. One-off runs (the command line, whole volumes) leave the cache alone.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from hashlib import blake2b

import numpy as np
import torch

from napari_apformer.allocator import freed_memory_kept, give_back_freed_memory
from napari_apformer.engine.cache import ByteLRU
from napari_apformer.engine.device import is_device_failure, is_out_of_memory, resolve_device
from napari_apformer.engine.precision import autocast_dtype
from napari_apformer.engine.preprocess import Letterbox, PreparedImage, prepare_image
from napari_apformer.engine.staging import HostStaging
from napari_apformer.engine.stats import RunStats
from napari_apformer.errors import InputError, first_line
from napari_apformer.io.image_file import label_dtype
from napari_apformer.io.memory import available_bytes, size_text, working_bytes_per_slice
from napari_apformer.model.base import (
    CachedSplit,
    MapSpec,
    QueryAttention,
    SegmentationModel,
    SettingValue,
)
from napari_apformer.model.card import ModelCard

DEFAULT_CACHE_BYTES = 512 * 2**20


@dataclass
class Progress:
    done: int  # slices finished
    total: int


@dataclass
class SegmentationResult:
    """Labels on the image's own grid and, per processed slice, the maps the model declares.

    Per-slice maps follow the order of `slices`, on the grids their MapSpec gives (use
    `letterbox.grid_to_image(map, spec.stride)` or grid_scale/grid_translate to place them).
    """

    labels: np.ndarray  # on the image's spatial shape (slices not processed stay 0)
    slices: list[int]
    maps: dict[str, np.ndarray]  # name -> (S, rows, cols)
    map_specs: list[MapSpec]
    letterbox: Letterbox
    stats: RunStats
    settings: dict[str, SettingValue]
    probabilities: np.ndarray | None = None  # (K, *spatial shape) float32, on request
    # Per slice in `attention_slices`: what QueryAttention.query_attention needs for any
    # query point without a rerun (APFormer: each layer's normed input).
    attention_states: dict[int, object] = field(default_factory=dict)
    # What the user should hear about: a smaller batch or a move to the CPU after the
    # device ran out of memory or failed.
    notices: list[str] = field(default_factory=list)

    def spec(self, name: str) -> MapSpec:
        return next(s for s in self.map_specs if s.name == name)

    def map_on_image(self, name: str, k: int = 0) -> np.ndarray:
        """Map `name` of the k-th processed slice on the slice's own pixels."""
        return self.letterbox.grid_to_image(self.maps[name][k], self.spec(name).stride)


class SegmentationJob:
    """Iterate to run: yields Progress after each batch. `result` is allocated at the start and
    filled batch by batch; `done` says whether every slice is in it. Stop iterating to cancel.
    """

    def __init__(self, result: SegmentationResult, steps: Iterator[Progress]) -> None:
        self.result, self._steps, self.done = result, steps, False

    @property
    def total(self) -> int:
        return len(self.result.slices)

    def __iter__(self) -> SegmentationJob:
        return self

    def __next__(self) -> Progress:
        try:
            return next(self._steps)
        except StopIteration:
            self.done = True
            raise

    def finish(self) -> SegmentationResult:
        for _ in self:
            pass
        return self.result


class Segmenter:
    def __init__(
        self,
        model: SegmentationModel,
        device: str | torch.device = "auto",
        batch_size: int = 8,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        precision: str = "auto",
    ) -> None:
        """precision: auto (float16 autocast on CUDA, float32 elsewhere), float32, float16
        or bfloat16."""
        if batch_size < 1:
            raise InputError(f"batch size must be at least 1, got {batch_size}")
        self.device = resolve_device(device)
        self.precision = precision
        self.autocast = autocast_dtype(self.device, precision)
        self.staging = HostStaging(self.device)
        self.model = model.to(self.device).eval()
        self.card = model.card or ModelCard.generic("unnamed", model.in_channels, model.n_classes)
        self.batch_size = batch_size
        self.encoder_cache: ByteLRU[object] = ByteLRU(cache_bytes)
        self._weights_key = self.card.sha256 or f"model-{id(model)}"
        self._reference_flops: dict[tuple[int, int], int] = {}
        self._encode_flops: dict[tuple[int, int], int] = {}

    def prepare(
        self,
        data: np.ndarray,
        *,
        rgb: bool = False,
        axis: int = 0,
        spacing: tuple[float, ...] | None = None,
        source: object = None,
    ) -> PreparedImage:
        return prepare_image(
            data,
            in_channels=self.model.in_channels,
            normalisation=self.card.normalisation,
            rule=self.model.input_rule,
            rgb=rgb,
            axis=axis,
            spacing=spacing,
            source=source,
        )

    def segment(self, image: PreparedImage, **settings) -> SegmentationResult:
        """Run `start(image, **settings)` to the end."""
        return self.start(image, **settings).finish()

    def start(
        self,
        image: PreparedImage,
        *,
        slices: Sequence[int] | None = None,
        probabilities: bool = False,
        attention_slices: Sequence[int] = (),
        cache: bool = False,
        **settings: object,
    ) -> SegmentationJob:
        """A job over `slices` (default: all). `settings` are the model's run-time settings
        by name (None or absent: the weights' own values).

        attention_slices: slices whose attention state is kept for Segmenter.attention (a
        model with QueryAttention only). cache: keep these slices' setting-independent work
        for later changes (a model with a CachedSplit only).
        """
        chosen = list(range(image.n_slices)) if slices is None else [int(i) for i in slices]
        if any(not 0 <= i < image.n_slices for i in chosen):
            raise InputError(f"slice index out of range 0..{image.n_slices - 1}", image.source)
        values = self.check_settings(settings, image.source)
        n_classes, count = self.model.n_classes, len(chosen)
        self.check_memory(image, probabilities)
        box = image.letterbox
        specs = self.model.map_specs()
        result = SegmentationResult(
            labels=np.zeros(image.spatial_shape, label_dtype(n_classes - 1)),
            slices=chosen,
            maps={
                spec.name: np.zeros(
                    (count, *box.grid_shape(spec.stride)),
                    bool if spec.kind == "mask" else np.float32,
                )
                for spec in specs
            },
            map_specs=specs,
            letterbox=box,
            stats=RunStats(
                device=str(self.device),
                labels={c.name: c.label for c in self.model.counter_specs()},
            ),
            settings=values,
            probabilities=(
                np.zeros((n_classes, *image.spatial_shape), np.float32) if probabilities else None
            ),
        )
        self._flops(self._reference_flops, box, self.model.reference_flops)  # once per size
        watched = set(attention_slices) & set(chosen)
        if not isinstance(self.model, QueryAttention):
            watched = set()
        return SegmentationJob(result, self._steps(image, result, watched, cache))

    def check_memory(self, image: PreparedImage, probabilities: bool = False) -> None:
        """InputError, with the sizes, when labels + probabilities + one batch's working memory
        would not fit in the memory available now."""
        free = available_bytes()
        if free is None:
            return
        voxels = int(np.prod(image.spatial_shape))
        labels = voxels * np.dtype(label_dtype(self.model.n_classes - 1)).itemsize
        probs = 4 * voxels * self.model.n_classes if probabilities else 0
        box = image.letterbox
        per_slice = working_bytes_per_slice(
            box.height, box.width, image.in_channels, self.model.n_classes, probabilities
        )
        batch = min(self.batch_size, image.n_slices) * per_slice
        if labels + probs + batch <= free:
            return
        parts = (
            f"labels {size_text(labels)}, one batch of {self.batch_size} slices {size_text(batch)}"
        )
        parts += f", probabilities {size_text(probs)}" if probs else ""
        hints = ["a smaller batch (--batch-size 1)"] if self.batch_size > 1 else []
        hints += ["no probabilities"] if probs else []
        hints += ["fewer slices at a time, or a machine with more memory"]
        raise InputError(
            f"this run needs about {size_text(labels + probs + batch)} ({parts}) but only "
            f"{size_text(free)} is available; try {' or '.join(hints)}",
            image.source,
        )

    def check_settings(
        self, settings: dict[str, object] | None = None, source: object = None
    ) -> dict[str, SettingValue]:
        """Every setting's effective value; InputError if one is unknown or invalid."""
        return self.model.resolve_settings(settings, source)

    def _steps(
        self, image: PreparedImage, result: SegmentationResult, watched: set[int], cache: bool
    ) -> Iterator[Progress]:
        """Batches in order. On CUDA the next batch is launched before the previous one is
        collected, so the GPU is never idle while the CPU prepares inputs or writes labels.

        Out of memory: the batches in flight go back to the queue at half the batch size, and
        at batch 1 the run moves to the CPU; a failing GPU also moves it to the CPU. Slices
        already collected stay in `result` either way.
        """
        started = time.perf_counter()
        position = {index: k for k, index in enumerate(result.slices)}
        queue = deque(_chunks(result.slices, self.batch_size))
        several = len(queue) > 1
        in_flight: deque[_Launched] = deque()
        done = 0
        while queue or in_flight:
            ready: list[Progress] = []
            try:
                # Freed memory stays in the process while a batch runs (allocator.py), and is
                # not held while the job waits between batches, or after it is dropped.
                with freed_memory_kept(give_back=False):
                    if queue:
                        with torch.inference_mode():
                            in_flight.append(self._launch(image, queue[0], result, watched, cache))
                        queue.popleft()
                    while in_flight and (len(in_flight) > 1 or not self.overlap or not queue):
                        finished = in_flight[0]
                        self._collect(finished, image, result, position)
                        in_flight.popleft()
                        done += len(finished.batch)
                        result.stats.seconds = time.perf_counter() - started
                        ready.append(Progress(done, len(result.slices)))
            except Exception as error:
                if not (is_out_of_memory(error) or is_device_failure(error)):
                    raise
                lost = [slice_ for launched in in_flight for slice_ in launched.batch]
                pending = lost + [slice_ for batch in queue for slice_ in batch]
                in_flight.clear()
                self._recover(error, result, done)
                queue = deque(_chunks(pending, self.batch_size))
            yield from ready
        if several:  # a volume gives its memory back; a slider's run keeps it for the next
            give_back_freed_memory()

    def _recover(self, error: Exception, result: SegmentationResult, done: int) -> None:
        """Halve the batch after running out of memory; at batch 1, or when the device
        fails, move to the CPU. Raises InputError when even that is not possible."""
        kept = f"{done} of {len(result.slices)} slices were done and are kept"
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if is_out_of_memory(error) and self.batch_size > 1:
            self.batch_size = max(1, self.batch_size // 2)
            result.notices.append(
                f"{self.device} ran out of memory; continuing with batch size {self.batch_size}"
            )
            return
        if self.device.type == "cpu":
            if is_out_of_memory(error):
                raise InputError(
                    f"not enough memory for even one slice on the CPU ({kept})", None
                ) from error
            raise error
        reason = "ran out of memory at batch size 1" if is_out_of_memory(error) else "failed"
        result.notices.append(
            f"{self.device} {reason} ({first_line(error)}); continuing on the CPU; {kept}"
        )
        self.move_to(torch.device("cpu"))
        result.stats.device = f"cpu (after {result.stats.device})"

    def move_to(self, device: torch.device) -> None:
        """Run on `device` from now on (the encoder cache is dropped: it lives on the old one)."""
        self.device = device
        self.model = self.model.to(device)
        self.autocast = autocast_dtype(device, self.precision)
        self.staging = HostStaging(device)
        self.encoder_cache = ByteLRU(self.encoder_cache.max_bytes)

    @property
    def overlap(self) -> bool:
        """Launch batch k + 1 before collecting batch k (pays off where the device is async)."""
        return self.device.type == "cuda"

    def _flops(self, table: dict, box: Letterbox, count) -> int:
        size = (box.model_height, box.model_width)
        if size not in table:
            table[size] = count(*size)
        return table[size]

    def _encode(
        self, inputs: torch.Tensor, keys: list[tuple], fill_cache: bool, settings: dict
    ) -> tuple[object, list[bool], int]:
        """Encoded slices for a batch, from the cache where present; which slices were hits;
        FLOPs spent preparing cache entries."""
        model: CachedSplit = self.model  # type: ignore[assignment]
        found = [self.encoder_cache.get(key) for key in keys]
        hits = [item is not None for item in found]
        missing = [k for k, item in enumerate(found) if item is None]
        if missing:
            fresh = model.encode(inputs if len(missing) == len(found) else inputs[missing])
            if not fill_cache and len(missing) == len(found):
                return fresh, hits, 0
            for j, k in enumerate(missing):
                found[k] = fresh.select([j])  # a copy: the batch tensors are not kept alive
        spent = 0
        if fill_cache:
            for key, item in zip(keys, found, strict=True):
                spent += model.prepare_cache(item, **settings)
                self.encoder_cache.put(key, item, item.nbytes())
        return type(found[0]).cat(found), hits, spent

    def _launch(
        self,
        image: PreparedImage,
        batch: list[int],
        result: SegmentationResult,
        watched: set[int],
        fill_cache: bool,
    ) -> _Launched:
        """Queue a batch's work on the device; its outputs come back to the host
        asynchronously (complete once `ready` has been reached)."""
        box = image.letterbox
        host, slot = self.staging.buffer((len(batch), image.in_channels, box.height, box.width))
        for j, index in enumerate(batch):
            host[j] = torch.from_numpy(image.slice_input(index))
        split = isinstance(self.model, CachedSplit)
        # Keyed by the slice itself, before it goes to the device. Hashing costs about 1 ms
        # per 512 x 512 slice, so it is skipped when there is nothing to find or to keep.
        keys: list[tuple] | None = None
        if split and (fill_cache or len(self.encoder_cache)):
            place = (self._weights_key, str(self.device), box)
            keys = [(*place, blake2b(row.numpy(), digest_size=16).digest()) for row in host]
        pixels = self.staging.send(host, slot)
        inputs = box.to_model(pixels)
        want_attention = any(i in watched for i in batch)
        hits, spent = [False] * len(batch), 0
        with torch.autocast(self.device.type, self.autocast, enabled=self.autocast is not None):
            if keys is not None:  # the split only pays where there is a cache to use
                encoded, hits, spent = self._encode(inputs, keys, fill_cache, result.settings)
                out = self.model.decode(encoded, want_attention, **result.settings)
                encode_flops = self._flops(self._encode_flops, box, self.model.encode_flops)
                extra = [0 if hit else encode_flops for hit in hits]
            else:
                out = self.model.predict(inputs, want_attention, **result.settings)
                extra = [0] * len(batch)
        flops: list[int] | None = None  # None: the family counts no FLOPs (unknown, not 0)
        full: list[int] | None = None
        if out.flops is not None:
            flops = [int(f) + e for f, e in zip(_per_image(out.flops), extra, strict=True)]
            flops[0] += spent
            full = _per_image(out.full_flops) if out.full_flops is not None else list(flops)
        logits = box.to_image(out.logits.float())

        def to_host(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.to("cpu", non_blocking=self.staging.pinned)

        launched = _Launched(
            batch=batch,
            hits=hits,
            flops=flops,
            full_flops=full,
            labels=to_host(logits.argmax(dim=1).to(_label_tensor_dtype(self.model.n_classes))),
            probabilities=(
                to_host(torch.softmax(logits, dim=1)) if result.probabilities is not None else None
            ),
            maps={
                name: to_host(m.float() if m.is_floating_point() else m)
                for name, m in out.maps.items()
            },
            counters={name: to_host(c) for name, c in out.counters.items()},
            attention={
                index: [
                    to_host(t.float() if t.is_floating_point() else t) for t in out.attention[j]
                ]
                for j, index in enumerate(batch)
                if index in watched and out.attention is not None
            },
        )
        if self.staging.pinned:  # copies to the host are asynchronous: mark their end
            launched.ready = torch.cuda.Event()
            launched.ready.record()
        return launched

    def _collect(
        self,
        launched: _Launched,
        image: PreparedImage,
        result: SegmentationResult,
        position: dict[int, int],
    ) -> None:
        """Wait for a launched batch and write its outputs into `result`."""
        if launched.ready is not None:
            launched.ready.synchronize()
        labels = (
            np.moveaxis(result.labels, image.axis, 0) if image.is_volume else result.labels[None]
        )
        probs_out = None
        if launched.probabilities is not None:
            probs_out = (
                np.moveaxis(result.probabilities, image.axis + 1, 1)
                if image.is_volume
                else result.probabilities[:, None]
            )
        stats = result.stats
        reference = self._reference_flops[image.letterbox.model_height, image.letterbox.model_width]
        for j, index in enumerate(launched.batch):
            k = position[index]
            labels[index if image.is_volume else 0] = launched.labels[j].numpy()
            if probs_out is not None:
                probs_out[:, index if image.is_volume else 0] = launched.probabilities[j].numpy()
            for name, values in launched.maps.items():
                result.maps[name][k] = values[j].numpy()
            for name, pair in launched.counters.items():
                stats.add(name, int(pair[j, 0]), int(pair[j, 1]))
            stats.slices += 1
            stats.add_flops(
                None if launched.flops is None else launched.flops[j],
                None if launched.full_flops is None else launched.full_flops[j],
                reference,
            )
            stats.encoder_cache_hits += int(launched.hits[j])
        result.attention_states.update(launched.attention)

    def attention(
        self, result: SegmentationResult, slice_index: int, token: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """(layers, heads, rows, cols) attention of query `token` after and before pruning,
        for a slice run with attention_slices; zeros where the query was pruned."""
        state = result.attention_states.get(slice_index)
        if state is None or not isinstance(self.model, QueryAttention):
            raise ValueError(f"slice {slice_index} was not run with attention_slices")
        box = result.letterbox
        rows, cols, _ = self.model.attention_grid(box.model_height, box.model_width)
        layers, heads = self.model.attention_shape()
        with torch.inference_mode():
            moved = [x.to(self.device) for x in state]  # type: ignore[attr-defined]
            after, before = self.model.query_attention(moved, token, **result.settings)
        shape = (layers, heads, rows, cols)
        return (
            after.float().cpu().numpy().reshape(shape),
            before.float().cpu().numpy().reshape(shape),
        )


def _per_image(values: torch.Tensor) -> list[int]:
    return [int(f) for f in values.tolist()]


def _label_tensor_dtype(n_classes: int) -> torch.dtype:
    """The smallest integer type that holds every class (argmax is int64)."""
    return torch.uint8 if n_classes <= 256 else torch.int32


@dataclass
class _Launched:
    """A batch whose work is queued on the device; its tensors here are on the host."""

    batch: list[int]
    hits: list[bool]
    flops: list[int] | None  # per slice: what this run spent on it (None: not counted)
    full_flops: list[int] | None  # per slice: a plain pass at these settings
    labels: torch.Tensor  # (B, H, W)
    probabilities: torch.Tensor | None  # (B, K, H, W)
    maps: dict[str, torch.Tensor]  # name -> (B, rows, cols)
    counters: dict[str, torch.Tensor]  # name -> (B, 2)
    attention: dict[int, list[torch.Tensor]]
    ready: torch.cuda.Event | None = None


def _chunks(items: Sequence[int], size: int) -> list[list[int]]:
    return [list(items[k : k + size]) for k in range(0, len(items), size)]
