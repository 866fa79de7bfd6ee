"""The widget's live path and napari start-up, measured in a real viewer.

    xvfb-run -a python benchmarks/bench_widget.py [--repeats 20]

1. Slider change to updated overlays: a 256 x 256 slice (the MNI152 sample slice, padded) in
   napari with the widget docked; each change of the token threshold slider is timed from
   setting the slider to the moment every overlay layer holds the new result (the widget is
   idle again). Rows: the shipped default weights moving the threshold; the same at threshold
   1.0 (nothing pruned, the worst case) moving the gate; the authors' released weights
   (tests/data) moving the threshold; then every other shipped family's weights: those with
   a token threshold moving it, those without settings (MobileUtr) rerun by "Run on slice"
   (a whole pass: MobileUtr has no cached split), with the default weights' "Run on slice"
   beside them (its encoder is cached, as for a slider).
2. Under load: 200 threshold changes in quick succession; the longest event-loop stall, how
   many runs they caused, whether the newest value is what is shown, resident memory.
3. napari start-up with the plugin installed, in a fresh process: whether torch gets imported
   (python -X importtime), and the time to open the widget (which does import it).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_live import sample_slice
from napari_apformer.hardware import describe

ROOT = Path(__file__).resolve().parents[1]


def slider_latency(repeats: int, changes: int) -> tuple[list, dict]:
    os.environ.setdefault("NAPARI_CONFIG", str(Path(tempfile.mkdtemp()) / "napari.yaml"))
    import napari
    import numpy as np
    import torch
    from qtpy.QtWidgets import QApplication

    from napari_apformer.model import ModelCard, load_model, save_weights
    from napari_apformer.plugin import widget as widget_module
    from napari_apformer.weights import DEFAULT_WEIGHTS, shipped_weights

    torch.set_num_threads(2)
    image = sample_slice()
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

    def timed(label: str, slider, values: tuple[float, float] = (0, 0)) -> None:
        """`slider` None: press "Run on slice" instead."""
        wait_idle()
        times, kept = [], []
        for k in range(repeats):
            started = time.perf_counter()
            if slider is None:
                widget.run_slice.clicked.emit()
            else:
                slider.value = values[k % 2]  # values[1] is the current value: a change
            wait_idle()
            times.append(1000 * (time.perf_counter() - started))
            stats = widget._last.stats
            kept.append(
                stats.fraction("kept_tokens") if "kept_tokens" in stats.counters else math.nan
            )
        rows.append((label, times, statistics.mean(kept)))

    def slider(name: str):  # the controls are rebuilt when the weights change
        return widget.setting_controls[name].slider

    rows: list = []
    wait_idle()  # the weights load in a worker; their settings make the sliders
    timed("shipped default, threshold slider", slider("token_threshold"), (0.7, 0.9))
    slider("token_threshold").value = 1.0  # nothing pruned: the worst case
    timed("shipped default at threshold 1.0, gate slider", slider("gate"), (-1.9, -2.0))
    widget.weights_file.value = official
    widget.weights_choice.value = widget_module.OTHER_WEIGHTS
    wait_idle()
    slider("token_threshold").value = 0.9
    timed("authors' release, threshold slider", slider("token_threshold"), (0.7, 0.9))
    for name in shipped_weights():
        if name == DEFAULT_WEIGHTS:
            continue
        widget.weights_choice.value = name
        wait_idle()
        if "token_threshold" in widget.setting_controls:
            slider("token_threshold").value = 0.9
            timed(f"{name}, threshold slider", slider("token_threshold"), (0.7, 0.9))
        else:
            timed(f"{name}, Run on slice", None)
    widget.weights_choice.value = DEFAULT_WEIGHTS
    wait_idle()
    slider("token_threshold").value = 0.9
    timed(f"{DEFAULT_WEIGHTS}, Run on slice", None)
    load = under_load(app, widget, wait_idle, changes)
    viewer.close()
    return rows, load


def rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return float("nan")


def under_load(app, widget, wait_idle, changes: int) -> dict:
    """`changes` threshold moves about 2 ms apart, as fast as a dragged slider sends them.

    Responsiveness: a 10 ms QTimer keeps ticking throughout; the largest gap between ticks is
    the longest the viewer did not respond. Memory: resident set before, at the peak (sampled
    at each tick) and after the last result plus 20 more idle runs (caches warm).
    """
    import gc

    import numpy as np
    from qtpy.QtCore import QTimer

    from napari_apformer.weights import DEFAULT_WEIGHTS

    widget.weights_choice.value = DEFAULT_WEIGHTS
    wait_idle()
    threshold = widget.setting_controls["token_threshold"].slider
    threshold.value = 0.9
    wait_idle()
    gc.collect()
    before = rss_mib()
    ticks: list[float] = []
    peak = [before]

    def tick() -> None:
        ticks.append(time.perf_counter())
        peak[0] = max(peak[0], rss_mib())

    timer = QTimer()
    timer.timeout.connect(tick)
    timer.start(10)
    calls = []
    run_live = widget.session.run_live
    widget.session.run_live = lambda request: calls.append(request) or run_live(request)
    values = np.round(np.random.default_rng(0).uniform(0.3, 1.0, changes), 3)
    values[-1] = 0.777  # the newest value, to check what is shown at the end
    started = time.perf_counter()
    for value in values:
        threshold.value = float(value)
        app.processEvents()
        time.sleep(0.002)
    sent = time.perf_counter() - started
    settle = wait_idle()
    timer.stop()
    widget.session.run_live = run_live
    shown = widget._last.settings["token_threshold"]
    for k in range(20):  # keep working: memory must not creep up
        threshold.value = 0.7 + 0.01 * (k % 2)
        wait_idle()
    gc.collect()
    after = rss_mib()
    gaps = np.diff(ticks) * 1000 if len(ticks) > 1 else np.array([float("nan")])
    return {
        "changes": changes,
        "runs": len(calls),
        "sent_s": sent,
        "settle_ms": 1000 * settle,
        "shown": shown,
        "newest": float(values[-1]),
        "max_gap_ms": float(gaps.max()),
        "p99_gap_ms": float(np.percentile(gaps, 99)),
        "rss_before": before,
        "rss_peak": peak[0],
        "rss_after": after,
    }


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
    parser.add_argument("--changes", type=int, default=200, help="for the load test")
    args = parser.parse_args()
    print(f"{describe()}, python {sys.version.split()[0]}\n")
    print("Slider change to updated overlays (256 x 256 slice, napari, 2 torch threads)")
    print("| weights | kept tokens | median ms | p90 ms | max ms | runs |")
    print("|---|---|---|---|---|---|")
    rows, load = slider_latency(args.repeats, args.changes)
    for label, times, kept in rows:
        ordered = sorted(times)
        p90 = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
        print(
            f"| {label} | {'-' if math.isnan(kept) else f'{100 * kept:.0f} %'} "
            f"| {statistics.median(times):.0f} | {p90:.0f} "
            f"| {max(times):.0f} | {len(times)} |"
        )
    print(f"\nUnder load: {load['changes']} threshold changes about 2 ms apart (shipped weights)")
    print(
        "| changes sent in | runs | last result after | shown = newest | longest viewer "
        "stall | p99 stall | RSS before | RSS peak | RSS after (+20 runs) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    print(
        f"| {load['sent_s']:.1f} s | {load['runs']} | {load['settle_ms']:.0f} ms | "
        f"{'yes' if load['shown'] == load['newest'] else 'NO'} | {load['max_gap_ms']:.0f} ms | "
        f"{load['p99_gap_ms']:.0f} ms | {load['rss_before']:.0f} MiB | "
        f"{load['rss_peak']:.0f} MiB | {load['rss_after']:.0f} MiB |"
    )
    torch_loaded, widget_seconds = startup()
    print("\nnapari start-up with the plugin (fresh process, -X importtime, sample opened)")
    print("| torch imported at start-up | opening the widget (imports torch) |")
    print("|---|---|")
    print(f"| {'yes' if torch_loaded else 'no'} | {widget_seconds:.1f} s |")


if __name__ == "__main__":
    main()
