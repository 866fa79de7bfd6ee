"""The search: one run that trains the weights together with the importance factors, with
an L1 term per dimension (loss = the family's training losses + sum over dimensions of
lambda_d * sum |z| over every factor of every layer; ViT-Slim's form, spec a.4 / b.1).

Factors get their own parameter group (learning rate x factor_lr_mult, no weight decay);
the learning rate is constant (as ViT-Slim's search). A dimension whose lambda is 0 gets no
factors (ViT-Slim: a weight of 0 freezes that factor type). Data as `apformer train` uses
it: augmented batches of training slices (train.augment), the model's own
`training_losses`. Progress, a time limit and a state file to resume from.
"""

from __future__ import annotations

import csv
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from napari_apformer.compress.capability import JointSearch, joint_search
from napari_apformer.engine.device import resolve_device
from napari_apformer.errors import InputError
from napari_apformer.model.base import SegmentationModel, Trainable
from napari_apformer.train.augment import Augmentation
from napari_apformer.train.datasets import SliceSet


@dataclass
class SearchConfig:
    lambdas: Mapping[str, float]  # dimension -> L1 weight; 0 or absent: not searched
    steps: int = 600
    batch_size: int = 4
    learning_rate: float = 5e-4
    factor_lr_mult: float = 1.0
    weight_decay: float = 1e-5  # weights only; factors are not decayed
    ssa_every: int = 6  # APFormer's SSA term every n-th step (as the shipped weights' recipe)
    seed: int = 0
    max_minutes: float | None = None
    device: str = "auto"
    augmentation: Augmentation = field(default_factory=Augmentation)
    progress: bool = True
    log: Path | None = None  # CSV: losses, L1 terms and factor statistics every log_every steps
    log_every: int = 10
    state: Path | None = None  # search state, written every save_every steps and at the end
    save_every: int = 50
    resume: Path | None = None  # a search state to continue from (steps: the total wanted)
    identity: dict = field(default_factory=dict)  # what a resumed state must have been made of


@dataclass
class SearchResult:
    factors: dict[str, list[torch.Tensor]]  # detached copies, dimension -> per layer
    steps: int  # steps done in all (with a resumed state's)
    seconds: float  # search time in all (with a resumed state's)
    stopped_early: bool  # by the time limit
    losses: dict[str, float] = field(default_factory=dict)  # means over the last log interval


def searched_dimensions(model: SegmentationModel, lambdas: Mapping[str, float]) -> list[str]:
    searchable = joint_search(model)
    dimensions = searchable.searchable_dimensions()
    unknown = sorted(set(lambdas) - set(dimensions))
    if unknown:
        raise InputError(
            f"no searchable dimension {', '.join(unknown)} in {model.family} (there are "
            f"{', '.join(dimensions)})"
        )
    for name, value in lambdas.items():
        if not (math.isfinite(value) and value >= 0):
            raise InputError(f"the L1 weight of {name} must be 0 or more, got {value:g}")
    return [name for name in dimensions if lambdas.get(name, 0.0) > 0]


def l1_terms(
    factors: Mapping[str, list[nn.Parameter]], lambdas: Mapping[str, float]
) -> dict[str, torch.Tensor]:
    """dimension -> lambda * sum |z| over the factors of every layer."""
    return {
        name: lambdas[name] * torch.stack([z.abs().sum() for z in layers]).sum()
        for name, layers in factors.items()
    }


def parameter_groups(
    model: SegmentationModel,
    factors: Mapping[str, list[nn.Parameter]],
    learning_rate: float,
    factor_lr_mult: float,
) -> list[dict]:
    """The family's groups without the factors, and a group of the factors (no decay)."""
    ids = {id(z) for layers in factors.values() for z in layers}
    groups = []
    for group in model.parameter_groups(learning_rate):  # type: ignore[attr-defined]
        params = [p for p in group["params"] if id(p) not in ids]
        if params:
            groups.append({**group, "params": params})
    flat = [z for layers in factors.values() for z in layers]
    if flat:
        groups.append({"params": flat, "lr": learning_rate * factor_lr_mult, "weight_decay": 0.0})
    return groups


def factor_statistics(factors: Mapping[str, list[torch.Tensor]]) -> dict[str, float]:
    """Mean |z| and the fraction of |z| below 0.5 per dimension."""
    out = {}
    for name, layers in factors.items():
        flat = torch.cat([z.detach().abs().flatten().float().cpu() for z in layers])
        out[f"{name}_mean_abs"] = float(flat.mean())
        out[f"{name}_below_half"] = float((flat < 0.5).float().mean())
    return out


