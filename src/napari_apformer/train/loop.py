"""The training loop: augmentation, the model's own losses, validation Dice, the best weights.

The loop knows the family interface only: the model is built from the card's architecture
(family, variant, sizes; default family DEFAULT_FAMILY) or loaded from `init`, and asked for
its losses (`Trainable.training_losses`) and parameter groups; validation runs at the
weights' own settings and at the settings under which nothing is skipped.

One process trains on the CPU or one GPU (mixed precision on CUDA). Launched by torchrun
(WORLD_SIZE > 1) it runs DistributedDataParallel, each process on its share of every epoch;
rank 0 validates and writes the files. Files beside `out` (a path without suffix):
`out.safetensors` + `out.json` (best weights and card), `out.train-log.csv`,
`out.train-curves.png`, `out.train-state.pt` (to resume).
"""

from __future__ import annotations

import copy
import csv
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from napari_apformer.engine.device import resolve_device
from napari_apformer.errors import InputError, first_line
from napari_apformer.io.files import write_atomically
from napari_apformer.model.base import SegmentationModel, SettingValue, Trainable, build_model
from napari_apformer.model.card import ModelCard
from napari_apformer.model.checkpoint import save_weights
from napari_apformer.train.augment import Augmentation
from napari_apformer.train.datasets import SliceSet

RANKING_SLICES = 64  # clean training slices that set BatchNorm statistics before each validation
DEFAULT_FAMILY = "apformer"  # what a card without an architecture trains


@dataclass
class TrainConfig:
    out: Path
    card: ModelCard
    epochs: int = 10
    batch_size: int = 4
    learning_rate: float = 1e-3
    weight_decay: float = 1e-5
    seed: int = 0
    # Loss options (the model's training_losses takes those it knows; APFormer: both)
    ssa_every: int = 1  # compute the SSA term every n-th step (1: every step, as the spec)
    steps_per_epoch: int | None = None  # default: one pass over the training slices
    max_minutes: float | None = None  # stop (validate, save) when this much time has passed
    device: str = "auto"
    learnable_gates: bool = False  # a model with set_learnable_gates only (APFormer)
    ema: float = 0.0  # decay of an exponential moving average of the weights (0: off)
    gate_sparsity: float = 0.05  # weight of the kept-dependency term with learnable gates
    gate_learning_rate: float = 0.02
    resume: Path | None = None
    init: Path | None = None  # start from these weights (fine-tuning)
    augmentation: Augmentation = field(default_factory=Augmentation)
    progress: bool = True


@dataclass
class Validation:
    dice: list[float]  # per class at the weights' own settings (background first)
    dice_unpruned: list[float]  # at the settings under which nothing is skipped
    counters: dict[str, float]  # the model's counters at its own settings, as fractions
    labels: dict[str, str] = field(default_factory=dict)  # counter name -> label

    @property
    def mean_foreground(self) -> float:
        return sum(self.dice[1:]) / max(1, len(self.dice) - 1)

    def counters_text(self) -> str:
        return ", ".join(
            f"{self.labels.get(name, name)} {100 * value:.0f} %"
            for name, value in self.counters.items()
        )


@dataclass
class TrainSummary:
    best: Validation | None
    epochs: int
    steps: int
    seconds: float
    stopped_early: bool


class Distributed:
    """torchrun's environment: rank, world size and the device of this process."""

    def __init__(self, device: str) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if self.world > 1 and device in ("auto", "cuda") and torch.cuda.is_available():
            device = f"cuda:{local}"
        self.device = resolve_device(device)
        if self.world > 1 and not torch.distributed.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            torch.distributed.init_process_group(backend)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


def check_data(train_set: SliceSet, val_set: SliceSet, n_classes: int) -> None:
    if len(train_set) == 0:
        raise InputError("the training set is empty (no slice with enough foreground)")
    if len(val_set) == 0:
        raise InputError("the validation set is empty")
    for name, data in (("training", train_set), ("validation", val_set)):
        top = int(data.masks.max())
        if top >= n_classes:
            raise InputError(
                f"{name} masks hold label {top}; the card declares {n_classes} classes"
            )


