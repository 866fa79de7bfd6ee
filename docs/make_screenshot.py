"""Save docs/screenshot.png: napari with the APFormer widget docked over the MNI152 sample.

    xvfb-run -a python docs/make_screenshot.py

The viewer shows the 2 mm sample volume on an axial slice, the segmentation (drawn as
outlines here, so that the maps under it stay visible; the widget fills them), the pruned
tokens (shaded blue) and the attention of the query point (cross) in the first transformer
layer, head 1. The T1 is drawn darker than napari's default so that the attention (added on
top) stays readable; the tissue labels that ship with the sample are hidden.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NAPARI_CONFIG", str(Path(tempfile.mkdtemp()) / "napari.yaml"))

import napari
from qtpy.QtWidgets import QApplication

OUT = Path(__file__).parent / "screenshot.png"


def main() -> None:
    app = QApplication.instance() or QApplication([])
    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1500, 900)
    image, reference = viewer.open_sample("napari-apformer", "mni152_volume")
    reference.visible = False
    _, widget = viewer.window.add_plugin_dock_widget("napari-apformer", "APFormer")
    viewer.dims.set_point(0, image.translate[0] + 40 * image.scale[0])  # through the ventricles

    def settle(seconds: float = 0.5) -> None:
        end = time.time() + seconds
        while widget.busy or time.time() < end:
            app.processEvents()
            time.sleep(0.01)

    settle()
    centre = [
        t + s * (n - 1) / 2
        for t, s, n in zip(image.translate, image.scale, image.data.shape, strict=True)
    ]
    widget.set_query((viewer.dims.point[-3], centre[1] + 20.0, centre[2] - 25.0))
    settle()
    widget.attention_layer.value = 1
    settle()
    viewer.layers[f"{image.name} segmentation"].contour = 1
    image.contrast_limits = (0, 2.5 * float(image.data.max()))
    viewer.dims.set_point(0, 1)  # head 1 (0 is the mean over heads)
    viewer.layers.selection.active = image
    viewer.reset_view()
    settle()
    viewer.screenshot(str(OUT), canvas_only=False)
    print(f"wrote {OUT}")
    viewer.close()


if __name__ == "__main__":
    main()
