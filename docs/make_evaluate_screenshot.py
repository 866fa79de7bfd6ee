"""Save docs/evaluate-panel.png: the "Evaluate against a reference" panel with its table.

    xvfb-run -a -s "-screen 0 1920x1200x24" python docs/make_evaluate_screenshot.py

Opens the 2 mm MNI152 sample volume with its reference tissue labels, segments every axial
slice with the shipped weights (the APFormer widget's "Run on volume"), then evaluates the
segmentation against the reference in the panel (surface Dice at 2 mm) and saves the window.
--panel also saves the evaluation dock alone.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NAPARI_CONFIG", str(Path(tempfile.mkdtemp()) / "napari.yaml"))
os.environ.setdefault("APFORMER_USER_WEIGHTS", tempfile.mkdtemp(prefix="my-weights-"))

import napari
from qtpy.QtWidgets import QApplication

OUT = Path(__file__).parent / "evaluate-panel.png"
SIZE = (1900, 1150)
SHOWN_SLICE = 45


def settle(app, widget, seconds: float = 0.5, limit: float = 1800.0) -> None:
    end, give_up = time.time() + seconds, time.time() + limit
    while (widget.busy or time.time() < end) and time.time() < give_up:
        app.processEvents()
        time.sleep(0.01)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--tolerance", type=float, default=2.0)
    parser.add_argument("--panel", type=Path, default=None, help="also save the dock alone")
    args = parser.parse_args()
    app = QApplication.instance() or QApplication([])
    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(*SIZE)
    image, reference = viewer.open_sample("napari-apformer", "mni152_volume")
    viewer.dims.set_point(0, image.translate[0] + SHOWN_SLICE * image.scale[0])
    widget = viewer.window.add_plugin_dock_widget("napari-apformer", "APFormer")[1]
    settle(app, widget)
    started = time.time()
    widget.start_volume()
    settle(app, widget)
    print(f"volume segmented in {time.time() - started:.0f} s")
    seg = viewer.layers[f"{image.name} segmentation"]
    for layer in list(viewer.layers):  # the image and the segmentation only on the canvas
        layer.visible = layer in (image, seg)
    panel = viewer.window.add_plugin_dock_widget("napari-apformer", "Evaluate against a reference")[
        1
    ]
    panel.prediction.value, panel.reference.value = seg, reference
    panel.tolerance.value = args.tolerance
    panel.evaluate()
    settle(app, panel)
    print(panel.status.value)
    for row in panel.rows:
        print(row)
    viewer.layers.selection.active = seg
    viewer.reset_view()
    settle(app, panel)
    viewer.screenshot(str(args.out), canvas_only=False)
    print(f"wrote {args.out}")
    if args.panel is not None:
        panel.native.grab().save(str(args.panel))
        print(f"wrote {args.panel}")
    viewer.close()


if __name__ == "__main__":
    main()
