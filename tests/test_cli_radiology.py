"""`apformer predict` on DICOM folders, DICOMDIRs, NRRD and MetaImage, writing NIfTI (with the
ITK-SNAP label file), NRRD with 3D Slicer segments, MetaImage, DICOM SEG and probability maps.

The model is a one-parameter family defined here whose labels are "normalised intensity above
0.5", and the images hold two grey values only, so the expected labels of every voxel are
known; each output is read back by a reader other than the writer's (nibabel, pynrrd, pydicom
and highdicom) and checked voxel by voxel at the scanner position of the source pixel."""

from __future__ import annotations

import csv
import json
from typing import ClassVar

import nibabel as nib
import numpy as np
import pytest
import torch

sitk = pytest.importorskip("SimpleITK")
nrrd = pytest.importorskip("nrrd")
pydicom = pytest.importorskip("pydicom")
hd = pytest.importorskip("highdicom")

from napari_apformer.cli import main  # noqa: E402
from napari_apformer.model import base  # noqa: E402
from test_cli import ToyNet  # noqa: E402
from test_radiology_io import (  # noqa: E402
    DIRECTIONS,
    LPS_TO_RAS,
    OBLIQUE_COL,
    OBLIQUE_ROW,
    _dicom_pixel_lps,
    _sr_object,
    make_series,
)

HIGH = 2000  # stored value of the bright voxels (the others: 0)
CLASSES = ("background", "liver")


class StepNet(ToyNet):
    """Labels: 1 where the normalised intensity is above 0.5 (the toy's maps and counters)."""

    family = "step"
    variants: ClassVar = {"small": {"hidden": 4}}

    def predict(self, x, want_attention=False, **settings):
        out = super().predict(x, want_attention, **settings)
        grey = x.mean(dim=1, keepdim=True)
        out.logits = torch.cat([0.5 - grey, grey - 0.5], dim=1) * 40
        return out


@pytest.fixture
def step(tmp_path, monkeypatch):
    """StepNet weights (two classes, 'liver' for 1), registered for this test only."""
    from napari_apformer.model import ModelCard, save_weights

    monkeypatch.setitem(base._FAMILIES, StepNet.family, StepNet)
    card = ModelCard.generic("step", 1, 2)
    card.classes[1].name = CLASSES[1]
    path = tmp_path / "weights" / "step.safetensors"
    path.parent.mkdir()
    save_weights(StepNet(1, 2), card, path)
    return path


def two_level(made: dict) -> dict:
    """Rewrite a make_series series with pixels 0 or HIGH (the same bright pixels as its
    upper half); returns `made` with the new stored values and the expected labels."""
    stored = np.where(made["stored"] > 1500, HIGH, 0).astype(np.int16)
    stored[0, 0, 0], stored[0, 0, 1] = 0, HIGH  # both levels in every series
    for k, path in enumerate(made["files"]):
        ds = pydicom.dcmread(path)
        ds.PixelData = stored[k].tobytes()
        ds.save_as(path)
    return {**made, "stored": stored, "expected": (stored > 0).astype(np.uint8)}


def series(folder, **options) -> dict:
    """A two-level series with square pixels (so the engine does not resample them)."""
    return two_level(make_series(folder, pixel_spacing=(0.8, 0.8), **options))


def nifti_at_dicom_pixels(path, made: dict) -> np.ndarray:
    """The NIfTI's values at the scanner position of every DICOM pixel (slice, row, column),
    located with nibabel's affine only."""
    image = nib.load(path)
    lps = _dicom_pixel_lps(made)
    found = np.linalg.solve(image.affine, np.c_[lps @ LPS_TO_RAS.T, np.ones(len(lps))].T).T
    index = np.rint(found[:, :3]).astype(int)
    assert np.allclose(found[:, :3], index, atol=1e-3)
    data = np.asanyarray(image.dataobj)
    return data[tuple(index.T)].reshape(made["stored"].shape + data.shape[3:])


def run(*args) -> int:
    return main([str(a) for a in args])


def err_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


# --- DICOM folders ------------------------------------------------------------------------