def search(model: SegmentationModel, train_set: SliceSet, config: SearchConfig) -> SearchResult:
    """Attach the factors (if they are not yet) and train weights and factors together for
    `config.steps` steps in all; with a state file that exists, continue from it. The model
    keeps its factors (for `select` and extraction) and is left in eval mode."""
    if config.steps < 0 or config.batch_size < 1 or config.ssa_every < 1:
        raise InputError("search steps must be 0 or more, batch size and ssa_every at least 1")
    if not isinstance(model, Trainable):
        raise InputError(f"the {model.family} family declares no training losses")
    if len(train_set) == 0:
        raise InputError("the training set is empty (no slice with enough foreground)")
    dimensions = searched_dimensions(model, config.lambdas)
    if not dimensions:
        raise InputError("nothing to search: every L1 weight is 0")
    searchable: JointSearch = joint_search(model)
    factors = searchable.search_factors()
    if not factors:
        factors = searchable.add_search_factors(dimensions)
    elif sorted(factors) != sorted(dimensions):
        raise ValueError("the model carries factors of other dimensions than those searched")
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    model.to(device).train()
    optimizer = torch.optim.AdamW(
        parameter_groups(model, factors, config.learning_rate, config.factor_lr_mult),
        lr=config.learning_rate,
        weight_decay=config.weight_decay,
    )
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")
    generator = torch.Generator().manual_seed(config.seed)
    per_epoch = max(1, len(train_set) // config.batch_size)
    step, seconds_before, order = 0, 0.0, None
    if config.resume is not None:
        step, seconds_before, order = _resume(config, model, optimizer, generator)
    options = {**model.defaults(), "ssa_every": config.ssa_every}
    lambdas = {name: float(config.lambdas[name]) for name in factors}
    started = time.perf_counter()
    bar = _progress(config.steps, step, config.progress)
    sums: dict[str, float] = {}
    counted, stopped = 0, False
    last: dict[str, float] = {}
    while step < config.steps:
        if order is None or step % per_epoch == 0:
            order = torch.randperm(len(train_set), generator=generator)
        lo = (step % per_epoch) * config.batch_size
        index = order[torch.arange(lo, lo + config.batch_size) % len(train_set)]
        images, masks = config.augmentation(
            train_set.images[index], train_set.masks[index], generator
        )
        images, masks = images.to(device), masks.to(device)
        with torch.autocast(device.type, enabled=device.type == "cuda"):
            losses = model.training_losses(images, masks, step, **options)
        sparsity = l1_terms(factors, lambdas)
        total = losses["total"] + sum(sparsity.values())
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(total).backward()
        scaler.step(optimizer)
        scaler.update()
        step += 1
        values = {
            **{k: float(v.detach()) for k, v in losses.items() if k != "total"},
            **{f"l1_{k}": float(v.detach()) for k, v in sparsity.items()},
            "total": float(total.detach()),
        }
        for key, value in values.items():
            sums[key] = sums.get(key, 0.0) + value
        counted += 1
        if bar is not None:
            bar.set_postfix(loss=f"{values['total']:.3f}")
            bar.update(1)
        elapsed = time.perf_counter() - started
        stopped = bool(config.max_minutes and elapsed > 60 * config.max_minutes)
        if step % config.log_every == 0 or step == config.steps or stopped:
            last = {k: v / counted for k, v in sums.items()}
            if config.log is not None:
                _log(config.log, step, seconds_before + elapsed, last, factors)
            sums, counted = {}, 0
        if config.state is not None and (
            step % config.save_every == 0 or step == config.steps or stopped
        ):
            _save_state(config, model, optimizer, generator, order, step, seconds_before + elapsed)
        if stopped:
            break
    if bar is not None:
        bar.close()
    model.eval()
    return SearchResult(
        {name: [z.detach().clone() for z in layers] for name, layers in factors.items()},
        step,
        seconds_before + time.perf_counter() - started,
        stopped,
        last,
    )


def _progress(total: int, done: int, enabled: bool):
    if not enabled or done >= total:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=done, desc="search", unit="step", leave=False, disable=None)


def _log(
    path: Path,
    step: int,
    seconds: float,
    losses: Mapping[str, float],
    factors: Mapping[str, list[torch.Tensor]],
) -> None:
    row = {
        "step": step,
        "seconds": round(seconds, 1),
        **{f"loss_{k}": round(v, 6) for k, v in losses.items()},
        **{k: round(v, 6) for k, v in factor_statistics(factors).items()},
    }
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def _save_state(config, model, optimizer, generator, order, step: int, seconds: float) -> None:
    """Written to a temporary file, then renamed: an interrupted run leaves the last state."""
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "generator": generator.get_state(),
        "order": order,
        "step": step,
        "seconds": seconds,
        "identity": config.identity,
    }
    path = config.state
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _resume(config, model, optimizer, generator) -> tuple[int, float, torch.Tensor | None]:
    path = config.resume
    if not path.is_file():
        raise InputError("no search state here to resume from", path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        identity = state["identity"]
    except Exception as error:  # a bad or foreign file: say which and why
        raise InputError(f"cannot resume from this file ({error})", path) from None
    if identity != config.identity:
        keys = set(identity) | set(config.identity)
        differing = sorted(k for k in keys if identity.get(k) != config.identity.get(k))
        raise InputError(
            f"this search state was made with other {', '.join(differing)}; delete it or give "
            "the same ones",
            path,
        )
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as error:
        raise InputError(f"cannot resume from this file ({error})", path) from None
    generator.set_state(state["generator"])
    return int(state["step"]), float(state["seconds"]), state.get("order")
