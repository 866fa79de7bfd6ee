"""Dice and compute over a grid of run-time settings, on a labelled data set.

A grid point names some of the model's settings (the others keep the weights' own values).
With a model that offers a cached split (`CachedSplit`) the costly part runs once per batch and
each grid point reruns `decode` only; otherwise each point runs `predict`. The counters (as
fractions) and GFLOP per slice come from the predictions: what the implementation ran.

Milliseconds per slice are wall time of those passes on this machine (its torch threads and
device are recorded with them): a point's share is the batch's `encode` (once, shared by
every point, as a cold run of the engine also encodes each slice once) plus its own `decode`
(or its `predict`), divided by the slices. Points are interleaved batch by batch, and each
runs one slice untimed first, so one-off start-up costs fall on no point. Dice counting is
not timed. Other work on the machine adds to the figures: compare rows of one sweep, or
sweeps run on a quiet machine.
"""

from __future__ import annotations

import csv
import itertools
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from napari_apformer.errors import InputError
from napari_apformer.hardware import cpu_name
from napari_apformer.model.base import CachedSplit, SegmentationModel, SettingValue
from napari_apformer.train.datasets import SliceSet


@dataclass(frozen=True)
class Timing:
    """Where the milliseconds were measured."""

    machine: str  # the CPU's name
    threads: int  # torch's CPU threads
    device: str

    def text(self) -> str:
        return f"wall time on {self.machine}, {self.threads} torch threads, {self.device}"


@dataclass
class SweepRow:
    settings: dict[str, SettingValue]  # every setting's value at this grid point
    dice: list[float]  # per class, background first
    counters: dict[str, float]  # name -> count / out of, over all slices
    gflops: float  # per slice
    ms_per_slice: float = 0.0  # wall time of the model's passes per slice (see the module)
    timing: Timing | None = None

    @property
    def mean_foreground(self) -> float:
        return sum(self.dice[1:]) / max(1, len(self.dice) - 1)


def _clock(device: torch.device) -> float:
    """perf_counter after the device's queued work is done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def grid(axes: Mapping[str, Sequence[object]]) -> list[dict[str, object]]:
    """Every combination of the values given per setting (the last setting varies fastest).
    An empty mapping: one point, the weights' own settings."""
    names = list(axes)
    return [dict(zip(names, values, strict=True)) for values in itertools.product(*axes.values())]


@torch.inference_mode()
def sweep(
    model: SegmentationModel,
    data: SliceSet,
    points: Sequence[Mapping[str, object]],
    batch: int = 8,
    device: torch.device | str = "cpu",
) -> list[SweepRow]:
    """One row per distinct grid point (settings not named take the model's defaults)."""
    model.eval()
    device = torch.device(device)
    resolved: list[dict[str, SettingValue]] = []
    for point in points:
        values = model.resolve_settings(point)
        if values not in resolved:
            resolved.append(values)
    if not resolved:
        raise InputError("no settings to sweep")
    n = model.n_classes
    names = [c.name for c in model.counter_specs()]
    counts = [torch.zeros(n, 3, dtype=torch.float64) for _ in resolved]
    counted = [{name: [0.0, 0.0] for name in names} for _ in resolved]
    flops = [0.0 for _ in resolved]
    seconds = [0.0 for _ in resolved]
    split = isinstance(model, CachedSplit)
    if len(data):  # warm-up, untimed: one slice per point
        first = data.images[:1].to(device)
        encoded_first = model.encode(first) if split else None
        for values in resolved:
            if split:
                model.decode(encoded_first, **values)
            else:
                model.predict(first, **values)
    for lo in range(0, len(data), batch):
        images = data.images[lo : lo + batch].to(device)
        masks = data.masks[lo : lo + batch].to(device)
        started = _clock(device)
        encoded = model.encode(images) if split else None
        encode_seconds = _clock(device) - started
        encode_flops = model.encode_flops(*images.shape[-2:]) if split else 0
        for k, values in enumerate(resolved):
            started = _clock(device)
            out = model.decode(encoded, **values) if split else model.predict(images, **values)
            seconds[k] += encode_seconds + _clock(device) - started
            labels = out.logits.argmax(dim=1)
            for c in range(n):
                predicted, truth = labels == c, masks == c
                counts[k][c] += torch.tensor(
                    [float((predicted & truth).sum()), float(predicted.sum()), float(truth.sum())],
                    dtype=torch.float64,
                )
            for name, pair in out.counters.items():
                if name in counted[k]:
                    counted[k][name][0] += float(pair[:, 0].sum())
                    counted[k][name][1] += float(pair[:, 1].sum())
            if out.flops is not None:
                flops[k] += float(out.flops.sum()) + encode_flops * images.shape[0]
    timing = Timing(cpu_name(), torch.get_num_threads(), device.type)
    return [
        SweepRow(
            values,
            [_dice(row) for row in counts[k]],
            {name: (c / t if t else 0.0) for name, (c, t) in counted[k].items()},
            flops[k] / max(1, len(data)) / 1e9,
            1e3 * seconds[k] / max(1, len(data)),
            timing,
        )
        for k, values in enumerate(resolved)
    ]


