"""napari readers and writers: layers placed in scanner millimetres, labels written back on
the source voxels (no display needed)."""

import json
from pathlib import Path

import imageio.v3 as iio
import nibabel as nib
import numpy as np
import pytest
import tifffile

from napari_apformer.errors import InputError
from napari_apformer.plugin import _reader, _writer
from napari_apformer.plugin._reader import get_reader, read_layers
from napari_apformer.plugin.layer_metadata import SourceInfo
from test_io import AFFINES, nifti_file


@pytest.fixture
def notices(monkeypatch):
    shown = []
    monkeypatch.setattr(_reader, "_notify_error", shown.append)
    monkeypatch.setattr(_reader, "_notify_warning", shown.append)
    return shown


def world_of_layer_index(kwargs, index):
    return np.asarray(kwargs["translate"]) + np.asarray(kwargs["scale"]) * np.asarray(index)


@pytest.mark.parametrize("name", [n for n in AFFINES if n != "oblique"])
def test_nifti_layer_sits_at_scanner_millimetres(tmp_path, name, notices):
    path, data, affine = nifti_file(tmp_path, name, AFFINES[name])
    [(layer, kwargs, kind)] = read_layers(str(path))
    assert kind == "image" and kwargs["units"] == ("mm",) * 3 and not notices
    assert kwargs["axis_labels"] == ("z", "y", "x")
    rng = np.random.default_rng(0)
    for _ in range(20):
        voxel = [int(rng.integers(0, s)) for s in data.shape]
        ras = (affine @ [*voxel, 1.0])[:3]  # x = R, y = A, z = S
        index = np.round((ras[::-1] - kwargs["translate"]) / kwargs["scale"]).astype(int)
        assert np.allclose(world_of_layer_index(kwargs, index), ras[::-1], atol=1e-4)
        assert layer[tuple(index)] == data[tuple(voxel)]


def test_oblique_nifti_is_placed_axis_aligned_and_says_so(tmp_path, notices):
    path, data, _ = nifti_file(tmp_path, "oblique", AFFINES["oblique"])
    [(layer, kwargs, _)] = read_layers(str(path))
    assert len(notices) == 1 and "oblique" in notices[0]
    assert sorted(layer.shape) == sorted(data.shape)
    assert sorted(kwargs["scale"]) == pytest.approx(
        sorted(np.linalg.norm(AFFINES["oblique"], axis=0))
    )


@pytest.mark.parametrize("name", list(AFFINES))
def test_labels_written_from_a_nifti_layer_land_on_the_source_voxels(tmp_path, name, notices):
    path, data, _ = nifti_file(tmp_path, name, AFFINES[name])
    [(layer, kwargs, _)] = read_layers(str(path))
    labels = (layer > 500).astype(np.uint8) + (layer > 900)  # a function of the voxel value
    features = {"index": [0, 1, 2], "class": ["background", "mid", "high"]}
    written = _writer.write_nifti(
        str(tmp_path / "out.nii.gz"), labels, {"metadata": kwargs["metadata"], "features": features}
    )
    assert written == [
        str(tmp_path / "out.nii.gz"),
        str(tmp_path / "out.json"),
        str(tmp_path / "out.itksnap.txt"),  # ITK-SNAP's label description
    ]
    out, source = nib.load(written[0]), nib.load(path)
    assert np.array_equal(out.affine, source.affine) and out.shape == data.shape
    assert np.array_equal(np.asarray(out.dataobj), (data > 500).astype(np.uint8) + (data > 900))
    assert int(out.header["sform_code"]) == 4 and int(out.header["qform_code"]) == 1
    assert out.get_data_dtype() == np.uint8
    table = json.loads((tmp_path / "out.json").read_text())["labels"]
    assert [c["name"] for c in table] == ["background", "mid", "high"]


def test_labels_of_the_wrong_shape_are_refused(tmp_path, notices):
    path, _, _ = nifti_file(tmp_path, "LAS", AFFINES["LAS"])
    [(layer, kwargs, _)] = read_layers(str(path))
    with pytest.raises(InputError, match="do not match"):
        _writer.write_nifti(
            str(tmp_path / "x.nii.gz"), np.zeros(layer.shape[::-1], np.uint8), kwargs
        )
    assert not (tmp_path / "x.nii.gz").exists()


@pytest.mark.parametrize("writer", ["write_nifti", "write_png"])
def test_a_sidecar_apformer_did_not_write_is_never_replaced(tmp_path, writer):
    bids = tmp_path / "seg.json"
    bids.write_text('{"RepetitionTime": 2.0}')
    features = {"index": [0, 1], "class": ["background", "lesion"]}
    labels = np.zeros((12, 9), np.uint8)
    with pytest.raises(InputError, match="not written by apformer"):
        getattr(_writer, writer)(str(tmp_path / "seg"), labels, {"features": features})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seg.json"]  # nothing written
    assert bids.read_text() == '{"RepetitionTime": 2.0}'
    [written, *_] = getattr(_writer, writer)(str(tmp_path / "seg"), labels, {})  # no table
    assert Path(written).is_file() and bids.read_text() == '{"RepetitionTime": 2.0}'


