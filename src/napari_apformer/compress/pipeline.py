"""From trained weights to a smaller network: search, select at a budget, extract (factors
folded in), re-estimate BatchNorm, validate, save with the card's provenance; optionally
fine-tune with the training loop."""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from napari_apformer.compress.budget import Budget, Selection, check_reachable, cost_of, select
from napari_apformer.compress.capability import joint_search
from napari_apformer.compress.search import (
    SearchConfig,
    SearchResult,
    factor_statistics,
    search,
    searched_dimensions,
)
from napari_apformer.engine.device import resolve_device
from napari_apformer.errors import InputError
from napari_apformer.hardware import describe
from napari_apformer.model.base import SegmentationModel
from napari_apformer.model.card import ModelCard
from napari_apformer.model.checkpoint import save_weights
from napari_apformer.train.datasets import SliceSet

METHOD = (
    "multi-dimensional joint search: learnable importance factors with L1 terms on several "
    "dimensions, trained with the weights in one run, one global threshold per dimension "
    "(Zheng et al., J. Imaging 2024, 10(9), 206, following ViT-Slim, Chavan et al., CVPR "
    "2022); the details are this project's (docs/compression.md)"
)
PIXEL_HEAD_DESIGN = (
    "ours, not the seed paper's (its design could not be read): on the last decoder feature "
    "map, Conv1x1 -> BatchNorm -> ReLU -> Conv1x1 to the classes, logits added to the "
    "existing head's, trained with the same losses in the search and fine-tuning"
)


@dataclass
class FinetuneConfig:
    """Fine-tuning of the extracted network with `train.loop.train` (0 steps: none)."""

    steps: int = 0
    steps_per_epoch: int = 40
    batch_size: int = 4
    learning_rate: float = 2e-4
    ssa_every: int = 6
    ema: float = 0.99
    max_minutes: float | None = None
    seed: int = 0


@dataclass
class CompressConfig:
    out: Path  # weights path without suffix
    search: SearchConfig
    budget: Budget = field(default_factory=Budget)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    evaluate_base: bool = True  # validate the base weights first (for the card's comparison)
    pixel_head: bool = False  # add our pixel classification module before the search
    base_name: str = ""  # how the base weights were named (shipped name or path)
    provenance: dict[str, Any] = field(default_factory=dict)  # command, data, ... for the card


@dataclass
class CompressSummary:
    search: SearchResult
    selection: Selection
    weights: Path  # the final weights (fine-tuned if asked)
    extracted: Path  # the extracted weights before fine-tuning (== weights without it)
    base_dice: float | None
    extracted_dice: float
    finetuned_dice: float | None
    seconds: float


def extract(model: SegmentationModel, selection: Selection) -> SegmentationModel:
    """The physically smaller network keeping what `selection` keeps, factors folded in."""
    slim = joint_search(model).slimmed(selection.keep)
    slim.card = None
    return slim


def add_pixel_head(model: SegmentationModel) -> bool:
    """Attach the family's pixel classification module (ours) unless the model has one;
    whether one was added. InputError for a family without it."""
    if getattr(model, "pixel_head", None) is not None:
        return False
    adder = getattr(model, "add_pixel_head", None)
    if adder is None:
        raise InputError(f"the {model.family} family has no pixel classification module")
    adder()
    return True


def pixel_head_record(model: SegmentationModel, added: bool) -> dict[str, Any] | bool:
    """The card's record of the pixel classification module: False without one."""
    head = getattr(model, "pixel_head", None)
    if head is None:
        return False
    return {
        "design": PIXEL_HEAD_DESIGN,
        "hidden_channels": model.sizes().get("pixel_head"),
        "parameters": sum(p.numel() for p in head.parameters()),
        "added_by_this_run": added,
        "initialisation": "default for the first convolution; the last one zero (weight and "
        "bias), so the search started from the base weights' output",
    }


