"""Scripts that end without (or before) closing the viewer exit cleanly (issue 19).

Each case runs a short script in a fresh Python, as a script user would, and lets the
interpreter exit: the exit status must be 0 and stderr free of tracebacks, whatever was
closed first and whether a run is still going.
"""

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytest.importorskip("napari")
pytestmark = [
    pytest.mark.gui,
    pytest.mark.slow,
    pytest.mark.skipif(
        not os.environ.get("DISPLAY") and os.environ.get("QT_QPA_PLATFORM") != "offscreen",
        reason="needs an X server (xvfb-run)",
    ),
]

SAMPLE = Path(__file__).parents[1] / "src/napari_apformer/samples/mni152_t1_2mm.nii.gz"
TIMEOUT_S = 300

PRELUDE = """
import sys, time
import numpy as np
import napari
from qtpy.QtWidgets import QApplication

def wait(condition, seconds=240):
    end = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > end:
            sys.exit("timed out")
        QApplication.processEvents()
        time.sleep(0.01)

def dock(viewer):
    return viewer.window.add_plugin_dock_widget("napari-apformer", "APFormer")

viewer = napari.Viewer()
"""

SMALL_VOLUME = """
viewer.add_image(np.random.default_rng(0).normal(size=(6, 48, 40)).astype("float32"))
dock_widget, widget = dock(viewer)
"""

SCRIPTS = {
    # The script: a file opened with the plugin, a volume run, a save, no close.
    "exit_with_viewer_open_after_volume_run_and_save": """
import nibabel as nib
source = nib.load(SAMPLE)  # three axial slices of the shipped sample keep it short
cropped = nib.Nifti1Image(np.asarray(source.dataobj)[:, :, 30:33], source.affine)
nib.save(cropped, TMP + "/t1.nii.gz")
[image] = viewer.open(TMP + "/t1.nii.gz", plugin="napari-apformer")
dock_widget, widget = dock(viewer)
wait(lambda: not widget.busy)
widget.run_volume.clicked.emit()
wait(lambda: not widget.busy)
seg = viewer.layers[image.name + " segmentation"]
seg.save(TMP + "/labels.nii.gz", plugin="napari-apformer")
""",
    "viewer_closed_then_exit": SMALL_VOLUME
    + """
wait(lambda: not widget.busy)
viewer.close()
""",
    "widget_removed_then_exit": SMALL_VOLUME
    + """
wait(lambda: not widget.busy)
viewer.window.remove_dock_widget(dock_widget)
widget.close()
""",
    "exit_during_a_volume_run": SMALL_VOLUME
    + """
widget.start_volume()
wait(lambda: widget._volume_progress is not None)  # the worker has started its slices
assert widget._volume_worker is not None
""",
}


@pytest.mark.parametrize("case", list(SCRIPTS))
def test_script_exits_cleanly(case, tmp_path):
    script = (
        f"SAMPLE = {str(SAMPLE)!r}\nTMP = {str(tmp_path)!r}\n"
        + textwrap.dedent(PRELUDE)
        + SCRIPTS[case]
        + "print('end of script', flush=True)\n"
    )
    path = tmp_path / f"{case}.py"
    path.write_text(script)
    env = {**os.environ, "NAPARI_CONFIG": str(tmp_path / "settings.yaml")}
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, str(path)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    report = (
        f"{case}: exit status {done.returncode} after {time.monotonic() - start:.1f} s\n"
        f"--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"
    )
    assert "end of script" in done.stdout, report
    assert done.returncode == 0, report
    assert "Traceback" not in done.stderr and "RuntimeError" not in done.stderr, report
    if case.startswith("exit_with_viewer_open"):
        assert (tmp_path / "labels.nii.gz").is_file(), report