@pytest.mark.slow
def test_each_series_of_a_dicom_folder_is_segmented_in_its_geometry(tmp_path, step, capsys):
    study, out = tmp_path / "study", tmp_path / "out"
    ct = series(study, number=3, description="CT abdomen", row_dir=OBLIQUE_ROW, col_dir=OBLIQUE_COL)
    mr = series(study / "mr", number=5, description="T1 axial", modality="MR", seed=2)
    make_series(study, n=3, number=2, description="topogram", image_type=("ORIGINAL", "LOCALIZER"))
    make_series(study, n=1, number=1, description="scout", seed=3)
    make_series(study / "gap", number=7, description="gap", positions=[0, 2.5, 5, 10, 12.5, 15])
    _sr_object(study)

    assert run("predict", study, "-o", out, "--weights", step) == 1  # series 7 failed
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [
            "apformer-stats.csv",
            *(
                f"study_{name}_seg{ending}"
                for name in ("s003_CT_abdomen", "s005_T1_axial")
                for ending in (".nii.gz", ".json", ".itksnap.txt")
            ),
        ]
    )
    for name, made in (("s003_CT_abdomen", ct), ("s005_T1_axial", mr)):
        labels = out / f"study_{name}_seg.nii.gz"
        assert np.array_equal(nifti_at_dicom_pixels(labels, made), made["expected"])
        sidecar = json.loads(labels.with_name(f"study_{name}_seg.json").read_text())
        assert sidecar["source_series"]["series_instance_uid"] == made["uid"]
        assert [c["name"] for c in sidecar["labels"]] == list(CLASSES)
        itksnap = labels.with_name(f"study_{name}_seg.itksnap.txt").read_text()
        assert '"liver"' in itksnap and '"Clear Label"' in itksnap

    err = err_lines(capsys)
    left_out = [line for line in err if "left out" in line and "warning" in line]
    assert any('series 2 "topogram"' in x and "localizer" in x for x in left_out)
    assert any('series 1 "scout"' in x and "single slice" in x for x in left_out)
    assert any("series 99" in x and "not an image" in x for x in left_out)
    [failed] = [line for line in err if line.startswith("apformer: error:")]
    assert 'series 7 "gap"' in failed and "not evenly spaced" in failed
    assert "2 done, 0 skipped (existed), 3 left out, 1 failed of 3 inputs" in "\n".join(err)
    with (out / "apformer-stats.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    statuses = sorted((r["status"], r["input"].split(": ")[-1].split(" (")[0]) for r in rows)
    assert statuses == [
        ("done", 'series 3 "CT abdomen"'),
        ("done", 'series 5 "T1 axial"'),
        ("failed", 'series 7 "gap"'),
        ("skipped", 'series 1 "scout"'),
        ("skipped", 'series 2 "topogram"'),
        ("skipped", 'series 99 "report"'),
    ]

    assert run("predict", study, "-o", out, "--weights", step) == 1  # a rerun skips the done
    assert sum("exists, skipped" in line for line in err_lines(capsys)) == 2


def test_a_dicomdir_and_a_named_output(tmp_path, step):
    from pydicom.fileset import FileSet

    made = series(tmp_path / "loose", n=5)
    fileset = FileSet()
    for path in made["files"]:
        fileset.add(pydicom.dcmread(path))
    fileset.write(tmp_path / "media")
    out = tmp_path / "out"
    assert run("predict", tmp_path / "media" / "DICOMDIR", "-o", out, "--weights", step) == 0
    labels = out / "media_s003_CT_abdomen_seg.nii.gz"
    assert np.array_equal(nifti_at_dicom_pixels(labels, made), made["expected"])

    named = tmp_path / "mine.nii"
    assert run("predict", tmp_path / "media" / "DICOMDIR", "-o", named, "--weights", step) == 0
    assert np.array_equal(nifti_at_dicom_pixels(named, made), made["expected"])
    assert (tmp_path / "mine.itksnap.txt").is_file() and (tmp_path / "mine.json").is_file()


def test_series_of_one_number_and_description_get_distinct_names(tmp_path, step):
    a = series(tmp_path / "cohort" / "p1", seed=1)
    b = series(tmp_path / "cohort" / "p2", seed=2)
    out = tmp_path / "out"
    assert run("predict", tmp_path / "cohort", "-o", out, "--weights", step) == 0
    names = sorted(p.name for p in out.glob("*.nii.gz"))
    assert len(names) == 2 and all(n.startswith("cohort_s003_CT_abdomen_") for n in names)
    for made in (a, b):
        tail = made["uid"].replace(".", "")[-8:]
        [path] = out.glob(f"*_{tail}_seg.nii.gz")
        assert np.array_equal(nifti_at_dicom_pixels(path, made), made["expected"])


def test_dicom_seg_output_references_the_series(tmp_path, step):
    made = series(tmp_path / "ct", n=5, row_dir=OBLIQUE_ROW, col_dir=OBLIQUE_COL)
    out = tmp_path / "out"
    assert run("predict", tmp_path / "ct", "-o", out, "--format", "dcm", "--weights", step) == 0
    target = out / "ct_s003_CT_abdomen_seg.dcm"
    assert sorted(p.name for p in out.iterdir()) == [
        "apformer-stats.csv",
        "ct_s003_CT_abdomen_seg.dcm",
        "ct_s003_CT_abdomen_seg.json",
    ]
    ds = pydicom.dcmread(target)
    assert ds.Modality == "SEG" and ds.ReferencedSeriesSequence[0].SeriesInstanceUID == made["uid"]
    seg = hd.seg.segread(target)
    assert seg.get_segment_description(1).SegmentLabel == "liver"
    uids = [pydicom.dcmread(p).SOPInstanceUID for p in made["files"]]
    pixels = seg.get_pixels_by_source_instance(uids, combine_segments=True)
    assert np.array_equal(pixels, made["expected"])


def test_dicom_seg_of_a_file_that_is_not_dicom_is_refused_before_anything_runs(
    tmp_path, step, capsys
):
    image = sitk.GetImageFromArray(np.zeros((4, 8, 8), np.int16))
    sitk.WriteImage(image, str(tmp_path / "ct.nrrd"))
    for output in (["-o", tmp_path / "x.dcm"], ["-o", tmp_path / "o", "--format", "dcm"]):
        assert run("predict", tmp_path / "ct.nrrd", *output, "--weights", step) == 1
        [line] = err_lines(capsys)
        assert line.startswith("apformer: error: ") and "DICOM SEG (.dcm) needs a DICOM" in line
        assert "ct.nrrd is not one" in line
    assert not (tmp_path / "x.dcm").exists() and not (tmp_path / "o").exists()


def test_a_folder_without_images_or_dicom_is_one_line(tmp_path, step, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hello")
    assert run("predict", tmp_path / "empty", "-o", tmp_path / "o", "--weights", step) == 1
    [line] = err_lines(capsys)
    assert "no readable images" in line and "no DICOM files" in line and "empty" in line


# --- NRRD and MetaImage -------------------------------------------------------------------


def nrrd_source(path, direction="oblique"):
    """A two-level SimpleITK volume (size i, j, k = 9, 8, 10; isotropic, so that no slice
    plane is resampled); returns the expected labels in the file's (i, j, k) order."""
    rng = np.random.default_rng(4)
    data = np.where(rng.random((10, 8, 9)) > 0.5, 1000.0, 0.0).astype(np.float32)  # (k, j, i)
    data[0, 0, :2] = 0.0, 1000.0
    image = sitk.GetImageFromArray(data)
    image.SetSpacing((1.5, 1.5, 1.5))
    image.SetOrigin((-12.5, 30.25, 7.0))
    image.SetDirection(DIRECTIONS[direction].ravel())
    sitk.WriteImage(image, str(path))
    return (data.T > 0).astype(np.uint8)


def test_nrrd_in_and_labels_out_as_seg_nrrd_mha_and_nifti(tmp_path, step):
    source = tmp_path / "ct.nrrd"
    expected = nrrd_source(source)
    _, source_header = nrrd.read(str(source))
    out = tmp_path / "out"
    assert run("predict", source, "-o", out, "--weights", step) == 0
    voxels, header = nrrd.read(str(out / "ct_seg.nrrd"))  # the source's format by default
    assert np.array_equal(voxels, expected)
    assert np.allclose(header["space directions"], source_header["space directions"])
    assert np.allclose(header["space origin"], source_header["space origin"])
    assert header["Segment0_Name"] == "liver" and header["Segment0_LabelValue"] == "1"

    slicer = tmp_path / "ct.seg.nrrd"
    assert run("predict", source, "-o", slicer, "--weights", step) == 0
    voxels, header = nrrd.read(str(slicer))
    assert np.array_equal(voxels, expected) and header["Segment0_Name"] == "liver"
    assert (tmp_path / "ct.seg.json").is_file()

    mha = tmp_path / "ct.mha"
    assert run("predict", source, "-o", mha, "--weights", step) == 0
    read = sitk.ReadImage(str(mha))
    assert np.array_equal(sitk.GetArrayFromImage(read).T, expected)
    original = sitk.ReadImage(str(source))
    assert read.GetDirection() == pytest.approx(original.GetDirection(), abs=1e-9)
    assert read.GetOrigin() == pytest.approx(original.GetOrigin(), abs=1e-9)

    nifti = tmp_path / "ct_labels.nii.gz"
    assert run("predict", source, "-o", nifti, "--weights", step) == 0
    written = nib.load(nifti)
    assert np.array_equal(np.asarray(written.dataobj), expected)  # the file's voxel order
    direction = np.asarray(original.GetDirection()).reshape(3, 3) * original.GetSpacing()
    assert np.allclose(written.affine[:3, :3], LPS_TO_RAS @ direction, atol=1e-5)
    assert (tmp_path / "ct_labels.itksnap.txt").is_file()


def test_metaimage_source_gets_metaimage_labels_and_a_folder_format(tmp_path, step):
    folder = tmp_path / "in"
    folder.mkdir()
    expected = nrrd_source(folder / "a.mha", "permuted")
    out = tmp_path / "out"
    assert run("predict", folder, "-o", out, "--weights", step) == 0
    assert np.array_equal(
        sitk.GetArrayFromImage(sitk.ReadImage(str(out / "a_seg.mha"))).T, expected
    )
    assert run("predict", folder, "-o", out, "--format", "seg.nrrd", "--weights", step) == 0
    voxels, _ = nrrd.read(str(out / "a_seg.seg.nrrd"))
    assert np.array_equal(voxels, expected)


# --- Probabilities ------------------------------------------------------------------------


@pytest.mark.parametrize("stored", ["uint8", "uint16", "float32"])
def test_probabilities_in_the_source_geometry(tmp_path, step, stored):
    made = series(tmp_path / "ct", n=4, row_dir=OBLIQUE_ROW, col_dir=OBLIQUE_COL)
    out = tmp_path / "out"
    args = ["predict", tmp_path / "ct", "-o", out, "--weights", step]
    assert run(*args, "--save-probabilities", stored) == 0
    labels = out / "ct_s003_CT_abdomen_seg.nii.gz"
    probabilities = out / "ct_s003_CT_abdomen_prob.nii.gz"
    image = nib.load(probabilities)
    assert image.shape == (*nib.load(labels).shape, 2)
    assert image.get_data_dtype() == np.dtype(stored)
    assert np.allclose(image.affine, nib.load(labels).affine)
    slope = {"uint8": 1 / 255, "uint16": 1 / 65535, "float32": 1.0}[stored]
    assert image.dataobj.slope == pytest.approx(slope) and image.dataobj.inter == 0
    raw = np.asarray(image.dataobj.get_unscaled())
    assert raw.dtype == np.dtype(stored) and raw.max() == pytest.approx(1 / slope)
    values = nifti_at_dicom_pixels(probabilities, made)  # scaled by nibabel
    assert np.allclose(values.sum(axis=-1), 1.0, atol=2 * slope + 1e-6)
    assert np.array_equal(values.argmax(axis=-1), made["expected"])
    assert np.allclose(image.get_fdata().sum(axis=-1), 1.0, atol=2 * slope + 1e-6)
    sidecar = json.loads((out / "ct_s003_CT_abdomen_seg.json").read_text())
    assert sidecar["probabilities_file"]["name"] == probabilities.name
    assert sidecar["probabilities_file"]["classes"] == list(CLASSES)


def test_probabilities_of_a_2d_image(tmp_path, step):
    import imageio.v3 as iio

    picture = np.zeros((12, 20), np.uint8)
    picture[:, 10:] = 200
    iio.imwrite(tmp_path / "a.png", picture)
    out = tmp_path / "out"
    assert (
        run("predict", tmp_path / "a.png", "-o", out, "--weights", step, "--save-probabilities")
        == 0
    )
    image = nib.load(out / "a_prob.nii.gz")
    assert image.shape == (20, 12, 1, 2) and image.get_data_dtype() == np.uint8
    liver = image.get_fdata()[..., 0, 1].T  # back to (Y, X)
    assert np.array_equal(liver > 0.5, picture > 0)


def test_every_volume_of_a_4d_nifti_or_the_one_asked_for(tmp_path, step, capsys):
    data = np.zeros((10, 12, 6, 3), np.int16)
    for v in range(3):  # a bright box that differs from volume to volume
        data[2 + v : 7 + v, 1 + 2 * v : 9, :, v] = HIGH
    affine = np.array([[0, -1.5, 0, 20], [2.0, 0, 0, -30], [0, 0, 3.0, 5], [0, 0, 0, 1]])
    source = tmp_path / "fmri.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), source)
    out = tmp_path / "out"
    assert run("predict", source, "-o", out, "--weights", step) == 0
    for v in range(3):  # one 3D label file per volume, in the file's geometry
        labels = nib.load(out / f"fmri_vol{v}_seg.nii.gz")
        assert labels.shape == (10, 12, 6) and np.array_equal(labels.affine, affine)
        assert np.array_equal(np.asarray(labels.dataobj), data[..., v] > 0)
        sidecar = json.loads((out / f"fmri_vol{v}_seg.json").read_text())
        assert sidecar["source_volume"] == v
    single = tmp_path / "one.nii.gz"
    assert run("predict", source, "-o", single, "--weights", step, "--volume", 2) == 0
    assert np.array_equal(np.asarray(nib.load(single).dataobj), data[..., 2] > 0)
    capsys.readouterr()
    assert run("predict", source, "-o", tmp_path / "none", "--weights", step, "--volume", 3) == 1
    assert err_lines(capsys) == [
        f"apformer: error: {source}: --volume 3: the file has 3 volumes (0 to 2)"
    ]
    assert not (tmp_path / "none").exists()
