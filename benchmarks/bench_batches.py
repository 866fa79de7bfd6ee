"""Batch 1 against batch 8 through the engine, with and without keeping freed memory.

    python benchmarks/bench_batches.py [--threads 2] [--rounds 3] [--slices 16]

Weights: the shipped `mni152-tissue` (APFormer, unpruned: every token kept, so the run is the
same at every batch) and `mni152-tissue-mobileutr` (MobileUtr). Volume: the packaged 2 mm
MNI152 sample resampled to --slices x 256 x 256 (bench_volume.synthetic_volume), segmented end
to end by `Segmenter.segment` (normalisation, model, labels). The engine keeps freed memory
in the process while a run lasts (`napari_apformer.allocator`); the "released" rows put
glibc's default behaviour back by running the engine without it. The allocator's state is
process-wide, so each round runs one fresh process per mode, alternately; within a process
the rows are interleaved. Minor page faults per slice come from getrusage.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import statistics
import time

from bench_volume import synthetic_volume
from fresh_process import run_worker
from napari_apformer.hardware import describe

WEIGHTS = ("mni152-tissue", "mni152-tissue-mobileutr")
BATCHES = (1, 8)
MODES = ("kept", "released")


def worker(config: dict) -> dict:
    import torch

    import napari_apformer.engine.inference as inference
    from napari_apformer.engine.inference import Segmenter
    from napari_apformer.model import load_model
    from napari_apformer.weights import resolve_weights

    torch.set_num_threads(config["threads"])
    if config["mode"] == "released":
        inference.freed_memory_kept = lambda: contextlib.nullcontext(False)
    volume = synthetic_volume((config["slices"], 256, 256))
    runs = {}
    for name in WEIGHTS:
        model = load_model(resolve_weights(name))
        settings = model.unpruned_settings()
        for batch in BATCHES:
            segmenter = Segmenter(model, device="cpu", batch_size=batch)
            prepared = segmenter.prepare(volume, axis=0)
            runs[f"{name}|{batch}"] = (segmenter, prepared, settings)
    out: dict[str, dict[str, list[float]]] = {key: {"ms": [], "faults": []} for key in runs}
    for segmenter, prepared, settings in runs.values():  # warm-up
        segmenter.segment(prepared, **settings)
    for _ in range(config["repeats"]):
        for key, (segmenter, prepared, settings) in runs.items():
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            start = time.perf_counter()
            segmenter.segment(prepared, **settings)
            seconds = time.perf_counter() - start
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
            out[key]["ms"].append(1000 * seconds / config["slices"])
            out[key]["faults"].append(faults / config["slices"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="fresh processes per mode")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each row per process")
    parser.add_argument("--slices", type=int, default=16)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    import torch

    torch.set_num_threads(args.threads)
    config = {"threads": args.threads, "slices": args.slices, "repeats": args.repeats}
    results: dict[str, dict[str, dict[str, list[float]]]] = {m: {} for m in MODES}
    for _ in range(args.rounds):
        for mode in MODES:
            for key, values in run_worker(__file__, {**config, "mode": mode}).items():
                row = results[mode].setdefault(key, {"ms": [], "faults": []})
                row["ms"] += values["ms"]
                row["faults"] += values["faults"]

    def median(mode: str, name: str, batch: int, what: str = "ms") -> float:
        return statistics.median(results[mode][f"{name}|{batch}"][what])

    print(f"{describe()}, torch {torch.__version__}")
    print(
        f"{args.slices} x 256 x 256 volume, unpruned settings, {args.rounds} processes per mode "
        f"x {args.repeats} runs; medians\n"
    )
    print(
        "| weights | freed memory | batch | ms per slice | minor faults per slice | "
        "batch 8 / batch 1 | kept / released |"
    )
    print("|---|---|---|---|---|---|---|")
    for name in WEIGHTS:
        for mode in MODES:
            for batch in BATCHES:
                ms = median(mode, name, batch)
                versus_one = "" if batch == 1 else f"{ms / median(mode, name, 1):.2f}"
                versus_mode = (
                    f"{ms / median('released', name, batch):.2f}" if mode == "kept" else ""
                )
                print(
                    f"| {name} | {mode} | {batch} | {ms:.0f} | "
                    f"{median(mode, name, batch, 'faults'):.0f} | {versus_one} | {versus_mode} |"
                )


if __name__ == "__main__":
    main()