def save_atomically(model: SegmentationModel, card: ModelCard, out: Path) -> None:
    """`out.safetensors` and `out.json` written beside them first, then renamed into place
    (weights first, card second): an interrupted run leaves the old pair or none."""
    out.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".part", dir=out.parent))
    try:
        save_weights(model, card, folder / out.name)
        os.replace(folder / f"{out.name}.safetensors", out.with_suffix(".safetensors"))
        os.replace(folder / f"{out.name}.json", out.with_suffix(".json"))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def compress(
    model: SegmentationModel, train_set: SliceSet, val_set: SliceSet, config: CompressConfig
) -> CompressSummary:
    """model: the base weights as `load_model` gives them (with their card). Writes
    `out.safetensors` + `out.json` (and, with fine-tuning, the extracted weights before it
    as `out-extracted`, plus the training loop's files)."""
    from napari_apformer.train.loop import check_data, evaluate, recalibrate_batch_norm

    started = time.perf_counter()
    base_card = model.card
    if base_card is None:
        raise InputError("the base weights have no model card")
    check_data(train_set, val_set, base_card.n_classes)
    channels = int(train_set.images.shape[1])
    if channels != model.in_channels:
        raise InputError(
            f"the weights take {model.in_channels} channel(s), the data has {channels}"
        )
    searched = searched_dimensions(model, config.search.lambdas)
    config.budget.check(list(joint_search(model).searchable_dimensions()))
    check_reachable(model, searched, config.budget)
    device = resolve_device(config.search.device)
    model.to(device)
    base_dice = None
    if config.evaluate_base:
        base_dice = evaluate(model, val_set, None, device).mean_foreground
        print(f"base weights: validation mean Dice {base_dice:.4f}", flush=True)
    base_cost = cost_of(model, joint_search(model).searchable_dimensions())
    head_added = config.pixel_head and add_pixel_head(model)
    result = search(model, train_set, config.search)
    selection = select(model, result.factors, config.budget, base_cost)
    print(
        f"searched {result.steps} steps in {result.seconds / 60:.1f} min"
        + (" (stopped by the time limit)" if result.stopped_early else "")
        + f"; kept {100 * selection.params_fraction:.1f} % of the parameters and "
        f"{100 * selection.flops_fraction:.1f} % of the unpruned FLOPs",
        flush=True,
    )
    slim = extract(model, selection)
    settings = slim.defaults()
    recalibrate_batch_norm(slim, train_set, settings, device, count=None)
    validation = evaluate(slim, val_set, settings, device)
    slim.eval()
    print(f"extracted: validation mean Dice {validation.mean_foreground:.4f}", flush=True)
    compression = {
        "method": METHOD,
        "base_weights": config.base_name or base_card.name,
        "base_sha256": base_card.sha256,
        "base_validation_mean_foreground_dice": base_dice,
        "dimensions": {
            name: {
                "searched": name in searched,
                "lambda": float(config.search.lambdas.get(name, 0.0)),
                "label": label.get("label", name),
            }
            for name, label in joint_search(model).search_defaults().items()
        },
        "budget": {**asdict(config.budget), "keep": dict(config.budget.keep)},
        "search": {
            "steps": config.search.steps,
            "steps_run": result.steps,
            "batch_size": config.search.batch_size,
            "learning_rate": config.search.learning_rate,
            "factor_lr_mult": config.search.factor_lr_mult,
            "weight_decay": config.search.weight_decay,
            "ssa_every": config.search.ssa_every,
            "seed": config.search.seed,
            "seconds": round(result.seconds, 1),
            "stopped_by_time_limit": result.stopped_early,
            "final_losses": result.losses,
            "factors": factor_statistics(result.factors),
        },
        **selection.summary(),
        "pixel_classification_module": pixel_head_record(slim, head_added),
        "finetune": None,
    }
    names = [c.name for c in base_card.classes]
    card = ModelCard(
        name=config.out.name,
        in_channels=base_card.in_channels,
        classes=base_card.classes,
        normalisation=base_card.normalisation,
        settings=dict(base_card.settings),
        placeholder=base_card.placeholder,
        made_for=dict(base_card.made_for),
        limits=list(base_card.limits),
        description=(
            f"{base_card.description} Compressed from {compression['base_weights']} with "
            f"`apformer compress` to {100 * selection.params_fraction:.1f} % of its parameters "
            f"and {100 * selection.flops_fraction:.1f} % of its unpruned FLOPs."
        ).strip(),
        training={
            **config.provenance,
            "hardware": describe(device),
            "torch": torch.__version__,
            "compression": compression,
        },
        metrics={
            "validation_dice": dict(zip(names, validation.dice, strict=True)),
            "validation_dice_unpruned": dict(zip(names, validation.dice_unpruned, strict=True)),
            "validation_mean_foreground_dice": validation.mean_foreground,
            **{f"validation_{k}": v for k, v in validation.counters.items()},
            "batch_norm_statistics": f"re-estimated on all {len(train_set)} clean training "
            "slices after extraction",
            "measured_with": "napari_apformer.train.loop.evaluate",
        },
        licence=base_card.licence,
    )
    finetuning = config.finetune.steps > 0
    extracted = config.out.with_name(config.out.name + "-extracted") if finetuning else config.out
    card.training["wall_seconds"] = round(time.perf_counter() - started, 1)
    save_atomically(slim, card, extracted)
    finetuned_dice = None
    if finetuning:
        finetuned_dice = finetune(extracted, train_set, val_set, config, card, device)
    seconds = time.perf_counter() - started
    _record(config.out, wall_seconds=round(seconds, 1))
    return CompressSummary(
        result,
        selection,
        config.out.with_suffix(".safetensors"),
        extracted.with_suffix(".safetensors"),
        base_dice,
        validation.mean_foreground,
        finetuned_dice,
        seconds,
    )


