"""The one place that turns an image array into segmentation results.

    segmenter = Segmenter(load_model(path), device="auto")
    image = segmenter.prepare(array, axis=2, spacing=(1, 1, 1), source=path)
    job = segmenter.start(image)          # an iterator: one Progress per batch; stop to cancel
    for progress in job: ...
    result = job.result

With `start(..., cache=True)` (live use: a slice on screen whose threshold will move) each
slice keeps what does not depend on the token threshold: the encoder features and layer 1's
output for every token, keyed by the weights and the exact model input. Any later run of that
slice reads them, so a threshold change computes only layers 2 to 4 and the decoder. One-off
runs (the command line, whole volumes) leave the cache alone.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from hashlib import blake2b

import numpy as np
import torch

from napari_apformer.engine.cache import ByteLRU
from napari_apformer.engine.device import is_device_failure, is_out_of_memory, resolve_device
from napari_apformer.engine.precision import autocast_dtype
from napari_apformer.engine.preprocess import Letterbox, PreparedImage, prepare_image
from napari_apformer.engine.staging import HostStaging
from napari_apformer.engine.stats import (
    RunStats,
    decoder_flops,
    encoder_flops,
    first_layer_flops,
    slice_flops,
)
from napari_apformer.errors import InputError
from napari_apformer.io.image_file import label_dtype
from napari_apformer.io.memory import WORKING_BYTES_PER_SLICE, available_bytes, size_text
from napari_apformer.model.apformer import (
    BACKGROUND,
    TOKEN_GRID,
    TOKENS,
    APFormer,
    EncodedSlices,
    check_token_threshold,
)
from napari_apformer.model.card import ModelCard

DEFAULT_CACHE_BYTES = 512 * 2**20


@dataclass
class Progress:
    done: int  # slices finished
    total: int


@dataclass
class SegmentationResult:
    """Labels on the image's own grid and, per processed slice, what the pruning did.

    Per-slice arrays follow the order of `slices`; token maps are on the 32 x 32 grid (use
    `letterbox.token_grid_to_image` or its token_scale/token_translate to place them).
    """

    labels: np.ndarray  # uint8 on the image's spatial shape (slices not processed stay 0)
    slices: list[int]
    keep: np.ndarray  # (S, 32, 32) bool
    background_probability: np.ndarray  # (S, 32, 32) from the pruning head
    kept_dependency_fraction: np.ndarray  # (S, 32, 32) mean over layers and heads; 0 if pruned
    letterbox: Letterbox
    stats: RunStats
    token_threshold: float
    gates: list[float]
    probabilities: np.ndarray | None = None  # (K, *spatial shape) float32, on request
    # Per slice in `attention_slices`: each transformer layer's normed input (N, C), from
    # which Segmenter.attention gives the attention of any query point without a rerun.
    layer_inputs: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    # What the user should hear about: a smaller batch or a move to the CPU after the
    # device ran out of memory or failed.
    notices: list[str] = field(default_factory=list)


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
        model: APFormer,
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
        self.encoder_cache: ByteLRU[EncodedSlices] = ByteLRU(cache_bytes)
        self._weights_key = self.card.sha256 or f"model-{id(model)}"
        self._encoder_flops = encoder_flops(model)
        self._unpruned_flops = slice_flops(model, TOKENS)
        self._first_layer_flops = first_layer_flops(model)

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
        token_threshold: float | None = None,
        gate: float | Sequence[float] | None = None,
        probabilities: bool = False,
        attention_slices: Sequence[int] = (),
        cache: bool = False,
    ) -> SegmentationJob:
        """A job over `slices` (default: all). Settings default to the weights' own values.

        attention_slices: slices whose layer inputs are kept for Segmenter.attention (2 MB each).
        cache: keep these slices' threshold-independent work for later changes (about 8 MB
        each; costs layer 1 for every token once).
        """
        chosen = list(range(image.n_slices)) if slices is None else [int(i) for i in slices]
        if any(not 0 <= i < image.n_slices for i in chosen):
            raise InputError(f"slice index out of range 0..{image.n_slices - 1}", image.source)
        tau, gates = self.check_settings(token_threshold, gate)
        n_classes, count = self.model.n_classes, len(chosen)
        self.check_memory(image, probabilities)
        grid = (count, TOKEN_GRID, TOKEN_GRID)
        result = SegmentationResult(
            labels=np.zeros(image.spatial_shape, label_dtype(n_classes - 1)),
            slices=chosen,
            keep=np.zeros(grid, dtype=bool),
            background_probability=np.zeros(grid, np.float32),
            kept_dependency_fraction=np.zeros(grid, np.float32),
            letterbox=image.letterbox,
            stats=RunStats(device=str(self.device)),
            token_threshold=tau,
            gates=gates,
            probabilities=(
                np.zeros((n_classes, *image.spatial_shape), np.float32) if probabilities else None
            ),
        )
        watched = set(attention_slices) & set(chosen)
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
        batch = min(self.batch_size, image.n_slices) * WORKING_BYTES_PER_SLICE
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
        self, token_threshold: float | None, gate: float | Sequence[float] | None
    ) -> tuple[float, list[float]]:
        """The effective threshold and per-layer gates; InputError if they are invalid."""
        tau = self.model.default_token_threshold if token_threshold is None else token_threshold
        check_token_threshold(tau)
        return tau, self.model.gate_values(gate, torch.empty(0)).tolist()

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
        in_flight: deque[_Launched] = deque()
        done = 0
        while queue or in_flight:
            try:
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
                    yield Progress(done, len(result.slices))
            except Exception as error:
                if not (is_out_of_memory(error) or is_device_failure(error)):
                    raise
                lost = [slice_ for launched in in_flight for slice_ in launched.batch]
                pending = lost + [slice_ for batch in queue for slice_ in batch]
                in_flight.clear()
                self._recover(error, result, done)
                queue = deque(_chunks(pending, self.batch_size))

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
            f"{self.device} {reason} ({_first_line(error)}); continuing on the CPU; {kept}"
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

    def _encode(
        self,
        inputs: torch.Tensor,
        keys: list[tuple] | None,
        fill_cache: bool,
        first_gate: float | None,
    ) -> tuple[EncodedSlices, list[bool], int]:
        """Encoder features for a batch, from the cache where present (keys None: no cache in
        play); which slices were hits; FLOPs spent on caching layer 1.

        When filling the cache, each slice also keeps layer 1's output for every token at
        `first_gate`, so that later threshold changes skip layer 1 too.
        """
        if keys is None:  # no cache in play
            return self.model.encode(inputs), [False] * len(inputs), 0
        found = [self.encoder_cache.get(key) for key in keys]
        hits = [item is not None for item in found]
        missing = [k for k, item in enumerate(found) if item is None]
        if missing:
            fresh = self.model.encode(inputs if len(missing) == len(found) else inputs[missing])
            if not fill_cache and len(missing) == len(found):
                return fresh, hits, 0
            for j, k in enumerate(missing):
                found[k] = fresh.select([j])  # a copy: the batch tensors are not kept alive
        first_layer_spent = 0
        if fill_cache:
            for key, item in zip(keys, found, strict=True):
                stale = item.first_layer is None or item.first_layer.gate != first_gate
                if first_gate is not None and stale:
                    self.model.add_first_layer(item, first_gate)
                    first_layer_spent += self._first_layer_flops
                self.encoder_cache.put(key, item, item.nbytes())
        return EncodedSlices.cat(found), hits, first_layer_spent  # type: ignore[arg-type]

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
        # Keyed by the slice itself, before it goes to the device. Hashing costs about 1 ms
        # per 512 x 512 slice, so it is skipped when there is nothing to find or to keep.
        keys: list[tuple] | None = None
        if fill_cache or len(self.encoder_cache):
            place = (self._weights_key, str(self.device), box)
            keys = [(*place, blake2b(row.numpy(), digest_size=16).digest()) for row in host]
        pixels = self.staging.send(host, slot)
        inputs = box.to_model(pixels)
        with torch.autocast(self.device.type, self.autocast, enabled=self.autocast is not None):
            encoded, hits, first_layer_spent = self._encode(
                inputs, keys, fill_cache, result.gates[0]
            )
            keep_inputs = any(i in watched for i in batch)
            out = self.model.decode(
                encoded, result.token_threshold, result.gates, keep_inputs=keep_inputs
            )
        logits = box.to_image(out.logits.float())
        per_layer = torch.stack([t.kept_dependency_fraction for t in out.layers])  # (L, B, H, N)

        def to_host(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.to("cpu", non_blocking=self.staging.pinned)

        launched = _Launched(
            batch=batch,
            hits=hits,
            first_layer_spent=first_layer_spent,
            first_layer_reused=out.first_layer_reused,
            labels=to_host(logits.argmax(dim=1).to(torch.uint8)),
            probabilities=(
                to_host(torch.softmax(logits, dim=1)) if result.probabilities is not None else None
            ),
            keep=to_host(out.keep),
            background=to_host(torch.softmax(out.token_logits.float(), dim=1)[:, BACKGROUND]),
            dependency_map=to_host(per_layer.float().mean(dim=(0, 2))),
            kept_dependencies=to_host(out.kept_dependencies),
            depth=per_layer.shape[0],
            heads=per_layer.shape[2],
            layer_inputs={
                index: [to_host(t.layer_input[j].float()) for t in out.layers]
                for j, index in enumerate(batch)
                if index in watched
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
        stats.flops += launched.first_layer_spent
        depth, heads = launched.depth, launched.heads
        for j, index in enumerate(launched.batch):
            k = position[index]
            labels[index if image.is_volume else 0] = launched.labels[j].numpy()
            if probs_out is not None:
                probs_out[:, index if image.is_volume else 0] = launched.probabilities[j].numpy()
            result.keep[k] = launched.keep[j].view(TOKEN_GRID, TOKEN_GRID).numpy()
            result.background_probability[k] = launched.background[j].numpy()
            result.kept_dependency_fraction[k] = (
                launched.dependency_map[j].view(TOKEN_GRID, TOKEN_GRID).numpy()
            )
            kept = int(launched.keep[j].sum())
            stats.slices += 1
            stats.kept_tokens += kept
            stats.kept_dependencies += int(launched.kept_dependencies[j])
            stats.possible_dependencies += depth * heads * kept * TOKENS
            stats.flops += decoder_flops(self.model, kept, launched.first_layer_reused)
            stats.flops += 0 if launched.hits[j] else self._encoder_flops
            stats.flops_unpruned += self._unpruned_flops
            stats.encoder_cache_hits += int(launched.hits[j])
        result.layer_inputs.update(launched.layer_inputs)

    def attention(
        self, result: SegmentationResult, slice_index: int, token: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """(layers, heads, 32, 32) attention of query `token` after and before dependency
        pruning, for a slice run with attention_slices; zeros if the token was pruned there."""
        inputs = result.layer_inputs.get(slice_index)
        if inputs is None:
            raise ValueError(f"slice {slice_index} was not run with attention_slices")
        grid = (len(inputs), -1, TOKEN_GRID, TOKEN_GRID)
        k = result.slices.index(slice_index)
        if not result.keep[k].ravel()[token]:
            heads = self.model.trans4.attention_layers[0].heads
            empty = np.zeros((len(inputs), heads, TOKEN_GRID, TOKEN_GRID), np.float32)
            return empty, empty.copy()
        with torch.inference_mode():
            layer_inputs = [x[None].to(self.device) for x in inputs]
            records = self.model.attention_rows(layer_inputs, [token], result.gates)
        after = torch.stack([r.attention[0, :, 0] for r in records]).float().cpu().numpy()
        before = torch.stack([r.attention_before[0, :, 0] for r in records]).float().cpu()
        return after.reshape(grid), before.numpy().reshape(grid)


@dataclass
class _Launched:
    """A batch whose work is queued on the device; its tensors here are on the host."""

    batch: list[int]
    hits: list[bool]
    first_layer_spent: int
    first_layer_reused: bool
    labels: torch.Tensor  # (B, H, W) uint8
    probabilities: torch.Tensor | None  # (B, K, H, W)
    keep: torch.Tensor  # (B, N) bool
    background: torch.Tensor  # (B, 32, 32)
    dependency_map: torch.Tensor  # (B, N)
    kept_dependencies: torch.Tensor  # (B,)
    depth: int
    heads: int
    layer_inputs: dict[int, list[torch.Tensor]]
    ready: torch.cuda.Event | None = None


def _chunks(items: Sequence[int], size: int) -> list[list[int]]:
    return [list(items[k : k + size]) for k in range(0, len(items), size)]


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
