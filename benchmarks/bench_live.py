"""The widget's live run on each device, without napari: what a slider change computes.

    python benchmarks/bench_live.py [--devices cpu,cuda] [--threads 2] [--repeats 20]

`Session.run_live` is what the widget runs in its worker for every slider change (the engine
from its cache, the labels on the shown slice, the query point's attention rows, the labels
changed by pruning). Here it runs on the slice bench_widget.py shows (the MNI152 sample
slice, padded to 256 x 256) with the shipped default weights, the setting moved back and forth
between two values so that every call is a real change. Drawing the overlays is not included
(bench_widget.py measures the whole change in a viewer, on the CPU): this is the part that a
GPU can speed up, and it needs no display, so it runs on a GPU machine without Qt.
Prints a Markdown table: median, p90 and max ms per change, and the minor page faults of a
change (memory the process got back from the kernel and had to touch again).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from napari_apformer.hardware import describe

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "src/napari_apformer/samples/mni152_t1_axial_slice.nii.gz"
# (label, fixed settings, moved setting, its two values): the rows of bench_widget.py
ROWS = [
    ("threshold moved", {}, "token_threshold", (0.7, 0.9)),
    ("at threshold 1.0, gate moved", {"token_threshold": 1.0}, "gate", (-1.9, -2.0)),
]


def sample_slice() -> np.ndarray:
    """The MNI152 sample slice zero-padded to 256 x 256 (y, x): what bench_widget.py shows."""
    from napari_apformer.io.formats import read_image_file

    plane = read_image_file(SAMPLE).data[:, :, 0].T  # (y, x)
    pad = [(max(0, (256 - s) // 2), max(0, 256 - s - (256 - s) // 2)) for s in plane.shape]
    return np.pad(plane, pad)[:256, :256]


def shown_slice():
    """That slice as the widget hands an image layer to a run."""
    from napari_apformer.plugin.image_source import ImageSource

    return ImageSource(
        "slice 256 x 256",
        sample_slice(),
        False,
        (),
        (1.0, 1.0),
        (0.0, 0.0),
        None,
        ("y", "x"),
        ("", ""),
    )


def changes(device: str, repeats: int) -> list[str]:
    from napari_apformer.plugin.runs import LiveRequest, Session, Settings
    from napari_apformer.weights import resolve_weights

    weights = resolve_weights(None)
    session, image = Session(), shown_slice()
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    lines = []
    for label, fixed, name, values in ROWS:
        times, kept, faults = [], [], []
        for k in range(repeats + 2):  # the first two fill the caches
            settings = Settings(weights, device, {**fixed, name: values[k % 2]})
            faulted = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            start = time.perf_counter()
            outcome = session.run_live(LiveRequest(k, image, 0, 0, settings, None))
            sync()
            if k >= 2:
                times.append(1000 * (time.perf_counter() - start))
                kept.append(outcome.stats.fraction("kept_tokens"))
                faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faulted)
        times.sort()
        p90 = times[min(len(times) - 1, int(0.9 * len(times)))]
        lines.append(
            f"| {device} | {label} | {100 * statistics.mean(kept):.0f} % | "
            f"{statistics.median(times):.1f} | {p90:.1f} | {times[-1]:.1f} | "
            f"{statistics.median(faults):.0f} |"
        )
    session.close()
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--devices", default=None, help="default: cpu, and cuda when present")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = args.devices or ("cpu,cuda" if torch.cuda.is_available() else "cpu")
    devices = names.split(",")
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    print(f"{describe()}, torch {torch.__version__}, CUDA: {gpu}\n")
    print(
        "| device | settings | kept tokens | median ms | p90 ms | max ms | "
        "minor page faults per change (median) |"
    )
    print("|---|---|---|---|---|---|---|")
    for device in devices:
        print("\n".join(changes(device, args.repeats)), flush=True)


if __name__ == "__main__":
    main()
