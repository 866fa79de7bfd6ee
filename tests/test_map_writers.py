"""The widget's maps (attention, background probability, kept tokens) saved through our
writers: float NIfTI, NRRD and MetaImage on the source image's whole voxel grid, read back by
nibabel and SimpleITK; the slice lands on the source voxels it was computed for and each
cell of the map on the scanner positions it covers. No display needed."""

from __future__ import annotations

from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest

from napari_apformer.errors import InputError
from napari_apformer.plugin import _reader, _writer
from napari_apformer.plugin._reader import read_layers
from napari_apformer.plugin.image_source import image_source
from test_io import AFFINES, nifti_file

CELL = 3  # map cells of 3 x 3 pixels, as the widget's maps are cells of 8 x 8 model pixels
OUTPUT_KEY = "napari_apformer_output"  # plugin.layers' key (imported there with torch)


@pytest.fixture
def notices(monkeypatch):
    shown = []
    monkeypatch.setattr(_reader, "_notify_error", shown.append)
    monkeypatch.setattr(_reader, "_notify_warning", shown.append)
    return shown


def opened(path):
    """(display array, layer keyword arguments) of a file opened with our reader."""
    [(data, kwargs, _)] = read_layers(str(path))
    return data, kwargs


def map_layer(data, kwargs, axis, index, values, role="attention"):
    """The attributes napari hands a writer for a one-slice map layer placed as the widget
    places it (ImageSource.slice_placement), carrying its image's source (layer metadata)."""
    layer = SimpleNamespace(
        name="ct",
        data=data,
        rgb=False,
        multiscale=False,
        scale=kwargs["scale"],
        translate=kwargs["translate"],
        metadata=kwargs["metadata"],
        axis_labels=kwargs["axis_labels"],
        units=kwargs["units"],
    )
    image = image_source(layer)
    scale, translate = image.slice_placement(axis, index)
    plane = np.asarray(values).reshape(image.slice_shape_for_layer(axis))
    metadata = {**kwargs["metadata"], OUTPUT_KEY: role, "value": "x uniform"}
    attributes = {
        "name": f"ct {role}",
        "metadata": metadata,
        "scale": list(scale),
        "translate": list(translate),
        "contrast_limits": [1.0, 4.0],
        "rgb": False,
    }
    return plane, attributes


