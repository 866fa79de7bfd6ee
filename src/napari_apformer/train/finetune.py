"""Fine-tuning loaded weights on a few corrected slices of one scan (no Qt, no napari).

The same code serves `apformer finetune` and the widget. Only the listed slices of the label
volume are trusted; the rest is ignored. Slices are prepared exactly as inference prepares
them (`engine.preprocess.prepare_image` with the card's normalisation and the model's input
rule), so training sees what the model sees at inference, and the training augmentation
(`train.augment.Augmentation`) is applied to each batch. With at least 3 corrected slices one
is held out (not trained on) and segmented before and after, for a Dice on the image's own
grid. The base model is never changed: a copy is trained.

BatchNorm running statistics are kept from the base weights (those layers stay in eval mode):
a few batches of augmented slices of one scan would estimate them poorly.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from napari_apformer.engine.preprocess import PreparedImage, prepare_image
from napari_apformer.errors import InputError
from napari_apformer.model.base import SegmentationModel, Trainable
from napari_apformer.model.card import ModelCard
from napari_apformer.train.augment import Augmentation
from napari_apformer.train.datasets import letterbox_mask

AXIS_NAMES = {0: "sagittal", 1: "coronal", 2: "axial"}  # RAS axes of NIfTI volumes
MIN_HELD_OUT = 3  # corrected slices needed before one is held out for the Dice
BATCH_NORM_NOTE = "kept from the base weights (BatchNorm layers frozen during fine-tuning)"

Progress = Callable[[int, float], None]  # (steps done, loss of the last step)


class FinetuneCancelled(Exception):
    """The cancel callable said stop: no result, the base model is unchanged."""


@dataclass(frozen=True)
class FinetuneOptions:
    steps: int = 60
    batch_size: int = 4
    learning_rate: float = 5e-5
    weight_decay: float = 1e-5
    max_minutes: float | None = None  # stop early (and keep the result) after this long
    ssa_every: int = 6  # APFormer: the SSA loss term every n-th step (other families ignore it)
    seed: int = 0
    device: str | torch.device = "cpu"
    hold_out: bool = True  # hold one slice out for the Dice when there are MIN_HELD_OUT
    augmentation: Augmentation = field(default_factory=Augmentation)

    def check(self) -> None:
        """InputError in one line for a number fine-tuning cannot use."""
        if self.steps < 1 or self.batch_size < 1 or self.ssa_every < 1:
            raise InputError("steps, batch size and --ssa-every must be at least 1")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise InputError(f"the learning rate must be above 0, not {self.learning_rate}")
        if self.max_minutes is not None and not (
            math.isfinite(self.max_minutes) and self.max_minutes > 0
        ):
            raise InputError(f"the time limit must be above 0 minutes, not {self.max_minutes}")


@dataclass
class SliceDice:
    """Dice per foreground class on one slice (classes in its truth or in either model's
    prediction; a class in neither is left out) and their mean."""

    per_class: dict[str, float]
    mean: float


@dataclass
class FinetuneReport:
    axis: int
    trained_slices: list[int]
    held_out_slice: int | None
    steps: int  # steps run
    steps_planned: int
    seconds: float  # wall time of the whole call
    stopped_by_time_limit: bool
    final_loss: float | None
    device: str
    dice_before: SliceDice | None = None  # on the held-out slice, base weights
    dice_after: SliceDice | None = None  # on the held-out slice, fine-tuned weights

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """One line for a log or the widget's read-out."""
        text = f"{self.steps} steps in {self.seconds:.0f} s"
        if self.stopped_by_time_limit:
            text += " (time limit)"
        if self.dice_before is not None and self.dice_after is not None:
            text += (
                f"; held-out slice {self.held_out_slice}: mean Dice "
                f"{self.dice_before.mean:.3f} -> {self.dice_after.mean:.3f}"
            )
        return text


@dataclass
class FinetuneResult:
    model: SegmentationModel  # the fine-tuned copy, on the CPU, in eval mode, card set
    report: FinetuneReport


