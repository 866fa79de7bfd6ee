"""The widget's live path and napari start-up, measured in a real viewer.

    xvfb-run -a python benchmarks/bench_widget.py [--repeats 20]

1. Slider change to updated overlays: a 256 x 256 slice (the MNI152 sample slice, padded) in
   napari with the widget docked; each change of the token threshold slider is timed from
   setting the slider to the moment every overlay layer holds the new result (the widget is
   idle again). Rows: the shipped default weights moving the threshold; the same at threshold
   1.0 (nothing pruned, the worst case) moving the gate; the authors' released weights
   (tests/data) moving the threshold.
2. napari start-up with the plugin installed, in a fresh process: whether torch gets imported
   (python -X importtime), and the time to open the widget (which does import it).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def slider_latency(repeats: int) -> list[tuple[str, list[float], float]]:
    os.environ.setdefault("NAPARI_CONFIG", str(Path(tempfile.mkdtemp()) / "napari.yaml"))
    import napari
    import numpy as np
    import torch
    from qtpy.QtWidgets import QApplication

    from napari_apformer.io.formats import read_image_file
    from napari_apformer.model import ModelCard, load_model, save_weights
    from napari_apformer.plugin import widget as widget_module

    torch.set_num_threads(2)
    sample = ROOT / "src/napari_apformer/samples/mni152_t1_axial_slice.nii.gz"
    plane = read_image_file(sample).data[:, :, 0].T  # (y, x)
    pad = [(max(0, (256 - s) // 2), max(0, 256 - s - (256 - s) // 2)) for s in plane.shape]
    image = np.pad(plane, pad)[:256, :256]
    assert image.shape == (256, 256)

    official = Path(tempfile.mkdtemp()) / "official-gray9.safetensors"
    with np.load(ROOT / "tests/data/official_gray9_trimmed.npz") as z:
        state = {k[3:]: torch.from_numpy(z[k]) for k in z.files if k.startswith("sd/")}
    model = load_model(state)
    card = ModelCard.generic("official-gray9", 1, model.n_classes)
    save_weights(model, card, official)

    app = QApplication.instance() or QApplication([])
    viewer = napari.Viewer(show=True)
    viewer.add_image(image, name="slice 256 x 256")
    _, widget = viewer.window.add_plugin_dock_widget("napari-apformer", "APFormer")

    def wait_idle() -> float:
        start = time.perf_counter()
        while widget.busy:
            app.processEvents()
            time.sleep(0.002)
        app.processEvents()
        return time.perf_counter() - start

    def timed(label: str, slider, values: tuple[float, float]) -> None:
        wait_idle()
        times, kept = [], []
        for k in range(repeats):
            started = time.perf_counter()
            slider.value = values[k % 2]  # values[1] is the current value: always a change
            wait_idle()
            times.append(1000 * (time.perf_counter() - started))
            kept.append(widget._last.stats.kept_token_fraction)
        rows.append((label, times, statistics.mean(kept)))

    rows: list = []
    timed("shipped default, threshold slider", widget.token_threshold, (0.7, 0.9))
    widget.token_threshold.value = 1.0  # nothing pruned: the worst case
    timed("shipped default at threshold 1.0, gate slider", widget.gate, (-1.9, -2.0))
    widget.weights_file.value = official
    widget.weights_choice.value = widget_module.OTHER_WEIGHTS
    widget.token_threshold.value = 0.9
    timed("authors' release, threshold slider", widget.token_threshold, (0.7, 0.9))
    viewer.close()
    return rows


STARTUP = """
import os, sys, time, tempfile
os.environ.setdefault("NAPARI_CONFIG", os.path.join(tempfile.mkdtemp(), "napari.yaml"))
import napari
from qtpy.QtWidgets import QApplication
viewer = napari.Viewer(show=True)
viewer.open_sample("napari-apformer", "mni152_slice")
QApplication.processEvents()
print("STARTED", flush=True, file=sys.stderr)
print("TORCH_LOADED", "torch" in sys.modules, flush=True)
started = time.perf_counter()
viewer.window.add_plugin_dock_widget("napari-apformer", "APFormer")
print("WIDGET_SECONDS", time.perf_counter() - started, flush=True)
viewer.close()
"""


def startup() -> tuple[bool, float]:
    """(torch imported during start-up and opening a sample, seconds to open the widget)."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", STARTUP],
        capture_output=True,
        text=True,
        check=True,
    )
    early = done.stderr.split("STARTED")[0].splitlines()
    torch_in_log = any(line.rstrip().endswith("| torch") for line in early)
    values = dict(line.split(maxsplit=1) for line in done.stdout.splitlines() if " " in line)
    return torch_in_log or values["TORCH_LOADED"] == "True", float(values["WIDGET_SECONDS"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPU(s)\n")
    print("Slider change to updated overlays (256 x 256 slice, napari, 2 torch threads)")
    print("| weights | kept tokens | median ms | p90 ms | max ms | runs |")
    print("|---|---|---|---|---|---|")
    for label, times, kept in slider_latency(args.repeats):
        ordered = sorted(times)
        p90 = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
        print(
            f"| {label} | {100 * kept:.0f} % | {statistics.median(times):.0f} | {p90:.0f} "
            f"| {max(times):.0f} | {len(times)} |"
        )
    torch_loaded, widget_seconds = startup()
    print("\nnapari start-up with the plugin (fresh process, -X importtime, sample opened)")
    print("| torch imported at start-up | opening the widget (imports torch) |")
    print("|---|---|")
    print(f"| {'yes' if torch_loaded else 'no'} | {widget_seconds:.1f} s |")


if __name__ == "__main__":
    main()