def test_labels_without_a_nifti_source_round_trip_through_our_reader(tmp_path, notices):
    labels = np.zeros((5, 12, 9), np.uint8)
    labels[2, 3:7, 1:4] = 3
    attributes = {"scale": (2.5, 0.5, 0.75), "translate": (10.0, -4.0, 3.0)}
    [path, *_] = _writer.write_nifti(str(tmp_path / "seg"), labels, attributes)
    assert path.endswith("seg.nii.gz")
    [(back, kwargs, kind)] = read_layers(path)
    assert kind == "labels" and np.array_equal(back, labels)
    assert kwargs["scale"] == pytest.approx(attributes["scale"])
    assert kwargs["translate"] == pytest.approx(attributes["translate"])


def test_png_and_tiff_writers(tmp_path):
    labels = np.arange(12, dtype=np.uint8).reshape(3, 4) % 3
    [png] = _writer.write_png(str(tmp_path / "a.png"), labels, {})
    assert np.array_equal(iio.imread(png), labels)
    volume = np.stack([labels, labels * 2])
    [tif] = _writer.write_tiff(str(tmp_path / "b.tif"), volume, {})
    assert np.array_equal(tifffile.imread(tif), volume)
    with pytest.raises(InputError, match="2D"):
        _writer.write_png(str(tmp_path / "c.png"), volume, {})
    with pytest.raises(InputError, match="non-negative integers"):
        _writer.write_png(str(tmp_path / "d.png"), labels.astype(float), {})


def test_label_files_open_as_labels_with_their_class_names(tmp_path, notices):
    data = np.zeros((10, 10, 4), np.uint8)
    data[2:5, 2:5] = 2
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "case_seg.nii.gz")
    table = {"labels": [{"value": 2, "name": "tumour", "colour": "#ff0000"}]}
    (tmp_path / "case_seg.json").write_text(json.dumps(table))
    [(_, kwargs, kind)] = read_layers(str(tmp_path / "case_seg.nii.gz"))
    assert kind == "labels" and list(kwargs["features"]["class"]) == ["tumour"]
    nib.save(nib.Nifti1Image(data.astype(np.int16), np.eye(4)), tmp_path / "few_values.nii")
    assert read_layers(str(tmp_path / "few_values.nii"))[0][2] == "labels"
    grey = np.random.default_rng(0).integers(0, 4000, (10, 10, 4)).astype(np.int16)
    nib.save(nib.Nifti1Image(grey, np.eye(4)), tmp_path / "t1.nii")
    assert read_layers(str(tmp_path / "t1.nii"))[0][2] == "image"


def test_4d_nifti_opens_with_volumes_first(tmp_path, notices):
    image = nib.Nifti1Image(np.zeros((8, 9, 10, 3), np.float32), np.diag([-2.0, 2.0, 2.0, 1.0]))
    image.header.set_xyzt_units("mm", "sec")
    image.header["pixdim"][4] = 2.5
    nib.save(image, tmp_path / "bold.nii.gz")
    [(layer, kwargs, _)] = read_layers(str(tmp_path / "bold.nii.gz"))
    assert layer.shape == (3, 10, 9, 8)
    assert kwargs["scale"] == pytest.approx((2.5, 2.0, 2.0, 2.0))
    assert kwargs["axis_labels"] == ("t", "z", "y", "x") and kwargs["units"][0] == "s"
    assert SourceInfo.of(kwargs["metadata"]).series


def test_png_tiff_grey_rgb_16bit(tmp_path, notices):
    rng = np.random.default_rng(0)
    iio.imwrite(tmp_path / "rgb.png", rng.integers(0, 255, (20, 30, 3)).astype(np.uint8))
    iio.imwrite(tmp_path / "deep.png", rng.integers(0, 60000, (20, 30)).astype(np.uint16))
    stack = rng.random((4, 20, 30)).astype(np.float32)
    tifffile.imwrite(tmp_path / "stack.tif", stack, photometric="minisblack")
    [(rgb, kw, kind)] = read_layers(str(tmp_path / "rgb.png"))
    assert kind == "image" and kw["rgb"] and rgb.shape == (20, 30, 3)
    [(deep, kw, kind)] = read_layers(str(tmp_path / "deep.png"))
    assert kind == "image" and deep.dtype == np.uint16 and not kw["rgb"]
    [(stack, kw, kind)] = read_layers(str(tmp_path / "stack.tif"))
    assert stack.shape == (4, 20, 30) and kw["units"] == ("pixel",) * 3


def test_reader_claims_only_what_it_reads_and_never_raises(tmp_path, notices):
    assert get_reader(str(tmp_path / "a.csv")) is None
    assert get_reader([str(tmp_path / "a.png"), str(tmp_path / "b.csv")]) is None
    (tmp_path / "text.png").write_text("not an image")
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2, 2, 2), np.float32), np.eye(4)), tmp_path / "5d.nii")
    for name in ("text.png", "empty.nii.gz", "5d.nii"):
        reader = get_reader(str(tmp_path / name))
        assert reader is not None
        assert reader(str(tmp_path / name)) == [(None,)]  # napari: read, nothing to add
        assert notices[-1].endswith(f"({tmp_path / name})")  # the problem first
    assert "5D" in notices[-1]