def cells(shape: tuple[int, int]) -> np.ndarray:
    """A map of CELL x CELL pixel cells, each with its own value (the cell number + 0.5)."""
    rows, cols = -(-shape[0] // CELL), -(-shape[1] // CELL)
    grid = np.arange(rows * cols, dtype=np.float32).reshape(rows, cols) + 0.5
    return np.repeat(np.repeat(grid, CELL, 0), CELL, 1)[: shape[0], : shape[1]]


def without(shape, axis):
    return tuple(n for a, n in enumerate(shape) if a != axis)


@pytest.mark.parametrize("name", list(AFFINES))
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_a_slice_map_lands_on_the_source_voxels_it_was_computed_for(tmp_path, name, axis):
    path, data, _ = nifti_file(tmp_path, name, AFFINES[name])
    shown, kwargs = opened(path)
    index = shown.shape[axis] // 2 - 1
    values = 0.5 * np.take(shown, index, axis=axis)  # a function of each voxel's value
    plane, attributes = map_layer(shown, kwargs, axis, index, values)

    written = _writer.write_map_nifti(str(tmp_path / "map"), plane, attributes)
    assert written == [str(tmp_path / "map.nii.gz")]  # one file, no sidecar
    out, source = nib.load(written[0]), nib.load(path)
    assert np.array_equal(out.affine, source.affine) and out.shape == data.shape
    assert int(out.header["sform_code"]) == 4 and int(out.header["qform_code"]) == 1
    assert out.get_data_dtype() == np.float32
    assert out.header["descrip"].tobytes().startswith(b"ct attention: x uniform")
    assert (float(out.header["cal_min"]), float(out.header["cal_max"])) == (1.0, 4.0)
    voxels = np.asarray(out.dataobj)
    filled = ~np.isnan(voxels)
    assert np.array_equal(voxels[filled], 0.5 * data[filled])  # on the voxels it came from
    assert filled.sum() == plane.size
    planes = [len(np.unique(where)) for where in np.nonzero(filled)]
    assert sorted(planes)[0] == 1  # one plane of the file's voxels; NaN elsewhere


@pytest.mark.parametrize("name", [n for n in AFFINES if n != "oblique"])
def test_each_map_cell_sits_at_the_scanner_positions_it_covers(tmp_path, name):
    """The cells read back by nibabel sit where napari showed them: each voxel's scanner
    position (the file's affine) falls in the shown cell that holds its value."""
    path, _, _ = nifti_file(tmp_path, name, AFFINES[name])
    shown, kwargs = opened(path)
    axis, index = 0, 5
    values = cells(without(shown.shape, axis))
    plane, attributes = map_layer(shown, kwargs, axis, index, values, "background probability")
    [target] = _writer.write_map_nifti(str(tmp_path / "p.nii"), plane, attributes)
    out = nib.load(target)
    voxels = np.asarray(out.dataobj)
    ijk = np.indices(voxels.shape).reshape(3, -1)
    ras = (out.affine @ np.vstack([ijk, np.ones(ijk.shape[1])]))[:3]
    layer_scale, layer_translate = np.asarray(attributes["scale"]), attributes["translate"]
    shown_index = np.rint((ras[::-1].T - layer_translate) / layer_scale).astype(int)  # z, y, x
    on_map = shown_index[:, axis] == 0
    got = voxels.reshape(-1)
    assert np.isnan(got[~on_map]).all()
    rows, cols = [shown_index[on_map, a] for a in range(3) if a != axis]
    assert np.array_equal(got[on_map], values[rows, cols])
    assert len(np.unique(got[on_map])) == len(np.unique(values))  # every cell is there


def test_nrrd_and_metaimage_maps_keep_the_source_geometry(tmp_path, notices):
    sitk = pytest.importorskip("SimpleITK")
    from test_plugin_radiology import _nrrd_layer

    source, shown, kwargs = _nrrd_layer(tmp_path, "LPS")
    axis, index = 2, 3
    values = np.take(shown, index, axis=axis).astype(np.float32) * 2
    plane, attributes = map_layer(shown, kwargs, axis, index, values, "kept dependencies")
    original = sitk.ReadImage(str(source))
    expected = sitk.GetArrayFromImage(original).astype(np.float32) * 2
    for writer, name in ((_writer.write_map_nrrd, "m.nrrd"), (_writer.write_map_mha, "m.mha")):
        [target] = writer(str(tmp_path / name), plane, attributes)
        back = sitk.ReadImage(target)
        assert back.GetOrigin() == original.GetOrigin()
        assert back.GetSpacing() == original.GetSpacing()
        assert back.GetDirection() == original.GetDirection()
        got = sitk.GetArrayFromImage(back)
        assert got.dtype == np.float32
        filled = ~np.isnan(got)
        assert filled.sum() == plane.size
        assert np.array_equal(got[filled], expected[filled])
    assert "kept dependencies" in sitk.ReadImage(str(tmp_path / "m.nrrd")).GetMetaData(
        "apformer_map"
    )


def test_the_kept_token_mask_saves_as_labels_on_the_whole_grid(tmp_path):
    """The kept-token layer is a Labels layer (1 kept, 2 pruned): NIfTI labels on the source
    grid, 0 off its slice, with its class table."""
    path, data, _ = nifti_file(tmp_path, "LAS", AFFINES["LAS"])
    shown, kwargs = opened(path)
    axis, index = 1, 4
    mask = np.where(cells(without(shown.shape, axis)) % 2 > 1, 1, 2).astype(np.uint8)
    plane, attributes = map_layer(shown, kwargs, axis, index, mask, "map:keep")
    attributes["features"] = {"index": [0, 1, 2], "class": ["none", "kept", "not kept"]}
    [target, classes, *_] = _writer.write_nifti(str(tmp_path / "keep.nii.gz"), plane, attributes)
    assert classes.endswith("keep.json")
    out = nib.load(target)
    assert np.array_equal(out.affine, nib.load(path).affine) and out.shape == data.shape
    voxels = np.asarray(out.dataobj)
    assert (voxels > 0).sum() == plane.size
    assert sorted(np.unique(voxels).tolist()) == [0, 1, 2]
    back, _ = opened(target)  # our reader shows it where the mask was shown
    assert np.array_equal(np.take(back, index, axis=axis), mask)


def test_a_whole_image_layer_and_a_4d_volume_map(tmp_path, notices):
    path, data, _ = nifti_file(tmp_path, "permuted", AFFINES["permuted"])
    shown, kwargs = opened(path)
    attributes = {"name": "ct", "metadata": kwargs["metadata"], **_placement(kwargs)}
    [target] = _writer.write_map_nifti(str(tmp_path / "ct.nii.gz"), shown, attributes)
    assert np.array_equal(np.asarray(nib.load(target).dataobj), data.astype(np.float32))

    # a map of one volume of a 4D image: a leading axis of length 1 before z, y, x
    plane, attributes = map_layer(shown, kwargs, 0, 2, np.ones(shown.shape[1:], np.float32))
    [target] = _writer.write_map_nifti(str(tmp_path / "vol.nii.gz"), plane[None], attributes)
    assert (~np.isnan(np.asarray(nib.load(target).dataobj))).sum() == plane.size


def _placement(kwargs):
    return {"scale": list(kwargs["scale"]), "translate": list(kwargs["translate"])}


def test_maps_that_cannot_be_placed_are_refused_before_anything_is_written(tmp_path):
    path, _, _ = nifti_file(tmp_path, "LAS", AFFINES["LAS"])
    shown, kwargs = opened(path)
    plane, attributes = map_layer(shown, kwargs, 0, 3, np.take(shown, 3, axis=0) * 1.0)
    cases = [
        ({"name": "ct attention"}, "carries no source geometry"),  # no source
        ({**attributes, "translate": [0.0, 1.0, 2.0]}, "does not sit on a slice"),  # moved
        ({**attributes, "rgb": True}, "colour"),
    ]
    for bad, message in cases:
        with pytest.raises(InputError, match=message) as error:
            _writer.write_map_nifti(str(tmp_path / "bad.nii.gz"), plane, bad)
        assert "bad.nii.gz" in str(error.value)
    with pytest.raises(InputError, match="do not match the source image"):
        _writer.write_map_nifti(str(tmp_path / "bad.nii.gz"), plane[:, :-1], attributes)
    assert not (tmp_path / "bad.nii.gz").exists()

    # napari confirmed "keep" only: an existing keep.nii.gz is not replaced
    (tmp_path / "keep.nii.gz").write_bytes(b"mine")
    with pytest.raises(InputError, match="already exists"):
        _writer.write_map_nifti(str(tmp_path / "keep"), plane, attributes)
    assert (tmp_path / "keep.nii.gz").read_bytes() == b"mine"


@pytest.mark.gui
def test_the_widget_maps_save_through_napari(viewer, qtbot, tmp_path, small_apformer_weights):
    """A live run's maps, saved with napari's own Save (the writer napari picks for an image
    layer and `.nii.gz`), land on the slice of the source the widget ran on."""
    pytest.importorskip("napari")
    from napari_apformer.plugin.layer_metadata import SourceInfo
    from widget_helpers import PLUGIN, open_widget, output

    path, data, _ = nifti_file(tmp_path, "LAS", AFFINES["LAS"], shape=(40, 36, 6))
    [image] = viewer.open(path, plugin=PLUGIN)
    widget = open_widget(viewer, qtbot, small_apformer_weights)
    index = widget._last.request.index
    for role in ("attention", "background probability"):
        layer = output(viewer, image, role)
        assert SourceInfo.of(layer.metadata) is not None
        viewer.layers.selection = {layer}
        target = tmp_path / f"{role.replace(' ', '_')}.nii.gz"
        saved = viewer.layers.save(str(target), selected=True, plugin=PLUGIN)
        assert saved == [str(target)]
        out, source = nib.load(target), nib.load(path)
        assert np.array_equal(out.affine, source.affine) and out.shape == data.shape
        voxels = np.asarray(out.dataobj)
        filled = ~np.isnan(voxels)
        assert filled.sum() == layer.data.size
        k = np.nonzero(filled.any(axis=(0, 1)))[0]
        assert k.tolist() == [index]  # the axial slice the widget ran on (z along RAS k)
        assert np.allclose(voxels[:, :, index], layer.data[0].T[::-1])  # LAS: x flipped