def build_training_model(card: ModelCard, init: Path | None = None) -> SegmentationModel:
    """The network to train: the card's architecture (default: DEFAULT_FAMILY's first
    variant), or the weights `init` with their own architecture and settings (in the card's
    family if that one extends theirs: checkpoint.grow_model). The card's
    settings override the model's defaults; afterwards the card records the architecture and
    every setting. InputError if the family cannot be trained or `init` does not fit."""
    wanted = card.architecture.get("family")
    if init is not None:
        from napari_apformer.model.checkpoint import grow_model, load_model

        model = load_model(init)
        if wanted and wanted != model.family:
            model = grow_model(model, wanted, init)
        if (model.in_channels, model.n_classes) != (card.in_channels, card.n_classes):
            raise InputError(
                f"the weights take {model.in_channels} channel(s) and {model.n_classes} "
                f"classes; the data has {card.in_channels} and {card.n_classes}",
                init,
            )
        model.card = None
    else:
        model = build_model(
            wanted or DEFAULT_FAMILY,
            card.in_channels,
            card.n_classes,
            card.architecture.get("variant"),
            card.architecture.get("sizes"),
        )
    if not isinstance(model, Trainable):
        raise InputError(f"the {model.family} family declares no training losses")
    model.set_defaults(model.resolve_settings(card.settings))
    card.architecture = model.architecture()
    card.settings = model.defaults()
    return model


class TrainingStep(nn.Module):
    """The model's training losses as a module's forward pass, so that DistributedDataParallel
    sees the computation (it synchronises gradients of what runs through its forward)."""

    def __init__(self, model: SegmentationModel, options: dict) -> None:
        super().__init__()
        self.model, self.options = model, options

    def forward(self, x: torch.Tensor, target: torch.Tensor, step: int) -> dict:
        return self.model.training_losses(x, target, step, **self.options)  # type: ignore[attr-defined]


