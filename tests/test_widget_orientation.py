"""The widget and `apformer predict` give the same labels for the same file (issue 12, item 2).

napari shows a NIfTI volume as (z, y, x) = (k, j, i) of its RAS voxel array; the command line
and training give the model the RAS array itself. The widget must feed the model the same
array (each shown slice transposed back), so a volume run saved with the plugin's writer is
the command line's output voxel for voxel, along every slice axis; and a 2D image (PNG, or a
one-slice NIfTI) gives the command line's labels from a live run.
"""

from pathlib import Path

import imageio.v3 as iio
import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("napari")
pytestmark = pytest.mark.gui

from napari_apformer import cli  # noqa: E402
from napari_apformer.plugin import widget as widget_module  # noqa: E402

SAMPLES = Path(widget_module.__file__).parents[1] / "samples"
AXES = ("axial", "coronal", "sagittal")
from widget_helpers import PLUGIN, open_widget, wait_idle  # noqa: E402


def predict(source: Path, out: Path, *options: str) -> np.ndarray:
    assert cli.main(["predict", str(source), "-o", str(out), *options]) == 0
    [written] = [p for p in out.iterdir() if p.suffix not in (".json", ".txt")]
    return read_labels(written)


def read_labels(path: Path) -> np.ndarray:
    if path.name.endswith((".nii", ".nii.gz")):
        return np.asarray(nib.load(path).dataobj)
    return iio.imread(path)


def stored_crop(tmp_path: Path) -> Path:
    """A piece of the MNI sample stored as (A->P, R->L, S) with 2 x 2 x 3 mm voxels: slices
    that are not square along any axis, a voxel order that is not RAS, and spacing that
    changes the letterbox."""
    source = nib.load(SAMPLES / "mni152_t1_2mm.nii.gz")
    ras = np.asarray(source.dataobj)[39:49, 49:61, 40:48]  # (R, A, S) = (10, 12, 8)
    stored = np.ascontiguousarray(np.flip(ras, (0, 1)).transpose(1, 0, 2))  # (P, L, S)
    n_r, n_a, _ = ras.shape
    affine = np.array(
        [
            [0.0, -2.0, 0.0, 2.0 * (n_r - 1) - 40.0],  # j runs right to left
            [-2.0, 0.0, 0.0, 2.0 * (n_a - 1) - 50.0],  # i runs anterior to posterior
            [0.0, 0.0, 3.0, -20.0],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )
    path = tmp_path / "crop.nii.gz"
    nib.save(nib.Nifti1Image(stored, affine), path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("axis", range(3), ids=AXES)
def test_volume_run_saved_equals_apformer_predict(viewer, qtbot, tmp_path, axis):
    path = stored_crop(tmp_path)
    [image] = viewer.open(path, plugin=PLUGIN)
    widget = open_widget(viewer, qtbot)
    widget.axis_choice.value = widget.axis_choice.choices[axis]
    wait_idle(qtbot, widget)
    widget.start_volume()
    wait_idle(qtbot, widget)
    seg = viewer.layers[f"{image.name} segmentation"]
    saved, *_ = seg.save(str(tmp_path / "widget" / "labels.nii.gz"), plugin=PLUGIN)  # + sidecars
    from_widget = read_labels(Path(saved))
    from_cli = predict(path, tmp_path / "cli", "--axis", AXES[axis])
    assert from_widget.shape == from_cli.shape == nib.load(path).shape
    assert len(np.unique(from_cli)) >= 3  # the classes: the comparison means something
    assert np.array_equal(from_widget, from_cli)
    # The live run of the slice on screen agrees with the volume run too.
    index = widget._last.request.index
    plane = [slice(None)] * 3
    plane[axis] = index
    live = widget._last.maps.labels
    assert np.array_equal(live, seg.data[tuple(plane)])


def test_png_live_run_equals_apformer_predict(viewer, qtbot, tmp_path):
    source = np.asarray(nib.load(SAMPLES / "mni152_t1_2mm.nii.gz").dataobj, float)[:, :, 45]
    grey = np.round(255 * source / source.max()).astype(np.uint8)[5:75, :]  # 70 x 98
    path = tmp_path / "slice.png"
    iio.imwrite(path, grey)
    [image] = viewer.open(path, plugin=PLUGIN)
    open_widget(viewer, qtbot)
    seg = viewer.layers[f"{image.name} segmentation"]
    from_cli = predict(path, tmp_path / "cli")
    assert seg.data.shape == from_cli.shape == grey.shape
    assert len(np.unique(from_cli)) == 4
    assert np.array_equal(seg.data, from_cli)


def test_one_slice_nifti_live_run_equals_apformer_predict(viewer, qtbot, tmp_path):
    path = SAMPLES / "mni152_t1_axial_slice.nii.gz"
    [image] = viewer.open(path, plugin=PLUGIN)
    widget = open_widget(viewer, qtbot)
    assert widget._last is not None
    seg = viewer.layers[f"{image.name} segmentation"]
    saved, *_ = seg.save(str(tmp_path / "widget" / "labels.nii.gz"), plugin=PLUGIN)  # + sidecars
    from_cli = predict(path, tmp_path / "cli")
    assert len(np.unique(from_cli)) == 4
    assert np.array_equal(read_labels(Path(saved)), from_cli)
