"""The model families side by side on the MNI152 tissue task; prints a Markdown table.

    python benchmarks/bench_models.py --mni152 nilearn-0.14.1-py3-none-any.whl [--threads 2]

Rows: `weights/mni152-tissue` (APFormer) at its settings and again with nothing pruned (the
reference of issue 14's MobileUtr target), `weights/mni152-tissue-slim` (APFormer compressed,
when present), `weights/mni152-tissue-mobileutr` (MobileUtr; random
weights if it is absent), MobileUtr-L with random weights (its speed row only) and
`weights/mni152-tissue-mobileutr-ap` (MobileUtr with APFormer's pruning; while those weights
are absent, MobileUtr's weights with an untrained pruning head, a speed row only). Columns:
parameters; GFLOP per slice at the weights' settings, averaged over the validation slices
(APFormer's depends on the tokens kept) and unpruned; CPU ms per 256 x 256 slice through the
engine (`Segmenter.segment`, batch of one slice, the models interleaved round by round in
this one process so that a drift in the machine's load touches all alike), and its ratio to
the first two rows; validation Dice per
class on the 48 validation slices of `apformer train --mni152` (`train.loop.evaluate`, pixels
pooled); kept tokens where the family prunes.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from napari_apformer.engine.inference import Segmenter
from napari_apformer.hardware import describe
from napari_apformer.model import load_model
from napari_apformer.model.base import SegmentationModel, build_model

WEIGHTS = Path(__file__).parents[1] / "weights"
UNPRUNED_ROW = "APFormer (mni152-tissue), nothing pruned"


def models() -> list[tuple[str, SegmentationModel, bool]]:
    """(row name, model, whether its Dice means anything). The second row is the first
    model again, run with nothing pruned (its settings are set in main)."""
    apformer = load_model(WEIGHTS / "mni152-tissue.safetensors")
    rows = [
        ("APFormer (mni152-tissue)", apformer, True),
        (UNPRUNED_ROW, apformer, True),
    ]
    slim = WEIGHTS / "mni152-tissue-slim.safetensors"
    if slim.is_file():
        rows.append(("APFormer compressed (mni152-tissue-slim)", load_model(slim), True))
    mobile = WEIGHTS / "mni152-tissue-mobileutr.safetensors"
    if mobile.is_file():
        rows.append(("MobileUtr (mni152-tissue-mobileutr)", load_model(mobile), True))
    else:
        random_default = build_model("mobileutr", 1, 4, "default")
        rows.append(("MobileUtr (random weights)", random_default, False))
    torch.manual_seed(0)
    rows.append(("MobileUtr-L (random weights)", build_model("mobileutr", 1, 4, "L"), False))
    pruned = WEIGHTS / "mni152-tissue-mobileutr-ap.safetensors"
    if pruned.is_file():
        rows.append(("mobileutr-ap (mni152-tissue-mobileutr-ap)", load_model(pruned), True))
    else:  # MobileUtr's weights where present, an untrained pruning head: a speed row only
        untrained = build_model("mobileutr-ap", 1, 4, "default")
        name = "mobileutr-ap (random weights)"
        if mobile.is_file():
            untrained.load_state_dict(load_model(mobile).state_dict(), strict=False)
            name = "mobileutr-ap (MobileUtr's weights, untrained pruning head)"
        rows.append((name, untrained, False))
    for _, model, _ in rows:
        model.eval()
    return rows


def slice_ms(segmenter: Segmenter, prepared, settings: dict) -> float:
    start = time.perf_counter()
    segmenter.segment(prepared, **settings)
    return 1000 * (time.perf_counter() - start)


def mean_gflops(model: SegmentationModel, images: torch.Tensor, settings: dict) -> float:
    spent = []
    with torch.inference_mode():
        for k in range(0, len(images), 8):
            flops = model.predict(images[k : k + 8], **settings).flops
            spent += [] if flops is None else flops.tolist()
    return float(np.mean(spent)) / 1e9 if spent else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mni152", type=Path, required=True, help="the nilearn wheel")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15, help="timed slices per model")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from napari_apformer.model.card import Normalisation
    from napari_apformer.train import mni152
    from napari_apformer.train.loop import evaluate

    rows = models()
    _, val_set = mni152.dataset(args.mni152, Normalisation())
    image = val_set.images[len(val_set) // 2, 0].numpy()  # a validation slice, 256 x 256
    settings = [
        model.unpruned_settings() if name == UNPRUNED_ROW else model.defaults()
        for name, model, _ in rows
    ]
    segmenters = [Segmenter(model, device="cpu", batch_size=1) for _, model, _ in rows]
    prepared = [s.prepare(image) for s in segmenters]
    runs = list(zip(segmenters, prepared, settings, strict=True))
    for s, p, values in runs:
        slice_ms(s, p, values)  # warm-up
    times: list[list[float]] = [[] for _ in rows]
    for _ in range(args.rounds):
        for k, (s, p, values) in enumerate(runs):
            times[k].append(slice_ms(s, p, values))
    print(
        f"{describe()}, torch {torch.__version__}; ms: median of {args.rounds} interleaved rounds\n"
    )
    names = [c.name for c in rows[0][1].card.classes[1:]]
    print(
        "| model | params | GFLOP per slice (settings / unpruned) | CPU ms per slice | "
        + " | ".join(f"Dice {n}" for n in names)
        + " | mean Dice | kept tokens |"
    )
    print("|---|---|---|---|" + "---|" * len(names) + "---|---|")
    reference, unpruned = (statistics.median(times[k]) for k in (0, 1))
    for (name, model, trained), values, taken in zip(rows, settings, times, strict=True):
        params = sum(p.numel() for p in model.parameters())
        own = mean_gflops(model, val_set.images, values)
        full = mean_gflops(model, val_set.images, model.unpruned_settings())
        ms = statistics.median(taken)
        dice_cells, kept = ["-"] * len(names), "-"
        mean = "-"
        if trained:
            v = evaluate(model, val_set, values, torch.device("cpu"))
            dice_cells = [f"{d:.4f}" for d in v.dice[1:]]
            mean = f"{v.mean_foreground:.4f}"
            if "kept_tokens" in v.counters:
                kept = f"{100 * v.counters['kept_tokens']:.1f} %"
        print(
            f"| {name} | {params:,} | {own:.2f} / {full:.2f} | {ms:.0f} "
            f"({ms / reference:.2f} x APFormer, {ms / unpruned:.2f} x unpruned) | "
            + " | ".join(dice_cells)
            + f" | {mean} | {kept} |"
        )


if __name__ == "__main__":
    main()