def train(train_set: SliceSet, val_set: SliceSet, config: TrainConfig) -> TrainSummary:
    card = config.card
    if config.steps_per_epoch is not None and config.steps_per_epoch < 1:
        raise InputError(f"steps per epoch must be at least 1, not {config.steps_per_epoch}")
    if not (math.isfinite(config.learning_rate) and config.learning_rate > 0):
        raise InputError(f"the learning rate must be above 0, not {config.learning_rate}")
    state_for_resume = read_state(config.resume) if config.resume is not None else None
    check_data(train_set, val_set, card.n_classes)
    dist = Distributed(config.device)
    torch.manual_seed(config.seed)
    recorded = (state_for_resume or {}).get("architecture")
    if recorded and config.init is None and "sizes" not in card.architecture:
        card.architecture = {**recorded, **card.architecture}  # resume the run's own sizes
    model = build_training_model(card, config.init)
    set_learnable = getattr(model, "set_learnable_gates", None)
    if config.learnable_gates:
        if set_learnable is None:
            raise InputError(f"--learnable-gates: the {model.family} family has no gates to learn")
        set_learnable(True)
    model.to(dist.device).train()
    options = {
        **model.defaults(),
        "ssa_every": config.ssa_every,
        "gate_sparsity": config.gate_sparsity,
    }
    wrapped: nn.Module = TrainingStep(model, options)
    if dist.world > 1:
        if dist.device.type == "cuda":
            wrapped = nn.SyncBatchNorm.convert_sync_batchnorm(wrapped)
        wrapped = nn.parallel.DistributedDataParallel(
            wrapped,
            device_ids=[dist.device.index] if dist.device.type == "cuda" else None,
            find_unused_parameters=True,
        )
    groups = model.parameter_groups(  # type: ignore[attr-defined]
        config.learning_rate, gate_learning_rate=config.gate_learning_rate
    )
    optimizer = torch.optim.AdamW(groups, lr=config.learning_rate, weight_decay=config.weight_decay)
    average = WeightAverage(model, config.ema) if config.ema > 0 else None
    per_epoch = config.steps_per_epoch or max(1, len(train_set) // (config.batch_size * dist.world))
    total_steps = per_epoch * config.epochs
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(total_steps))
    scaler = torch.amp.GradScaler("cuda", enabled=dist.device.type == "cuda")
    generator = torch.Generator().manual_seed(config.seed + dist.rank)
    log_path = config.out.with_suffix(".train-log.csv")
    state_path = config.out.with_suffix(".train-state.pt")
    start_epoch, step, best_score = 0, 0, -1.0
    best: Validation | None = None  # the best of this run
    best_model: SegmentationModel | None = None
    best_at = (0, 0)
    if state_for_resume is not None:
        start_epoch, step, best_score = _resume(
            config.resume, state_for_resume, model, optimizer, schedule, generator, average
        )
    started = time.perf_counter()
    stopped = False
    epoch = start_epoch
    for epoch in range(start_epoch, config.epochs):
        order = torch.randperm(len(train_set), generator=generator)
        bar = _progress(
            per_epoch, f"epoch {epoch + 1}/{config.epochs}", config.progress and dist.main
        )
        sums: dict[str, float] = {}
        for k in range(per_epoch):
            lo = (k * dist.world + dist.rank) * config.batch_size % len(train_set)
            index = order[torch.arange(lo, lo + config.batch_size) % len(train_set)]
            images, masks = config.augmentation(
                train_set.images[index], train_set.masks[index], generator
            )
            images, masks = images.to(dist.device), masks.to(dist.device)
            with torch.autocast(dist.device.type, enabled=dist.device.type == "cuda"):
                losses = wrapped(images, masks, step)
                total = losses["total"]
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(total).backward()
            scaler.step(optimizer)
            scaler.update()
            schedule.step()
            if average is not None:
                average.update(model, step)
            step += 1
            for key, value in losses.items():
                sums[key] = sums.get(key, 0.0) + float(value.detach())
            if bar is not None:
                bar.set_postfix(loss=f"{float(total.detach()):.3f}")
                bar.update(1)
            if config.max_minutes and time.perf_counter() - started > 60 * config.max_minutes:
                stopped = True
                break
        if bar is not None:
            bar.close()
        done_steps = k + 1
        if dist.main:
            evaluated = average.model if average is not None else model
            recalibrate_batch_norm(evaluated, train_set, evaluated.defaults(), dist.device)
            validation = evaluate(evaluated, val_set, evaluated.defaults(), dist.device)
            model.train()
            improved = validation.mean_foreground > best_score
            if improved:
                best, best_score = validation, validation.mean_foreground
                best_model, best_at = copy.deepcopy(evaluated), (epoch + 1, step)
                _save_best(evaluated, config, validation, epoch + 1, step, started)
            _log(
                log_path,
                epoch + 1,
                step,
                time.perf_counter() - started,
                sums,
                done_steps,
                validation,
                card,
            )
            plot_curves(log_path, config.out.with_suffix(".train-curves.png"))
            _save_state(
                state_path,
                model,
                optimizer,
                schedule,
                generator,
                epoch + 1,
                step,
                best_score,
                average,
            )
            if config.progress:
                print(
                    f"epoch {epoch + 1}: val Dice "
                    + ", ".join(
                        f"{c.name} {d:.3f}"
                        for c, d in zip(card.classes[1:], validation.dice[1:], strict=True)
                    )
                    + (f"; {validation.counters_text()}" if validation.counters else "")
                    + (" (best)" if improved else ""),
                    flush=True,
                )
        dist.barrier()
        if stopped:
            break
    if dist.main and best_model is not None:
        best = _final_batch_norm(best_model, train_set, val_set, config, best_at, started)
    return TrainSummary(best, epoch + 1, step, time.perf_counter() - started, stopped)