def finetune(
    extracted: Path,
    train_set: SliceSet,
    val_set: SliceSet,
    config: CompressConfig,
    card: ModelCard,
    device: torch.device,
) -> float | None:
    """Train the extracted weights with the training loop (its validation, best weights,
    BatchNorm re-estimation and files) into `config.out`; the mean Dice of the best epoch."""
    from napari_apformer.train.loop import TrainConfig, train

    tune = config.finetune
    epochs = max(1, math.ceil(tune.steps / tune.steps_per_epoch))
    card.name = config.out.name
    card.training["compression"]["finetune"] = {
        "steps": tune.steps,
        "epochs": epochs,
        "steps_per_epoch": tune.steps_per_epoch,
        "batch_size": tune.batch_size,
        "learning_rate": tune.learning_rate,
        "ssa_every": tune.ssa_every,
        "ema": tune.ema,
        "extracted_validation_mean_foreground_dice": card.metrics[
            "validation_mean_foreground_dice"
        ],
    }
    summary = train(
        train_set,
        val_set,
        TrainConfig(
            out=config.out,
            card=card,
            epochs=epochs,
            batch_size=tune.batch_size,
            learning_rate=tune.learning_rate,
            seed=tune.seed,
            ssa_every=tune.ssa_every,
            steps_per_epoch=tune.steps_per_epoch,
            max_minutes=tune.max_minutes,
            device=str(device),
            ema=tune.ema,
            init=extracted.with_suffix(".safetensors"),
            progress=config.search.progress,
        ),
    )
    _record(
        config.out,
        finetune_seconds=round(summary.seconds, 1),
        finetune_steps_run=summary.steps,
        finetune_stopped_by_time_limit=summary.stopped_early,
    )
    return None if summary.best is None else summary.best.mean_foreground


def _record(out: Path, **values: Any) -> None:
    """Add values to the compression section of the card at `out` (rewritten atomically;
    the weights and their SHA-256 are unchanged)."""
    path = out.with_suffix(".json")
    if not path.is_file():
        return
    card = ModelCard.read(path)
    card.training.setdefault("compression", {})
    for key, value in values.items():
        if key == "wall_seconds":
            card.training["wall_seconds"] = value
        else:
            finetune = card.training["compression"].get("finetune") or {}
            finetune[key] = value
            card.training["compression"]["finetune"] = finetune
    tmp = path.with_name(f".{path.name}.part")
    tmp.write_text(card.to_json(), encoding="utf-8")
    os.replace(tmp, path)
