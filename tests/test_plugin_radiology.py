"""The napari plugin with NRRD, MetaImage and DICOM: the reader opens them (a DICOM folder as
one layer per series), the writers put labels back in the source's geometry, each output
read back by an independent reader (pynrrd, SimpleITK, pydicom/highdicom)."""

from __future__ import annotations

import numpy as np
import pytest

sitk = pytest.importorskip("SimpleITK")
nrrd = pytest.importorskip("nrrd")
pydicom = pytest.importorskip("pydicom")
hd = pytest.importorskip("highdicom")

from napari_apformer.errors import InputError  # noqa: E402
from napari_apformer.plugin import _reader, _writer  # noqa: E402
from napari_apformer.plugin._reader import get_reader  # noqa: E402
from napari_apformer.plugin.layer_metadata import note_live_plane, note_volume_run  # noqa: E402
from test_radiology_io import DIRECTIONS, _source_image, make_series  # noqa: E402

FEATURES = {"index": [0, 1, 2], "class": ["background", "mid", "high"]}


@pytest.fixture
def notices(monkeypatch):
    shown = []
    monkeypatch.setattr(_reader, "_notify_error", shown.append)
    monkeypatch.setattr(_reader, "_notify_warning", shown.append)
    return shown


@pytest.fixture
def warned(monkeypatch):
    import napari.utils.notifications

    shown = []
    monkeypatch.setattr(napari.utils.notifications, "show_warning", shown.append)
    return shown


def _nrrd_layer(tmp_path, direction="permuted"):
    image, _ = _source_image(DIRECTIONS[direction])
    source = tmp_path / "ct.nrrd"
    sitk.WriteImage(image, str(source))
    reader = get_reader(str(source))
    assert reader is not None
    [(layer, kwargs, kind)] = reader(str(source))
    assert kind == "image" and kwargs["name"] == "ct"
    return source, layer, kwargs


def test_nrrd_labels_written_as_seg_nrrd_and_mha_land_on_the_source_voxels(tmp_path, notices):
    source, layer, kwargs = _nrrd_layer(tmp_path)
    assert not notices
    labels = (layer > 0.5).astype(np.uint8) + (layer > 0.8)  # a function of the voxel value
    attributes = {"metadata": kwargs["metadata"], "features": FEATURES}
    voxels, header = nrrd.read(str(source))
    expected = (voxels > 0.5).astype(np.uint8) + (voxels > 0.8)  # file order (i, j, k)

    written = _writer.write_nrrd(str(tmp_path / "out"), labels, attributes)
    assert written == [str(tmp_path / "out.seg.nrrd"), str(tmp_path / "out.seg.json")]
    out, out_header = nrrd.read(written[0])
    assert np.array_equal(out, expected)
    assert np.array_equal(out_header["space directions"], header["space directions"])
    assert np.array_equal(out_header["space origin"], header["space origin"])
    names = {out_header[f"Segment{n}_Name"] for n in range(2)}
    assert names == {"mid", "high"}

    [mha, _] = _writer.write_mha(str(tmp_path / "out.mha"), labels, attributes)
    back = sitk.ReadImage(mha)
    assert np.array_equal(sitk.GetArrayFromImage(back).T, expected)  # (k, j, i) -> (i, j, k)
    original = sitk.ReadImage(str(source))
    assert back.GetDirection() == original.GetDirection()
    assert back.GetOrigin() == original.GetOrigin()
    assert back.GetSpacing() == original.GetSpacing()

    with pytest.raises(InputError, match="DICOM SEG needs a DICOM series"):
        _writer.write_dicom_seg(str(tmp_path / "x.dcm"), labels, attributes)
    with pytest.raises(InputError, match="do not match"):
        _writer.write_mha(str(tmp_path / "y.mha"), labels[:-1], attributes)
    with pytest.raises(InputError, match="need the geometry"):
        _writer.write_nrrd(str(tmp_path / "z.nrrd"), labels, {})


def test_nifti_writer_adds_the_itksnap_description(tmp_path, notices):
    _, layer, kwargs = _nrrd_layer(tmp_path, "LAS")
    labels = (layer > 0.5).astype(np.uint8)
    written = _writer.write_nifti(
        str(tmp_path / "out.nii.gz"), labels, {"metadata": kwargs["metadata"], "features": FEATURES}
    )
    assert written[-1] == str(tmp_path / "out.itksnap.txt")
    assert '"mid"' in (tmp_path / "out.itksnap.txt").read_text()


def test_dicom_folder_opens_a_layer_per_series_and_writes_dicom_seg(tmp_path, notices):
    study = tmp_path / "study"
    made = make_series(study / "a")
    make_series(study / "b", number=4, description="CT chest", seed=1)
    (study / "notes.txt").write_text("not DICOM")
    reader = get_reader(str(study))
    assert reader is not None
    layers = reader(str(study))
    assert [kwargs["name"] for _, kwargs, _ in layers] == [
        "study_s003_CT_abdomen",
        "study_s004_CT_chest",
    ]
    assert all(kind == "image" for _, _, kind in layers)
    assert len(notices) == 1 and "ignored" in notices[0] and "notes.txt" in notices[0]

    layer, kwargs, _ = layers[0]
    labels = (layer > 500).astype(np.uint8)
    attributes = {"metadata": kwargs["metadata"], "features": FEATURES}
    [target, _] = _writer.write_dicom_seg(str(tmp_path / "seg.dcm"), labels, attributes)
    ds = pydicom.dcmread(target)
    assert ds.Modality == "SEG"
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == made["uid"]
    seg = hd.seg.segread(target)
    uids = [pydicom.dcmread(p).SOPInstanceUID for p in made["files"]]
    pixels = seg.get_pixels_by_source_instance(uids, combine_segments=True)  # slice, row, col
    assert np.array_equal(pixels, (made["values"] > 500).astype(np.uint8))
    assert seg.get_segment_description(1).SegmentLabel == "mid"


def test_dicomdir_and_empty_folders(tmp_path, notices):
    (tmp_path / "empty").mkdir()
    assert get_reader(str(tmp_path / "empty")) is None
    make_series(tmp_path / "ct", n=4)
    (tmp_path / "ct" / "DICOMDIR").write_bytes(b"")  # read through its folder
    reader = get_reader(str(tmp_path / "ct" / "DICOMDIR"))
    assert reader is not None
    [(_, kwargs, _)] = reader(str(tmp_path / "ct" / "DICOMDIR"))
    assert kwargs["name"] == "ct_s003_CT_abdomen"


def test_writers_warn_about_mixed_planes(tmp_path, warned):
    _, layer, kwargs = _nrrd_layer(tmp_path)
    metadata = dict(kwargs["metadata"])
    note_volume_run(metadata, "z")
    note_live_plane(metadata, "y", 2)
    labels = (layer > 0.5).astype(np.uint8)
    for write, name in [
        (_writer.write_nifti, "a.nii.gz"),
        (_writer.write_tiff, "a.tif"),
        (_writer.write_nrrd, "a.nrrd"),
        (_writer.write_mha, "a.mha"),
    ]:
        write(str(tmp_path / name), labels, {"metadata": metadata})
        assert "mixes the z volume run" in warned[-1]
        assert warned[-1].endswith(f"({tmp_path / name})")
    assert len(warned) == 4
    _writer.write_tiff(str(tmp_path / "b.tif"), labels, {"metadata": kwargs["metadata"]})
    assert len(warned) == 4