class WeightAverage:
    """An exponential moving average of the weights, validated and saved instead of the raw
    weights: it smooths the step-to-step noise of small augmented batches. Buffers are not
    averaged (BatchNorm statistics are re-estimated before each validation)."""

    def __init__(self, model: SegmentationModel, decay: float) -> None:
        self.decay = decay
        self.model = copy.deepcopy(model).requires_grad_(False)

    @torch.no_grad()
    def update(self, model: SegmentationModel, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))  # short memory at the start
        averaged, current = list(self.model.parameters()), list(model.parameters())
        torch._foreach_lerp_(averaged, current, 1 - decay)


def recalibrate_batch_norm(
    model: SegmentationModel,
    data: SliceSet,
    settings: dict[str, SettingValue],
    device: torch.device,
    count: int | None = RANKING_SLICES,
    batch: int = 8,
) -> None:
    """Set the BatchNorm running statistics from clean (unaugmented) training slices: the same
    `count` slices each epoch (None: all of them, done once for the final weights).

    Training sees augmented intensities, so the running averages it leaves behind do not
    match real images: on the MNI152 validation slices after two epochs, grey-matter Dice was
    0.49 with them and 0.85 after this. Validation and the saved weights use these instead;
    training itself uses batch statistics and is unaffected. The passes run at `settings`.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a plain average over the batches below
    model.train()
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:count]
    with torch.no_grad():
        for lo in range(0, len(order), batch):
            model.predict(data.images[order[lo : lo + batch]].to(device), **settings)
    for norm, momentum in zip(norms, momenta, strict=True):
        norm.momentum = momentum


def _final_batch_norm(
    model: SegmentationModel,
    train_set: SliceSet,
    val_set: SliceSet,
    config: TrainConfig,
    best_at: tuple[int, int],
    started: float,
) -> Validation:
    """The best weights with BatchNorm statistics from every clean training slice rather than
    the RANKING_SLICES that ranked the epochs (a better estimate), validated again and saved
    with that result whatever it is."""
    device = next(model.parameters()).device
    settings = model.defaults()
    recalibrate_batch_norm(model, train_set, settings, device, count=None)
    validation = evaluate(model, val_set, settings, device)
    note = f"re-estimated on all {len(train_set)} clean training slices after training"
    _save_best(model, config, validation, *best_at, started, batch_norm_note=note)
    return validation


def evaluate(
    model: SegmentationModel,
    val_set: SliceSet,
    settings: dict[str, SettingValue] | None,
    device: torch.device,
) -> Validation:
    """Per-class Dice over all validation slices (pixels pooled) at `settings` (None: the
    model's defaults) and at the settings under which nothing is skipped."""
    from napari_apformer.train.sweep import sweep

    settings = model.resolve_settings(settings)
    unpruned = {**settings, **model.unpruned_settings()}
    rows = sweep(model, val_set, [settings, unpruned], device=device)
    own, everything = rows[0], rows[-1]
    labels = {c.name: c.label for c in model.counter_specs()}
    return Validation(own.dice, everything.dice, own.counters, labels)


def _warmup_cosine(total: int):
    warmup = max(1, total // 20)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def _progress(total: int, description: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=description, unit="step", leave=False, disable=None)


def _save_best(
    model,
    config: TrainConfig,
    validation: Validation,
    epoch: int,
    step: int,
    started: float,
    batch_norm_note: str = f"re-estimated on {RANKING_SLICES} clean training slices",
) -> None:
    card = config.card
    names = [c.name for c in card.classes]
    card.metrics = {
        "validation_dice": dict(zip(names, validation.dice, strict=True)),
        "validation_dice_unpruned": dict(zip(names, validation.dice_unpruned, strict=True)),
        "validation_mean_foreground_dice": validation.mean_foreground,
        **{f"validation_{name}": value for name, value in validation.counters.items()},
        "epoch": epoch,
        "step": step,
        "training_seconds_so_far": round(time.perf_counter() - started, 1),
        "batch_norm_statistics": batch_norm_note,
    }
    card.placeholder = False
    save_weights(model, card, config.out.with_suffix(".safetensors"))  # records its settings


def _log(
    path: Path,
    epoch: int,
    step: int,
    seconds: float,
    sums: dict,
    steps: int,
    v: Validation,
    card: ModelCard,
) -> None:
    row = {
        "epoch": epoch,
        "step": step,
        "seconds": round(seconds, 1),
        **{f"loss_{k}": round(s / max(1, steps), 5) for k, s in sums.items()},
        **{f"dice_{c.name}": round(d, 5) for c, d in zip(card.classes, v.dice, strict=True)},
        "mean_foreground_dice": round(v.mean_foreground, 5),
        **{name: round(value, 5) for name, value in v.counters.items()},
    }
    new = not path.exists() or epoch == 1
    with path.open("w" if new else "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def plot_curves(log_path: Path, out: Path) -> None:
    """Loss and validation Dice per epoch, from the CSV log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with log_path.open() as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    epochs = [int(r["epoch"]) for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for key in [k for k in rows[0] if k.startswith("loss_")]:
        left.plot(epochs, [float(r[key]) for r in rows], marker="o", label=key[5:])
    left.set(xlabel="epoch", ylabel="training loss", title="losses")
    left.legend()
    for key in [k for k in rows[0] if k.startswith("dice_") and k != "dice_background"]:
        right.plot(epochs, [float(r[key]) for r in rows], marker="o", label=key[5:])
    right.set(xlabel="epoch", ylabel="validation Dice", title="validation", ylim=(0, 1))
    right.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def _save_state(
    path: Path,
    model,
    optimizer,
    schedule,
    generator,
    epoch: int,
    step: int,
    best_score: float,
    average: WeightAverage | None,
) -> None:
    state = {
        "architecture": model.architecture(),  # a run started from --init resumes without it
        "model": model.state_dict(),
        **({"average": average.model.state_dict()} if average is not None else {}),
        "optimizer": optimizer.state_dict(),
        "schedule": schedule.state_dict(),
        "generator": generator.get_state(),
        "epoch": epoch,
        "step": step,
        "best_score": best_score,
    }
    write_atomically(path, lambda tmp: torch.save(state, tmp))  # a name of this process's own


STATE_KEYS = ("model", "optimizer", "schedule", "generator", "epoch", "step", "best_score")
NOT_A_STATE = (
    "not a training state (the OUT.train-state.pt that apformer train writes); to start "
    "from weights, use --init"
)


def read_state(path: Path) -> dict:
    """The training state in `path`; InputError in one line for anything else (weights, a
    foreign or damaged file)."""
    if not path.is_file():
        raise InputError("training state not found", path)
    if path.suffix in (".safetensors", ".json"):
        raise InputError(f"{NOT_A_STATE} ({path.suffix} files hold weights or cards)", path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a bad or foreign file: say which and why
        raise InputError(f"{NOT_A_STATE} ({first_line(error, 120)})", path) from None
    if not isinstance(state, dict) or not all(key in state for key in STATE_KEYS):
        raise InputError(NOT_A_STATE, path)
    return state


def _resume(
    path: Path,
    state: dict,
    model,
    optimizer,
    schedule,
    generator,
    average: WeightAverage | None,
) -> tuple[int, int, float]:
    try:
        model.load_state_dict(state["model"])
        if average is not None:
            average.model.load_state_dict(state.get("average", state["model"]))
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        generator.set_state(state["generator"])
        return int(state["epoch"]), int(state["step"]), float(state["best_score"])
    except (RuntimeError, ValueError, KeyError, TypeError) as error:
        raise InputError(
            "this training state is of another model or run than the one being trained "
            f"({first_line(error, 160)})",
            path,
        ) from None