def check_corrections(
    labels: np.ndarray,
    spatial_shape: tuple[int, ...],
    axis: int,
    slices: Sequence[int],
    card: ModelCard,
    label_source: object = None,
) -> tuple[list[int], list[np.ndarray]]:
    """The trusted slices (sorted, without repeats) and their labels as int64 (H, W) arrays.
    InputError naming `label_source` for: a shape other than the image's, no slice, a slice
    outside the volume, values that are not whole numbers or not classes of the weights, and
    fewer than 2 classes over the corrected slices."""
    if tuple(labels.shape) != tuple(spatial_shape):
        raise InputError(
            f"labels of shape {tuple(labels.shape)} do not match the image's "
            f"{tuple(spatial_shape)}",
            label_source,
        )
    volume = len(spatial_shape) == 3
    if volume and not 0 <= axis < 3:
        raise InputError(f"the slice axis must be 0, 1 or 2, not {axis}", label_source)
    count = spatial_shape[axis] if volume else 1
    chosen = sorted({int(i) for i in slices})
    if not chosen:
        raise InputError(
            "no corrected slice given: list the slices whose labels you corrected", label_source
        )
    outside = [i for i in chosen if not 0 <= i < count]
    if outside:
        where = f"along {_axis_text(axis)}" if volume else "(a 2D image has slice 0 only)"
        raise InputError(
            f"slice(s) {', '.join(map(str, outside[:5]))} outside the volume: it has slices "
            f"0..{count - 1} {where}",
            label_source,
        )
    parts = [np.asarray(np.take(labels, i, axis=axis) if volume else labels) for i in chosen]
    values: set[int] = set()
    for index, part in zip(chosen, parts, strict=True):
        if part.dtype.kind == "f" and not np.array_equal(part, np.round(part)):
            raise InputError(
                f"slice {index} holds values that are not whole numbers (class labels)",
                label_source,
            )
        if part.dtype.kind not in "biuf":
            raise InputError(f"unsupported label type {part.dtype}", label_source)
        values.update(int(v) for v in np.unique(part))
    unknown = sorted(v for v in values if not 0 <= v < card.n_classes)
    if unknown:
        raise InputError(
            f"the corrected slices hold label(s) {', '.join(map(str, unknown[:10]))}, which the "
            f"weights do not have (classes 0..{card.n_classes - 1}: "
            f"{', '.join(card.class_names)})",
            label_source,
        )
    if len(values) < 2:
        only = ", ".join(f"{v} ({card.class_names[v]})" for v in sorted(values))
        raise InputError(
            f"the corrected slices hold only class {only}: label at least 2 classes "
            "(for example background and one structure) on the listed slices",
            label_source,
        )
    return chosen, [p.astype(np.int64) for p in parts]


def finetune(
    model: SegmentationModel,
    image: np.ndarray,
    labels: np.ndarray,
    axis: int,
    slices: Sequence[int],
    *,
    spacing: tuple[float, ...] | None = None,
    rgb: bool = False,
    options: FinetuneOptions | None = None,
    progress: Progress | None = None,
    cancel: Callable[[], bool] | None = None,
    image_source: object = None,
    label_source: object = None,
) -> FinetuneResult:
    """Fine-tune a copy of `model` (with its card) on slices `slices` across `axis` of
    `image` ((Y, X[, C]) or (Z, Y, X[, C]), as io reads it; `spacing` per spatial axis), whose
    corrected labels are those slices of `labels` (the image's spatial shape; other slices are
    ignored). `progress(step, loss)` is called after each step; `cancel()` is checked before
    each step and raises FinetuneCancelled when true. The result's model carries a card made
    by `finetuned_card` (name: the base's + "-finetuned"). InputError for bad input, before
    any training."""
    started = time.perf_counter()
    options = options or FinetuneOptions()
    options.check()
    card = model.card
    if card is None:
        raise InputError("the model has no card (load it with load_model)")
    if not isinstance(model, Trainable):
        raise InputError(f"the {model.family} family declares no training losses to fine-tune")
    prepared = prepare_image(
        image,
        in_channels=model.in_channels,
        normalisation=card.normalisation,
        rule=model.input_rule,
        rgb=rgb,
        axis=axis,
        spacing=spacing,
        source=image_source,
    )
    chosen, truths = check_corrections(
        labels, prepared.spatial_shape, axis, slices, card, label_source
    )
    held = _held_out(chosen, truths) if options.hold_out else None
    trained = [i for i in chosen if i != held]
    images = torch.stack([model_input(prepared, i) for i in trained])
    masks = torch.stack(
        [
            letterbox_mask(t, prepared.letterbox)
            for i, t in zip(chosen, truths, strict=True)
            if i != held
        ]
    )
    device = _device(options.device)
    _stop_if(cancel)
    truth_held = truths[chosen.index(held)] if held is not None else None
    base_device = next(model.parameters()).device  # the base model is not moved
    before = segment_slice(model, prepared, held, base_device) if held is not None else None
    tuned = copy.deepcopy(model).to(device)
    with torch.random.fork_rng(devices=[]):  # the caller's random state stays as it was
        torch.manual_seed(options.seed)
        steps, loss, timed_out = _train(
            tuned, images, masks, options, device, started, progress, cancel
        )
    tuned.eval()
    after = segment_slice(tuned, prepared, held, device) if held is not None else None
    dice_before = dice_after = None
    if truth_held is not None and before is not None and after is not None:
        dice_before, dice_after = compare(truth_held, before, after, card)
    report = FinetuneReport(
        axis=axis,
        trained_slices=trained,
        held_out_slice=held,
        steps=steps,
        steps_planned=options.steps,
        seconds=round(time.perf_counter() - started, 2),
        stopped_by_time_limit=timed_out,
        final_loss=loss,
        device=str(device),
        dice_before=dice_before,
        dice_after=dice_after,
    )
    tuned = tuned.cpu().eval()
    tuned.card = finetuned_card(card, report, options, name=f"{card.name}-finetuned")
    return FinetuneResult(tuned, report)


