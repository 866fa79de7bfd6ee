"""Readers and writers: labels land on the same voxels and world positions as the source."""

import gzip

import imageio.v3 as iio
import nibabel as nib
import numpy as np
import pytest
import tifffile

from napari_apformer.errors import InputError
from napari_apformer.io.formats import read_image_file, write_labels
from napari_apformer.io.geometry import Reorientation, is_oblique


def rotation(axis: int, degrees: float) -> np.ndarray:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    i, j = [k for k in range(3) if k != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


AFFINES = {
    "RAS": np.diag([1.0, 1.0, 1.0]),
    "LAS": np.diag([-0.8, 1.0, 2.5]),
    "LPS": np.diag([-1.0, -1.0, 1.2]),
    "permuted": np.array([[0.0, 0.0, 2.0], [-1.0, 0.0, 0.0], [0.0, 1.5, 0.0]]),
    "oblique": rotation(2, 20) @ rotation(0, -10) @ np.diag([1.0, 0.9, 2.0]),
}


def nifti_file(tmp_path, name, linear, shape=(20, 24, 16)):
    affine = np.eye(4)
    affine[:3, :3], affine[:3, 3] = linear, [-10.0, 20.0, 5.0]
    data = np.random.default_rng(1).integers(0, 1000, shape).astype(np.int16)
    image = nib.Nifti1Image(data, affine)
    image.set_qform(affine, 1)
    image.set_sform(affine, 4)
    path = tmp_path / f"{name}.nii.gz"
    nib.save(image, path)
    return path, data, affine


@pytest.mark.parametrize("name", list(AFFINES))
def test_nifti_labels_round_trip_onto_the_same_voxels(tmp_path, name):
    path, data, affine = nifti_file(tmp_path, name, AFFINES[name])
    image = read_image_file(path)
    assert nib.aff2axcodes(affine) != ("R", "A", "S") or name in ("RAS", "oblique")
    # A stand-in segmentation that is a function of the voxel value: where it lands is exact.
    labels = (image.data > 500).astype(np.uint8) + (image.data > 900)
    out = tmp_path / "labels.nii.gz"
    write_labels(out, labels, image)
    written, source = nib.load(out), nib.load(path)
    assert np.array_equal(written.affine, source.affine)  # as stored (float32), exactly
    assert np.allclose(written.affine, affine, atol=1e-6)
    assert written.shape == data.shape and written.get_data_dtype() == np.uint8
    assert np.array_equal(np.asarray(written.dataobj), (data > 500).astype(np.uint8) + (data > 900))
    assert int(written.header["sform_code"]) == 4 and int(written.header["qform_code"]) == 1


@pytest.mark.parametrize("name", list(AFFINES))
def test_canonical_order_is_ras_and_spacing_follows(tmp_path, name):
    path, data, affine = nifti_file(tmp_path, name, AFFINES[name])
    image = read_image_file(path)
    reorientation = image.nifti.reorientation
    assert np.array_equal(reorientation.from_canonical(image.data), data)
    # Moving one voxel along canonical axis k moves mostly along world axis k, positively.
    ras_affine = affine @ nib.orientations.inv_ornt_aff(reorientation.ornt, data.shape)
    for k in range(3):
        assert np.argmax(np.abs(ras_affine[:3, k])) == k and ras_affine[k, k] > 0
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(0))
    assert sorted(image.spacing) == pytest.approx(sorted(zooms))
    assert is_oblique(affine) == (name == "oblique")


def test_reorientation_inverse_is_exact():
    data = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    for ornt in ([[2, -1], [0, 1], [1, -1]], [[1, 1], [2, -1], [0, -1]]):
        r = Reorientation(np.array(ornt, dtype=float))
        assert np.array_equal(r.from_canonical(r.to_canonical(data)), data)


def test_nifti_trailing_singleton_and_2d(tmp_path):
    nib.save(nib.Nifti1Image(np.ones((16, 16, 4, 1), np.float32), np.eye(4)), tmp_path / "a.nii")
    assert read_image_file(tmp_path / "a.nii").data.shape == (16, 16, 4)
    nib.save(nib.Nifti1Image(np.ones((16, 12), np.float32), np.eye(4)), tmp_path / "b.nii")
    assert read_image_file(tmp_path / "b.nii").data.shape == (16, 12, 1)


def test_bad_nifti_files(tmp_path):
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    good, _, _ = nifti_file(tmp_path, "good", np.eye(3))
    raw = gzip.decompress(good.read_bytes())
    (tmp_path / "truncated.nii.gz").write_bytes(gzip.compress(raw[: len(raw) // 2]))
    (tmp_path / "cut.nii.gz").write_bytes(good.read_bytes()[:300])
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8, 3), np.float32), np.eye(4)), tmp_path / "4d.nii")
    huge = nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4))
    huge.header.set_data_shape((30000, 30000, 30000))
    (tmp_path / "huge.nii").write_bytes(huge.header.binaryblock + b"\0" * 4 + b"\0" * 32)
    expected = {
        "empty": "empty file",
        "truncated": "truncated",
        "cut": "truncated|readable",
        "4d": "4D",
        "huge": "GiB",
    }
    for name, message in expected.items():
        path = next(tmp_path.glob(f"{name}.nii*"))
        with pytest.raises(InputError, match=message) as error:
            read_image_file(path)
        assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_png_tiff_and_jpeg(tmp_path):
    grey16 = (np.arange(40 * 30).reshape(40, 30) * 50).astype(np.uint16)
    iio.imwrite(tmp_path / "g.png", grey16)
    image = read_image_file(tmp_path / "g.png")
    assert image.data.dtype == np.uint16 and not image.rgb and np.array_equal(image.data, grey16)
    rgba = np.zeros((20, 30, 4), np.uint8)
    iio.imwrite(tmp_path / "c.png", rgba)
    assert read_image_file(tmp_path / "c.png").rgb
    iio.imwrite(tmp_path / "c.jpg", rgba[..., :3])
    assert read_image_file(tmp_path / "c.jpg").rgb
    stack = np.zeros((5, 16, 16), np.float32)
    tifffile.imwrite(tmp_path / "s.tif", stack)
    assert read_image_file(tmp_path / "s.tif").data.shape == (5, 16, 16)
    labels = np.eye(16, dtype=np.uint8) * 3
    write_labels(tmp_path / "l.png", labels, image)
    assert np.array_equal(iio.imread(tmp_path / "l.png"), labels)
    write_labels(tmp_path / "l.tif", np.stack([labels] * 2), image)
    assert np.array_equal(tifffile.imread(tmp_path / "l.tif"), np.stack([labels] * 2))


def test_bad_image_files(tmp_path):
    (tmp_path / "text.png").write_text("this is not a picture")
    (tmp_path / "zero.tif").write_bytes(b"")
    for name, message in {
        "text.png": "not a readable PNG",
        "zero.tif": "empty file",
        "missing.png": "not found",
    }.items():
        with pytest.raises(InputError, match=message):
            read_image_file(tmp_path / name)
    with pytest.raises(InputError, match="unsupported file type"):
        read_image_file(tmp_path / "x.bmp")


def test_written_files_are_complete_or_absent(tmp_path, monkeypatch):
    image = read_image_file(nifti_file(tmp_path, "a", np.eye(3))[0])
    target = tmp_path / "out.nii.gz"

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(nib, "save", fail)
    with pytest.raises(OSError):
        write_labels(target, np.zeros(image.data.shape, np.uint8), image)
    assert list(tmp_path.glob("*out*")) == []