def _dice(row: torch.Tensor) -> float:
    both, predicted, truth = (float(v) for v in row)
    return 1.0 if predicted + truth == 0 else 2 * both / (predicted + truth)


def value_text(value: object) -> str:
    """0.9; a per-layer value as one number when every layer has it, else -2/-2/-1/0."""
    if isinstance(value, list | tuple):
        if len(set(value)) == 1:
            return value_text(value[0])
        return "/".join(value_text(v) for v in value)
    return f"{value:g}" if isinstance(value, float | int) else str(value)


def table(
    rows: list[SweepRow], class_names: list[str], model: SegmentationModel | None = None
) -> str:
    """A Markdown table: one column per setting, Dice per foreground class, the counters,
    GFLOP and ms per slice (labels from the model's declarations where given), and a line
    saying where the milliseconds were measured."""
    names = class_names[1:]
    settings = list(rows[0].settings) if rows else []
    counters = list(rows[0].counters) if rows else []
    labels = {s.name: s.label for s in model.settings()} if model is not None else {}
    labels.update({c.name: c.label for c in model.counter_specs()} if model is not None else {})
    head = (
        "| "
        + " | ".join(labels.get(s, s) for s in settings)
        + " | "
        + " | ".join(f"Dice {n}" for n in names)
        + " | mean Dice | "
        + "".join(f"{labels.get(c, c)} | " for c in counters)
        + "GFLOP per slice | ms per slice |"
    )
    lines = [head, "|" + "---|" * (len(settings) + len(names) + len(counters) + 3)]
    for r in rows:
        lines.append(
            "| "
            + " | ".join(value_text(r.settings[s]) for s in settings)
            + " | "
            + " | ".join(f"{d:.3f}" for d in r.dice[1:])
            + f" | {r.mean_foreground:.3f} | "
            + "".join(f"{100 * r.counters[c]:.1f} % | " for c in counters)
            + f"{r.gflops:.1f} | {r.ms_per_slice:.0f} |"
        )
    timing = rows[0].timing if rows else None
    if timing is not None:
        lines += [
            "",
            f"ms per slice: {timing.text()}, of the model's passes only (encode once per "
            "batch, shared by the settings, plus each setting's decode); settings interleaved "
            "batch by batch; other work on the machine adds to it.",
        ]
    return "\n".join(lines)


def write_csv(rows: list[SweepRow], class_names: list[str], path: Path) -> None:
    settings = list(rows[0].settings) if rows else []
    counters = list(rows[0].counters) if rows else []
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            [
                *settings,
                *(f"dice_{n}" for n in class_names),
                "mean_foreground_dice",
                *counters,
                "gflops_per_slice",
                "wall_ms_per_slice",
                "threads",
                "device",
                "machine",
            ]
        )
        for r in rows:
            writer.writerow(
                [
                    *(value_text(r.settings[s]) for s in settings),
                    *(f"{d:.5f}" for d in r.dice),
                    f"{r.mean_foreground:.5f}",
                    *(f"{r.counters[c]:.5f}" for c in counters),
                    f"{r.gflops:.3f}",
                    f"{r.ms_per_slice:.2f}",
                    *(
                        (r.timing.threads, r.timing.device, r.timing.machine)
                        if r.timing
                        else ("", "", "")
                    ),
                ]
            )


def plot(rows: list[SweepRow], path: Path, title: str, swept: Sequence[str] = ()) -> None:
    """Mean foreground Dice against GFLOP per slice, points labelled with the last of the
    `swept` settings (the fastest varying), one line per value of the others."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    swept = [s for s in swept if rows and s in rows[0].settings]
    point_name, line_names = (swept[-1], swept[:-1]) if swept else (None, [])

    def line_key(r: SweepRow) -> str:
        return ", ".join(f"{n} {value_text(r.settings[n])}" for n in line_names)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key in dict.fromkeys(line_key(r) for r in rows):
        line = sorted((r for r in rows if line_key(r) == key), key=lambda r: r.gflops)
        ax.plot(
            [r.gflops for r in line],
            [r.mean_foreground for r in line],
            marker="o",
            label=key or None,
        )
        for r in line if point_name else []:
            ax.annotate(
                value_text(r.settings[point_name]),
                (r.gflops, r.mean_foreground),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
    ax.set(xlabel="GFLOP per slice", ylabel="mean Dice (foreground classes)", title=title)
    ax.grid(alpha=0.3)
    if line_names:
        ax.legend(title=f"points: {point_name}", fontsize=8)
    elif point_name:
        ax.set_title(f"{title}\npoints: {point_name}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
