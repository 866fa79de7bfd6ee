"""Dice and compute over a grid of token thresholds and gates, on a labelled data set.

The encoder runs once per batch; each setting reruns the transformer and decoder only.
GFLOP per slice counts what the implementation runs for the tokens kept (engine.stats).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import torch

from napari_apformer.engine.stats import slice_flops
from napari_apformer.model.apformer import TOKENS, APFormer
from napari_apformer.train.datasets import SliceSet


@dataclass
class SweepRow:
    token_threshold: float
    gate: float | None  # None: the model's own gates
    dice: list[float]  # per class, background first
    kept_tokens: float
    kept_dependencies: float
    gflops: float  # per slice

    @property
    def mean_foreground(self) -> float:
        return sum(self.dice[1:]) / max(1, len(self.dice) - 1)


@torch.inference_mode()
def sweep(
    model: APFormer,
    data: SliceSet,
    thresholds: list[float],
    gates: list[float | None],
    batch: int = 8,
    device: torch.device | str = "cpu",
) -> list[SweepRow]:
    model.eval()
    n = model.n_classes
    settings = list(dict.fromkeys((tau, gate) for gate in gates for tau in thresholds))
    counts = {s: torch.zeros(n, 3, dtype=torch.float64) for s in settings}
    kept = dict.fromkeys(settings, 0.0)
    kept_deps = dict.fromkeys(settings, 0.0)
    possible = dict.fromkeys(settings, 0.0)
    flops = dict.fromkeys(settings, 0.0)
    heads = model.trans4.attention_layers[0].heads
    for lo in range(0, len(data), batch):
        images = data.images[lo : lo + batch].to(device)
        masks = data.masks[lo : lo + batch].to(device)
        encoded = model.encode(images)
        for setting in settings:
            out = model.decode(encoded, setting[0], setting[1])
            labels = out.logits.argmax(dim=1)
            for c in range(n):
                predicted, truth = labels == c, masks == c
                counts[setting][c] += torch.tensor(
                    [float((predicted & truth).sum()), float(predicted.sum()), float(truth.sum())],
                    dtype=torch.float64,
                )
            per_slice = out.keep.sum(dim=1)
            kept[setting] += float(per_slice.sum())
            kept_deps[setting] += float(out.kept_dependencies.sum())
            possible[setting] += float(per_slice.sum()) * model.depth * heads * TOKENS
            flops[setting] += sum(slice_flops(model, int(k)) for k in per_slice)
    rows = []
    for setting in settings:
        dice = [_dice(row) for row in counts[setting]]
        rows.append(
            SweepRow(
                setting[0],
                setting[1],
                dice,
                kept[setting] / (len(data) * TOKENS),
                kept_deps[setting] / possible[setting] if possible[setting] else 0.0,
                flops[setting] / len(data) / 1e9,
            )
        )
    return rows


def _dice(row: torch.Tensor) -> float:
    both, predicted, truth = (float(v) for v in row)
    return 1.0 if predicted + truth == 0 else 2 * both / (predicted + truth)


def table(rows: list[SweepRow], class_names: list[str]) -> str:
    names = class_names[1:]
    head = (
        "| token threshold | gate | "
        + " | ".join(f"Dice {n}" for n in names)
        + " | mean Dice | kept tokens | kept dependencies | GFLOP per slice |"
    )
    lines = [head, "|" + "---|" * (len(names) + 6)]
    for r in rows:
        lines.append(
            f"| {r.token_threshold:g} | {r.gate:g} | "
            + " | ".join(f"{d:.3f}" for d in r.dice[1:])
            + f" | {r.mean_foreground:.3f} | {100 * r.kept_tokens:.1f} % | "
            f"{100 * r.kept_dependencies:.1f} % | {r.gflops:.1f} |"
        )
    return "\n".join(lines)


def write_csv(rows: list[SweepRow], class_names: list[str], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            [
                "token_threshold",
                "gate",
                *(f"dice_{n}" for n in class_names),
                "mean_foreground_dice",
                "kept_tokens",
                "kept_dependencies",
                "gflops_per_slice",
            ]
        )
        for r in rows:
            writer.writerow(
                [
                    r.token_threshold,
                    r.gate,
                    *(f"{d:.5f}" for d in r.dice),
                    f"{r.mean_foreground:.5f}",
                    f"{r.kept_tokens:.5f}",
                    f"{r.kept_dependencies:.5f}",
                    f"{r.gflops:.3f}",
                ]
            )


def plot(rows: list[SweepRow], path: Path, title: str) -> None:
    """Mean foreground Dice against GFLOP per slice, one line per gate, points labelled tau."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for gate in sorted({r.gate for r in rows}):
        line = sorted((r for r in rows if r.gate == gate), key=lambda r: r.gflops)
        ax.plot(
            [r.gflops for r in line],
            [r.mean_foreground for r in line],
            marker="o",
            label=f"gate {gate:g}",
        )
        for r in line:
            ax.annotate(
                f"{r.token_threshold:g}",
                (r.gflops, r.mean_foreground),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
    ax.set(xlabel="GFLOP per slice", ylabel="mean Dice (foreground classes)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(title="points: token threshold", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