def model_input(prepared: PreparedImage, index: int) -> torch.Tensor:
    """Slice `index` as the engine feeds it: (C, model height, model width) in [0, 1]."""
    pixels = torch.from_numpy(prepared.slice_input(index))[None]
    return prepared.letterbox.to_model(pixels)[0]


@torch.inference_mode()
def segment_slice(
    model: SegmentationModel, prepared: PreparedImage, index: int, device: torch.device
) -> np.ndarray:
    """Labels of one slice on the image's grid, at the model's own settings (as the engine
    gives them: logits back through the letterbox, then argmax); `device`: where the model is."""
    was_training = model.training
    model.eval()
    try:
        x = model_input(prepared, index)[None].to(device)
        logits = model.predict(x, **model.resolve_settings()).logits
        labels = prepared.letterbox.to_image(logits.float().cpu()).argmax(dim=1)[0]
    finally:
        model.train(was_training)
    return labels.numpy()


def compare(
    truth: np.ndarray, before: np.ndarray, after: np.ndarray, card: ModelCard
) -> tuple[SliceDice, SliceDice]:
    """Dice of two predictions against one truth over the same foreground classes: those
    present in the truth or in either prediction."""
    present = set(np.unique(truth)) | set(np.unique(before)) | set(np.unique(after))
    classes = sorted(int(c) for c in present if c != 0)
    result = []
    for predicted in (before, after):
        per_class = {}
        for c in classes:
            a, b = predicted == c, truth == c
            total = int(a.sum()) + int(b.sum())
            per_class[card.class_names[c]] = 2 * int((a & b).sum()) / total if total else 1.0
        mean = sum(per_class.values()) / len(per_class) if per_class else 1.0
        result.append(SliceDice(per_class, mean))
    return result[0], result[1]


def finetuned_card(
    base: ModelCard,
    report: FinetuneReport,
    options: FinetuneOptions,
    *,
    name: str,
    axis_name: str | None = None,
    base_weights: str | None = None,
    base_sha256: str | None = None,
    image_name: str | None = None,
    image_sha256: str | None = None,
    labels_name: str | None = None,
    labels_sha256: str | None = None,
    command: str | None = None,
    extra: dict[str, Any] | None = None,
) -> ModelCard:
    """The card of fine-tuned weights: the base's classes, normalisation, settings and
    licence; `training.finetune` records the base weights and their SHA-256, the image (and
    labels) and their SHA-256, the axis and slices, steps, options and wall time; `metrics`
    the held-out slice's Dice before and after. The base's validation metrics are not carried
    over (they were measured on other weights)."""
    axis_text = axis_name or f"axis {report.axis}"
    record: dict[str, Any] = {
        "base_weights": base_weights or base.name,
        "base_sha256": base_sha256 or base.sha256,
        "image": image_name,
        "image_sha256": image_sha256,
        "labels": labels_name,
        "labels_sha256": labels_sha256,
        "axis": report.axis,
        "axis_name": axis_text,
        "slices": report.trained_slices,
        "held_out_slice": report.held_out_slice,
        "steps": report.steps,
        "steps_planned": report.steps_planned,
        "batch_size": options.batch_size,
        "learning_rate": options.learning_rate,
        "weight_decay": options.weight_decay,
        "ssa_every": options.ssa_every,
        "seed": options.seed,
        "max_minutes": options.max_minutes,
        "stopped_by_time_limit": report.stopped_by_time_limit,
        "final_loss": report.final_loss,
        "seconds": report.seconds,
        "device": report.device,
        "batch_norm_statistics": BATCH_NORM_NOTE,
        **(extra or {}),
    }
    metrics: dict[str, Any] = {}
    if report.dice_before is not None and report.dice_after is not None:
        metrics = {
            "held_out_slice": report.held_out_slice,
            "held_out_dice_before": report.dice_before.per_class,
            "held_out_dice_after": report.dice_after.per_class,
            "held_out_mean_foreground_dice_before": report.dice_before.mean,
            "held_out_mean_foreground_dice_after": report.dice_after.mean,
            "measured_with": "napari_apformer.train.finetune.compare (one corrected slice not "
            "trained on, on the image's grid, at the weights' own settings)",
        }
    source = image_name or "an image"
    description = (
        f"{base.description} Fine-tuned from {record['base_weights']} on "
        f"{len(report.trained_slices)} corrected {axis_text} slice(s) of {source}."
    ).strip()
    training: dict[str, Any] = {"finetune": record, "wall_seconds": report.seconds}
    if command is not None:
        training["command"] = command
    return ModelCard(
        name=name,
        in_channels=base.in_channels,
        classes=copy.deepcopy(base.classes),
        normalisation=copy.deepcopy(base.normalisation),
        architecture=dict(base.architecture),
        settings=copy.deepcopy(base.settings),
        placeholder=base.placeholder,
        description=description,
        training=training,
        metrics=metrics,
        licence=base.licence,
        made_for=copy.deepcopy(base.made_for),
        limits=list(base.limits),
    )


