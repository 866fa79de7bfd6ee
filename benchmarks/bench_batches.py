"""Batch 1 against batch 8 through the engine, for each family; prints a Markdown table.

    python benchmarks/bench_batches.py [--threads 2] [--rounds 5] [--slices 16]

Weights: the shipped `mni152-tissue` (APFormer, unpruned: every token kept, so the work is the
same at every batch) and `mni152-tissue-mobileutr` (MobileUtr). Volume: the packaged 2 mm
MNI152 sample resampled to --slices x 256 x 256 (bench_volume.synthetic_volume), segmented end
to end by `Segmenter.segment` (normalisation, model, labels). The rows are interleaved round by
round in this one process, so a drift of the machine touches all alike. Minor page faults per
slice come from getrusage: memory that glibc gave back to the kernel and takes again.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

from bench_volume import synthetic_volume
from napari_apformer.engine.inference import Segmenter
from napari_apformer.hardware import describe
from napari_apformer.model import load_model
from napari_apformer.weights import resolve_weights

WEIGHTS = ("mni152-tissue", "mni152-tissue-mobileutr")
BATCHES = (1, 8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--slices", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    volume = synthetic_volume((args.slices, 256, 256))
    runs = {}
    for name in WEIGHTS:
        model = load_model(resolve_weights(name))
        for batch in BATCHES:
            segmenter = Segmenter(model, device="cpu", batch_size=batch)
            prepared = segmenter.prepare(volume, axis=0)
            runs[(name, batch)] = (segmenter, prepared, model.unpruned_settings())
    times: dict[tuple[str, int], list[float]] = {key: [] for key in runs}
    faults: dict[tuple[str, int], list[float]] = {key: [] for key in runs}
    for segmenter, prepared, settings in runs.values():  # warm-up
        segmenter.segment(prepared, **settings)
    for _ in range(args.rounds):
        for key, (segmenter, prepared, settings) in runs.items():
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            start = time.perf_counter()
            segmenter.segment(prepared, **settings)
            times[key].append(1000 * (time.perf_counter() - start) / args.slices)
            after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            faults[key].append((after - before) / args.slices)

    print(f"{describe()}, torch {torch.__version__}")
    print(f"{args.slices} x 256 x 256 volume, unpruned settings, medians of {args.rounds} rounds\n")
    print("| weights | batch | ms per slice | minor faults per slice | batch 8 / batch 1 |")
    print("|---|---|---|---|---|")
    for name in WEIGHTS:
        for batch in BATCHES:
            ms = statistics.median(times[(name, batch)])
            ratio = ""
            if batch != 1:  # per round, then the median: both rows saw the same drift
                pairs = zip(times[(name, batch)], times[(name, 1)], strict=True)
                ratio = f"{statistics.median(b / a for b, a in pairs):.2f}"
            print(
                f"| {name} | {batch} | {ms:.0f} | "
                f"{statistics.median(faults[(name, batch)]):.0f} | {ratio} |"
            )


if __name__ == "__main__":
    main()
