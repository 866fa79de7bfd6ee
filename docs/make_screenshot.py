"""Save docs/screenshot.png: napari with the APFormer widget docked over the MNI152 sample.

    xvfb-run -a -s "-screen 0 1920x1200x24" python docs/make_screenshot.py [--more DIR]
        [--weights NAME --out docs/screenshot-NAME.png]

The viewer shows the 2 mm sample volume on an axial slice through the ventricles as the
widget leaves it by default: the segmentation drawn as outlines (while the attention shows),
the pruned tokens shaded green, and the attention of the query point (cyan cross) in the
first transformer layer, mean of the heads, in multiples of uniform attention with its colour
bar; the sample's reference labels are hidden. The dock shows what the weights are for, the
background-probability distribution under the token threshold and the read-out.

--more DIR also saves, into DIR: attention_head.png (the canvas with one head on its own
colour scale), readout.png (the dock after a rerun at gate 0 from the encoder cache) and
4d.png (a 4D file with 2 s between volumes, on its third volume).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NAPARI_CONFIG", str(Path(tempfile.mkdtemp()) / "napari.yaml"))
# The widget's defaults, not the choices this machine's user made last (settings_store).

import napari
import nibabel as nib
import numpy as np
from qtpy.QtWidgets import QApplication

OUT = Path(__file__).parent / "screenshot.png"
SAMPLES = Path(__file__).parents[1] / "src/napari_apformer/samples"
SIZE = (1800, 1050)


def open_viewer(app):
    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(*SIZE)
    app.processEvents()
    return viewer


def dock(viewer):
    return viewer.window.add_plugin_dock_widget("napari-apformer", "APFormer")[1]


def settle(app, widget, seconds: float = 0.5) -> None:
    end = time.time() + seconds
    while widget.busy or time.time() < end:
        app.processEvents()
        time.sleep(0.01)


def default_view(app, out: Path, more: Path | None, weights: str | None = None) -> None:
    viewer = open_viewer(app)
    image, _reference = viewer.open_sample("napari-apformer", "mni152_volume")
    viewer.dims.set_point(0, image.translate[0] + 40 * image.scale[0])  # the ventricles
    widget = dock(viewer)
    settle(app, widget)
    if weights is not None:  # another family: its segmentation and attention, same slice
        widget.weights_choice.value = weights
        settle(app, widget, 2.0)
    viewer.layers.selection.active = image
    viewer.reset_view()
    settle(app, widget)
    viewer.screenshot(str(out), canvas_only=False)
    print(f"wrote {out}")
    if more is not None:
        widget.attention_head.value = "head 3"
        settle(app, widget)
        viewer.screenshot(str(more / "attention_head.png"), canvas_only=True)
        widget.setting_controls["gate"].slider.value = 0.0  # a rerun from the cache
        settle(app, widget)
        widget.native.grab().save(str(more / "readout.png"))
        print(f"wrote {more / 'attention_head.png'} and {more / 'readout.png'}")
    viewer.close()


def four_d(app, more: Path) -> None:
    """Three volumes, 2 s apart, of the sample brain (brighter each time)."""
    source = nib.load(SAMPLES / "mni152_t1_2mm.nii.gz")
    t1 = np.asarray(source.dataobj, np.float32)
    series = np.stack([t1 * (1.0 + 0.2 * k) for k in range(3)], axis=-1)
    image4d = nib.Nifti1Image(series, source.affine)
    image4d.header.set_xyzt_units("mm", "msec")
    image4d.header["pixdim"][4] = 2000.0
    path = Path(tempfile.mkdtemp()) / "series.nii.gz"
    nib.save(image4d, path)
    viewer = open_viewer(app)
    [image] = viewer.open(path, plugin="napari-apformer")
    viewer.dims.set_point(1, image.translate[1] + 40 * image.scale[1])
    widget = dock(viewer)
    settle(app, widget)
    viewer.dims.set_point(0, 2 * 2000.0)  # the third volume
    settle(app, widget)
    viewer.layers.selection.active = image
    viewer.reset_view()
    settle(app, widget)
    viewer.screenshot(str(more / "4d.png"), canvas_only=False)
    print(f"wrote {more / '4d.png'} (time steps {viewer.dims.nsteps[0]})")
    viewer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--more", type=Path, default=None, help="folder for more screenshots")
    parser.add_argument("--weights", default=None, help="weights to select after docking")
    args = parser.parse_args()
    app = QApplication.instance() or QApplication([])
    if args.more is not None:
        args.more.mkdir(parents=True, exist_ok=True)
    default_view(app, args.out, args.more, args.weights)
    if args.more is not None:
        four_d(app, args.more)


if __name__ == "__main__":
    main()
