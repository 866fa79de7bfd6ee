"""Fine-tuning on six corrected axial slices of a scan the weights did not learn; prints a
Markdown table.

    python benchmarks/bench_finetune.py --mni152 nilearn-0.14.1-py3-none-any.whl \
        [--weights mni152-tissue] [--shift inverted|bias-gamma] [--steps 60] [--threads 2]

We have no labelled brain of another subject, so the "unseen scan" is the 1 mm MNI152 T1
template with a contrast the weights were not trained on, and its tissue labels are the truth
(the labels `apformer train --mni152` uses):
- `inverted`: inside the brain the T1 intensities are turned upside down (CSF bright, white
  matter dark, as in a T2-weighted scan); outside it they stay.
- `bias-gamma`: a smooth multiplicative bias field (0.7 to 1.3 across the head), gamma 1.6
  and 3 % noise.
Six axial slices spread over the brain are "corrected" (their true labels given); fine-tuning
runs `train.finetune.finetune` with its defaults (the CLI's and the widget's). Dice per tissue
over every other axial slice of the volume (pixels pooled), before and after; wall time of the
fine-tuning alone.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from napari_apformer.engine.inference import Segmenter
from napari_apformer.hardware import describe
from napari_apformer.model import load_model
from napari_apformer.train.finetune import FinetuneOptions, finetune
from napari_apformer.train.mni152 import BRAIN_FRACTION, load_template, tissue_labels
from napari_apformer.weights import resolve_weights


def shifted(t1: np.ndarray, shift: str, seed: int = 0) -> np.ndarray:
    scaled = t1 / max(float(t1.max()), 1e-6)
    brain = scaled > BRAIN_FRACTION
    if shift == "inverted":
        return np.where(brain, 1.0 + BRAIN_FRACTION - scaled, scaled).astype(np.float32)
    x = np.linspace(0.7, 1.3, t1.shape[0], dtype=np.float32)[:, None, None]
    rng = np.random.default_rng(seed)
    out = (scaled**1.6) * x + rng.normal(0, 0.03, t1.shape).astype(np.float32)
    return np.clip(out, 0, None).astype(np.float32)


def dice(labels: np.ndarray, truth: np.ndarray, n_classes: int) -> list[float]:
    values = []
    for c in range(1, n_classes):
        a, b = labels == c, truth == c
        total = int(a.sum() + b.sum())
        values.append(2 * int((a & b).sum()) / total if total else float("nan"))
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mni152", type=Path, required=True)
    parser.add_argument("--weights", default="mni152-tissue")
    parser.add_argument("--shift", choices=("inverted", "bias-gamma"), default="inverted")
    parser.add_argument("--steps", type=int, default=FinetuneOptions().steps)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    template = load_template(args.mni152)
    truth = tissue_labels(template.t1, template.gm, template.wm)
    image = shifted(template.t1, args.shift)
    z_brain = np.flatnonzero((truth > 0).any(axis=(0, 1)))
    corrected = [int(z) for z in np.linspace(z_brain[0], z_brain[-1], 8)[1:-1].round()]
    others = [z for z in z_brain if z not in corrected]
    model = load_model(resolve_weights(args.weights))
    n_classes = model.n_classes
    spacing = (1.0, 1.0, 1.0)

    def volume_dice(m) -> list[float]:
        segmenter = Segmenter(m, device="cpu")
        labels = segmenter.segment(segmenter.prepare(image, axis=2, spacing=spacing)).labels
        return dice(labels[:, :, others], truth[:, :, others], n_classes)

    before = volume_dice(model)
    started = time.perf_counter()
    result = finetune(
        model,
        image,
        truth,
        2,
        corrected,
        spacing=spacing,
        options=FinetuneOptions(steps=args.steps),
    )
    seconds = time.perf_counter() - started
    after = volume_dice(result.model)
    names = model.card.class_names[1:]
    print(
        f"{describe()}, torch "
        f"{torch.__version__}; weights {args.weights}; shift {args.shift}; corrected axial "
        f"slices {corrected}; Dice over the other {len(others)} axial slices of the brain\n"
    )
    print("| | " + " | ".join(f"Dice {n}" for n in names) + " | mean |")
    print("|---|" + "---|" * (len(names) + 1))
    for label, values in (("base weights", before), ("fine-tuned", after)):
        print(
            f"| {label} | "
            + " | ".join(f"{v:.4f}" for v in values)
            + f" | {np.nanmean(values):.4f} |"
        )
    gain = np.nanmean(after) - np.nanmean(before)
    print(
        f"\nfine-tuning: {result.report.steps} steps in {seconds:.0f} s "
        f"({seconds / 60:.1f} min); mean Dice gain {gain:+.4f}"
    )


if __name__ == "__main__":
    main()
