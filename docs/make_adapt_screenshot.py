"""Save docs/adapt-panel.png: the widget's "Adapt to this scan" section after a fine-tuning run.

    xvfb-run -a -s "-screen 0 1920x1700x24" python docs/make_adapt_screenshot.py [--steps N]

Opens the 2 mm MNI152 sample volume, segments axial slice 40 with the shipped weights,
"corrects" axial slices 30, 40 and 50 by writing the sample's reference tissue labels into the
segmentation through napari's own label editing (`Labels.data_setitem`, which records an edit
as the brush does), fine-tunes for a few steps (slice 40 held out), and saves the window. The
new weights go to the platform's user weights folder under a temporary home folder (the
widget shows it as ~/...), not the user's own.
--panel also saves the dock widget alone.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NAPARI_CONFIG", str(Path(tempfile.mkdtemp()) / "napari.yaml"))
os.environ["HOME"] = tempfile.mkdtemp(prefix="home-")
os.environ.pop("APFORMER_USER_WEIGHTS", None)
os.environ.pop("XDG_DATA_HOME", None)

import napari
import numpy as np
from qtpy.QtWidgets import QApplication

OUT = Path(__file__).parent / "adapt-panel.png"
SIZE = (1700, 1600)
CORRECTED = (30, 40, 50)
SHOWN_SLICE = 45  # not corrected: the canvas shows the new weights' labels there


def settle(app, widget, seconds: float = 0.5, limit: float = 1800.0) -> None:
    end, give_up = time.time() + seconds, time.time() + limit
    while (widget.busy or time.time() < end) and time.time() < give_up:
        app.processEvents()
        time.sleep(0.01)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--panel", type=Path, default=None, help="also save the dock alone")
    args = parser.parse_args()
    app = QApplication.instance() or QApplication([])
    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(*SIZE)
    image, reference = viewer.open_sample("napari-apformer", "mni152_volume")
    z = image.translate[0]
    viewer.dims.set_point(0, z + CORRECTED[1] * image.scale[0])
    widget = viewer.window.add_plugin_dock_widget("napari-apformer", "APFormer")[1]
    settle(app, widget)
    widget.adapt.toggle.value = True
    seg = viewer.layers[f"{image.name} segmentation"]
    truth = np.asarray(reference.data)
    for s in CORRECTED:
        wrong = np.nonzero(seg.data[s] != truth[s])
        seg.data_setitem((np.full(wrong[0].size, s), *wrong), truth[s][wrong])
    widget.adapt.steps.value = args.steps
    widget.adapt.start_button.clicked.emit()
    settle(app, widget)
    viewer.dims.set_point(0, z + SHOWN_SLICE * image.scale[0])
    settle(app, widget)
    viewer.layers.selection.active = seg
    viewer.reset_view()
    settle(app, widget)
    viewer.screenshot(str(args.out), canvas_only=False)
    print(f"wrote {args.out}")
    print(widget.adapt.status.value.replace("<br>", "\n"))
    if args.panel is not None:
        widget.native.grab().save(str(args.panel))
        print(f"wrote {args.panel}")
    viewer.close()


if __name__ == "__main__":
    main()