def _train(
    model: SegmentationModel,
    images: torch.Tensor,
    masks: torch.Tensor,
    options: FinetuneOptions,
    device: torch.device,
    started: float,
    progress: Progress | None,
    cancel: Callable[[], bool] | None,
) -> tuple[int, float | None, bool]:
    """(steps run, last loss, stopped by the time limit)."""
    from napari_apformer.train.loop import _warmup_cosine as warmup_cosine

    model.train()
    for module in model.modules():  # running statistics stay the base weights'
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
    loss_options = {**model.defaults(), "ssa_every": options.ssa_every}
    groups = model.parameter_groups(options.learning_rate)  # type: ignore[attr-defined]
    optimizer = torch.optim.AdamW(
        groups, lr=options.learning_rate, weight_decay=options.weight_decay
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(options.steps))
    cuda = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=cuda)
    generator = torch.Generator().manual_seed(options.seed)
    order = torch.randperm(len(images), generator=generator)
    position, loss, step = 0, None, 0
    for step in range(options.steps):
        _stop_if(cancel)
        index = order[torch.arange(position, position + options.batch_size) % len(images)]
        position += options.batch_size
        if position >= len(images):
            order = torch.randperm(len(images), generator=generator)
            position = 0
        x, target = options.augmentation(images[index], masks[index], generator)
        with torch.autocast(device.type, enabled=cuda):
            total = model.training_losses(  # type: ignore[attr-defined]
                x.to(device), target.to(device), step, **loss_options
            )["total"]
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(total).backward()
        scaler.step(optimizer)
        scaler.update()
        schedule.step()
        loss = float(total.detach())
        if not math.isfinite(loss):
            raise InputError(
                f"the loss became {loss} at step {step + 1}; try a lower learning rate"
            )
        if progress is not None:
            progress(step + 1, loss)
        limit = options.max_minutes
        if limit is not None and time.perf_counter() - started > 60 * limit:
            return step + 1, loss, step + 1 < options.steps
    return options.steps, loss, False


def _held_out(chosen: list[int], truths: list[np.ndarray]) -> int | None:
    """The slice to hold out (with MIN_HELD_OUT or more): the middle one among those with
    foreground, such that the others still hold 2 classes or more."""
    if len(chosen) < MIN_HELD_OUT:
        return None
    with_foreground = [k for k, t in enumerate(truths) if t.any()]
    middle = len(with_foreground) // 2
    for k in sorted(with_foreground, key=lambda k: abs(with_foreground.index(k) - middle)):
        rest = set()
        for j, t in enumerate(truths):
            if j != k:
                rest.update(np.unique(t).tolist())
        if len(rest) >= 2:
            return chosen[k]
    return None


def _stop_if(cancel: Callable[[], bool] | None) -> None:
    if cancel is not None and cancel():
        raise FinetuneCancelled("fine-tuning cancelled")


def _device(name: str | torch.device) -> torch.device:
    from napari_apformer.engine.device import resolve_device

    return resolve_device(name)


def _axis_text(axis: int) -> str:
    return f"axis {axis} ({AXIS_NAMES[axis]} for NIfTI)" if axis in AXIS_NAMES else f"axis {axis}"
