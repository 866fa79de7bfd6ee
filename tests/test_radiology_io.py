"""NRRD, MetaImage and DICOM in; NRRD, MetaImage, .seg.nrrd, ITK-SNAP and DICOM SEG out.

Every input is made here (SimpleITK and pynrrd write NRRD/MetaImage, pydicom writes DICOM
series); every output is checked with a reader other than the one that wrote it: pynrrd for
NRRD headers and voxels, a MetaImage header parsed here, nibabel for NIfTI, pydicom and
highdicom for DICOM SEG. Geometry is checked by the scanner position of each voxel.
"""

from __future__ import annotations

import random
import shlex
import subprocess
import sys
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

sitk = pytest.importorskip("SimpleITK")
nrrd = pytest.importorskip("nrrd")
pydicom = pytest.importorskip("pydicom")
hd = pytest.importorskip("highdicom")

from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import (  # noqa: E402
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEGLSLossless,
    MRImageStorage,
    RLELossless,
    generate_uid,
)

from napari_apformer.errors import InputError  # noqa: E402
from napari_apformer.io.dicom import (  # noqa: E402
    is_dicom_source,
    read_dicom,
    read_dicom_folder,
    read_dicom_series,
    scan_dicom,
)
from napari_apformer.io.display import display_array, placement  # noqa: E402
from napari_apformer.io.formats import (  # noqa: E402
    label_suffix_for,
    read_class_table,
    read_image_file,
    source_stem,
    write_label_descriptions,
    write_labels,
)
from napari_apformer.io.label_files import write_dicom_seg  # noqa: E402

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
CLASSES = [
    {"value": 0, "name": "background", "colour": "#000000"},
    {"value": 1, "name": "liver", "colour": "#e6194b"},
    {"value": 2, "name": "spleen", "colour": "#3cb44b"},
    {"value": 3, "name": 'kidney "left"', "colour": "#4363d8"},
]


def _rotation(axis: int, degrees: float) -> np.ndarray:
    a = np.radians(degrees)
    c, s = np.cos(a), np.sin(a)
    i, j = [k for k in range(3) if k != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


# ITK directions (LPS, columns are the voxel axes) for the orientations the NIfTI tests cover.
DIRECTIONS = {
    "LPS": np.eye(3),
    "RAS": np.diag([-1.0, -1.0, 1.0]),
    "LAS": np.diag([1.0, -1.0, 1.0]),
    "permuted": np.array([[0.0, -1.0, 0.0], [0.0, 0.0, 1.0], [-1.0, 0.0, 0.0]]),
    "oblique": _rotation(0, 20) @ _rotation(2, -35) @ np.diag([1.0, -1.0, 1.0]),
}
SPACING = (0.7, 1.3, 2.1)
ORIGIN = (-12.5, 30.25, 7.0)


def _source_image(direction: np.ndarray, shape=(7, 5, 4), seed=0):
    """A float SimpleITK image (size i, j, k = shape) with the given direction."""
    data = np.random.default_rng(seed).random(shape[::-1]).astype(np.float32)  # (k, j, i)
    image = sitk.GetImageFromArray(data)
    image.SetSpacing(SPACING[: len(shape)])
    image.SetOrigin(ORIGIN[: len(shape)])
    image.SetDirection(direction[: len(shape), : len(shape)].ravel())
    return image, data.T  # data in (i, j, k)


def _lps_of_file_voxels(origin, axes, shape) -> np.ndarray:
    """LPS points of all voxels (i, j, k) in C order; axes[n] is the step of index n."""
    index = np.indices(shape).reshape(len(shape), -1).T
    return np.asarray(origin) + index @ np.asarray(axes)


def _canonical_index_of(image, lps: np.ndarray, atol: float = 1e-6) -> np.ndarray:
    """Indices into image.data (RAS voxel order) of scanner points given in LPS, checked to
    fall on voxel centres (within `atol` voxels: DICOM stores positions and cosines as
    decimal strings, here rounded to 1e-6)."""
    geometry = image.nifti
    ras_grid = geometry.affine @ nib.orientations.inv_ornt_aff(
        geometry.reorientation.ornt, geometry.source_shape
    )
    ras = lps @ LPS_TO_RAS.T
    found = np.linalg.solve(ras_grid, np.c_[ras, np.ones(len(ras))].T).T[:, :3]
    index = np.rint(found).astype(int)
    assert np.allclose(found, index, atol=atol)
    return index


def _read_metaimage(path: Path) -> tuple[dict, np.ndarray]:
    """A compressed single-file MetaImage read here from its text header and zlib data:
    (header fields, voxels indexed (i, j, k))."""
    raw = path.read_bytes()
    head, _, data = raw.partition(b"ElementDataFile = LOCAL\n")
    fields = dict(line.split(" = ", 1) for line in head.decode().splitlines())
    size = [int(v) for v in fields["DimSize"].split()]
    dtype = {"MET_UCHAR": np.uint8, "MET_USHORT": np.uint16}[fields["ElementType"]]
    if fields.get("CompressedData") == "True":
        data = zlib.decompress(data)
    voxels = np.frombuffer(data, dtype).reshape(size[::-1]).T
    return fields, voxels


# --- NRRD and MetaImage ---------------------------------------------------------------


@pytest.mark.parametrize("name", DIRECTIONS)
def test_nrrd_reads_into_ras_and_labels_return_in_the_source_geometry(tmp_path, name):
    image, _ = _source_image(DIRECTIONS[name])
    source = tmp_path / "ct.nrrd"
    sitk.WriteImage(image, str(source))

    read = read_image_file(source)
    # pynrrd, independently: every voxel's value is where its scanner position says.
    voxels, header = nrrd.read(str(source))
    assert header["space"] == "left-posterior-superior"
    lps = _lps_of_file_voxels(header["space origin"], header["space directions"], voxels.shape)
    index = _canonical_index_of(read, lps)
    assert np.array_equal(read.data[tuple(index.T)], voxels.reshape(-1))
    axes = np.linalg.norm(read.nifti.affine[:3, :3], axis=0)
    assert sorted(read.spacing) == pytest.approx(sorted(axes))

    labels = (read.data > 0.5).astype(np.uint8) + (read.data > 0.8)
    target = tmp_path / f"ct_seg{label_suffix_for(source)}"
    write_labels(target, labels, read, CLASSES)
    out, out_header = nrrd.read(str(target))
    assert out.dtype == np.uint8 and out.shape == voxels.shape
    assert np.array_equal(out_header["space directions"], header["space directions"])
    assert np.array_equal(out_header["space origin"], header["space origin"])
    expected = (voxels > 0.5).astype(np.uint8) + (voxels > 0.8)
    assert np.array_equal(out, expected)


@pytest.mark.parametrize("name", DIRECTIONS)
def test_metaimage_round_trip_keeps_every_voxel_in_place(tmp_path, name):
    image, data = _source_image(DIRECTIONS[name], seed=1)
    source = tmp_path / "mr.mhd"  # a detached header: labels become a single .mha
    sitk.WriteImage(image, str(source))
    read = read_image_file(source)

    labels = (read.data > 0.5).astype(np.uint8) * 2
    target = tmp_path / f"mr_seg{label_suffix_for(source)}"
    assert target.suffix == ".mha"
    write_labels(target, labels, read)
    fields, out = _read_metaimage(target)
    axes = np.array(fields["TransformMatrix"].split(), float).reshape(3, 3)  # rows: axes
    steps = axes * np.array(fields["ElementSpacing"].split(), float)[:, None]
    offset = np.array(fields["Offset"].split(), float)
    expected_axes = DIRECTIONS[name].T * np.array(SPACING)[:, None]
    assert np.allclose(steps, expected_axes, atol=1e-12)
    assert np.allclose(offset, ORIGIN, atol=1e-12)
    # each label voxel sits at the scanner position of the source voxel it was computed for
    lps = _lps_of_file_voxels(offset, steps, out.shape)
    index = _canonical_index_of(read, lps)
    assert np.array_equal(out.reshape(-1), labels[tuple(index.T)])
    assert np.array_equal(out, (data > 0.5).astype(np.uint8) * 2)


def test_nrrd_written_in_ras_space_by_another_writer(tmp_path):
    """pynrrd writes the header (RAS space, oblique); ITK converts it, we keep it."""
    voxels = np.arange(4 * 3 * 5, dtype=np.int16).reshape(4, 3, 5)
    directions = (_rotation(1, 25) * np.array([0.8, 1.1, 2.5])).T  # rows: axes in RAS
    header = {
        "space": "right-anterior-superior",
        "space directions": directions,
        "space origin": np.array([5.0, -7.0, 11.0]),
        "kinds": ["domain"] * 3,
    }
    source = tmp_path / "ras.nrrd"
    nrrd.write(str(source), voxels, header)
    read = read_image_file(source)
    ras = _lps_of_file_voxels(header["space origin"], directions, voxels.shape)
    index = _canonical_index_of(read, ras @ LPS_TO_RAS.T)  # RAS to LPS: the same flip
    assert np.array_equal(read.data[tuple(index.T)], voxels.reshape(-1))


def test_nifti_labels_from_an_nrrd_source_keep_its_geometry(tmp_path):
    image, _ = _source_image(DIRECTIONS["oblique"], seed=2)
    source = tmp_path / "ct.nrrd"
    sitk.WriteImage(image, str(source))
    read = read_image_file(source)
    labels = (read.data > 0.5).astype(np.uint8)
    write_labels(tmp_path / "ct_seg.nii.gz", labels, read)
    written = nib.load(tmp_path / "ct_seg.nii.gz")
    voxels, header = nrrd.read(str(source))
    lps = _lps_of_file_voxels(header["space origin"], header["space directions"], voxels.shape)
    found = np.linalg.solve(written.affine, np.c_[lps @ LPS_TO_RAS.T, np.ones(len(lps))].T)
    index = np.rint(found.T[:, :3]).astype(int)
    assert np.allclose(found.T[:, :3], index, atol=1e-3)  # NIfTI stores float32 transforms
    out = np.asarray(written.dataobj)
    assert np.array_equal(out[tuple(index.T)], (voxels > 0.5).reshape(-1))


def test_napari_places_an_nrrd_volume_at_its_scanner_position(tmp_path):
    image, _ = _source_image(DIRECTIONS["permuted"], seed=3)
    source = tmp_path / "ct.nrrd"
    sitk.WriteImage(image, str(source))
    read = read_image_file(source)
    shown, where = display_array(read), placement(read)
    voxels, header = nrrd.read(str(source))
    lps = _lps_of_file_voxels(header["space origin"], header["space directions"], voxels.shape)
    zyx = (lps @ LPS_TO_RAS.T)[:, ::-1]  # napari's world is (z, y, x) = (S, A, R)
    index = np.rint((zyx - np.array(where.translate)) / np.array(where.scale)).astype(int)
    assert np.array_equal(shown[tuple(index.T)], voxels.reshape(-1))
    assert not where.oblique


def test_2d_nrrd_round_trip_stays_2d(tmp_path):
    image, data = _source_image(DIRECTIONS["LAS"], shape=(6, 4), seed=4)
    source = tmp_path / "slice.nrrd"
    sitk.WriteImage(image, str(source))
    read = read_image_file(source)
    assert read.data.ndim == 3 and 1 in read.data.shape
    write_labels(tmp_path / "slice_seg.nrrd", (read.data > 0.5).astype(np.uint8), read)
    out, header = nrrd.read(str(tmp_path / "slice_seg.nrrd"))
    assert header["dimension"] == 2
    assert np.array_equal(out, data > 0.5)
    assert np.array_equal(header["space directions"], np.diag([1.0, -1.0]) * SPACING[:2])


def test_bad_nrrd_and_metaimage_files(tmp_path):
    garbage = tmp_path / "garbage.nrrd"
    garbage.write_bytes(b"NRRD0004\nthis is not a header\n")
    with pytest.raises(InputError, match="not a readable NRRD"):
        read_image_file(garbage)
    empty = tmp_path / "empty.mha"
    empty.write_bytes(b"")
    with pytest.raises(InputError, match="empty file"):
        read_image_file(empty)
    vector = tmp_path / "rgb.nrrd"
    sitk.WriteImage(sitk.Image([4, 4, 3], sitk.sitkVectorUInt8, 3), str(vector))
    with pytest.raises(InputError, match="3 values per voxel"):
        read_image_file(vector)
    four_d = tmp_path / "4d.nrrd"
    sitk.WriteImage(sitk.Image([3, 3, 3, 2], sitk.sitkUInt8), str(four_d))
    with pytest.raises(InputError, match="4D data"):
        read_image_file(four_d)
    truncated = tmp_path / "truncated.nrrd"
    sitk.WriteImage(sitk.Image([20, 20, 20], sitk.sitkInt16), str(truncated))
    truncated.write_bytes(truncated.read_bytes()[:-4000])
    with pytest.raises(InputError, match="cannot read the voxel data"):
        read_image_file(truncated)


def test_detached_headers_are_not_written(tmp_path):
    image, _ = _source_image(np.eye(3))
    sitk.WriteImage(image, str(tmp_path / "a.nrrd"))
    read = read_image_file(tmp_path / "a.nrrd")
    with pytest.raises(InputError, match="single files"):
        write_labels(tmp_path / "a_seg.nhdr", np.zeros(read.data.shape, np.uint8), read)


# --- Labels for other viewers -----------------------------------------------------------


def test_seg_nrrd_names_and_colours_segments_for_slicer(tmp_path):
    image, _ = _source_image(DIRECTIONS["oblique"], seed=5)
    sitk.WriteImage(image, str(tmp_path / "ct.nrrd"))
    read = read_image_file(tmp_path / "ct.nrrd")
    labels = np.zeros(read.data.shape, np.uint8)
    labels[read.data > 0.6] = 1
    labels[read.data > 0.9] = 3  # no voxel is class 2: an empty segment
    labels.flat[0] = 7  # a value the class table lacks
    target = tmp_path / "ct_seg.seg.nrrd"
    write_labels(target, labels, read, CLASSES)

    voxels, header = nrrd.read(str(target))
    names = [header[f"Segment{n}_Name"] for n in range(4)]
    assert names == ["liver", "spleen", 'kidney "left"', "class 7"]
    assert "Segment4_ID" not in header
    assert header["Segmentation_MasterRepresentation"] == "Binary labelmap"
    assert header["Segmentation_ReferenceImageExtentOffset"] == "0 0 0"
    for n, (value, colour) in enumerate([(1, "#e6194b"), (2, "#3cb44b"), (3, "#4363d8")]):
        assert header[f"Segment{n}_LabelValue"] == str(value)
        assert header[f"Segment{n}_Layer"] == "0"
        assert header[f"Segment{n}_ID"] == f"Segment_{value}"
        rgb = [float(v) for v in header[f"Segment{n}_Color"].split()]
        assert [round(c * 255) for c in rgb] == [int(colour[k : k + 2], 16) for k in (1, 3, 5)]
        where = np.argwhere(voxels == value)
        extent = (
            " ".join(f"{lo} {hi}" for lo, hi in zip(where.min(0), where.max(0), strict=True))
            if len(where)
            else "0 -1 0 -1 0 -1"
        )
        assert header[f"Segment{n}_Extent"] == extent
    assert header["Segment1_Extent"] == "0 -1 0 -1 0 -1"
    assert read_class_table(target)[1:3] == [
        {"value": 1, "name": "liver", "colour": "#e6194b"},
        {"value": 2, "name": "spleen", "colour": "#3cb44b"},
    ]


def test_itksnap_label_description_beside_nifti_labels(tmp_path):
    labels = np.zeros((3, 3, 3), np.uint8)
    labels[0, 0, 0] = 5
    (path,) = write_label_descriptions(tmp_path / "case_seg.nii.gz", CLASSES, labels)
    assert path.name == "case_seg.itksnap.txt"
    rows = [
        shlex.split(line)
        for line in path.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert all(len(row) == 8 for row in rows)
    table = {int(r[0]): ([int(v) for v in r[1:4]], r[7]) for r in rows}
    assert table == {
        0: ([0, 0, 0], "Clear Label"),
        1: ([230, 25, 75], "liver"),
        2: ([60, 180, 75], "spleen"),
        3: ([67, 99, 216], "kidney 'left'"),
        5: ([128, 128, 128], "class 5"),
    }
    assert [float(r[4]) for r in rows] == [0, 1, 1, 1, 1]


# --- DICOM series -------------------------------------------------------------------------


def make_series(
    folder: Path,
    n: int = 6,
    rows: int = 16,
    cols: int = 12,
    pixel_spacing=(0.7, 0.9),
    step: float = 2.5,
    row_dir=(1.0, 0.0, 0.0),
    col_dir=(0.0, 1.0, 0.0),
    origin=(-40.0, 25.0, 110.0),
    slope: float = 1.0,
    intercept: float = -1024.0,
    number: int = 3,
    description: str = "CT abdomen",
    modality: str = "CT",
    image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
    positions=None,
    seed: int = 0,
    study: str | None = None,
    decimals: int = 6,
    scanning_sequence: str | None = None,
) -> dict:
    """A DICOM series written by pydicom, files and InstanceNumbers shuffled; returns the
    stored pixels per slice in position order with the geometry used."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    row_dir, col_dir = np.asarray(row_dir, float), np.asarray(col_dir, float)
    normal = np.cross(row_dir, col_dir)
    stored = rng.integers(0, 3000, size=(n, rows, cols)).astype(np.int16)
    offsets = [k * step for k in range(n)] if positions is None else positions
    shuffled = list(range(n))
    random.Random(seed).shuffle(shuffled)
    series_uid, frame_uid = generate_uid(), generate_uid()
    study = study or generate_uid()
    sop_class = CTImageStorage if modality == "CT" else MRImageStorage
    files = []
    for k in range(n):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = sop_class
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SOPClassUID = sop_class
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.PatientID, ds.PatientName, ds.PatientSex = "P1", "Test^Patient", "O"
        ds.PatientBirthDate, ds.StudyDate, ds.StudyTime = "19700101", "20240101", "120000"
        ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "A1", ""
        ds.Manufacturer = "test"
        ds.Modality, ds.SeriesNumber, ds.SeriesDescription = modality, number, description
        ds.InstanceNumber = shuffled[k] + 1
        ds.ImageType = list(image_type)
        if scanning_sequence is not None:
            ds.ScanningSequence = scanning_sequence
        position = np.asarray(origin) + offsets[k] * normal
        ds.ImagePositionPatient = [round(float(v), decimals) for v in position]
        ds.ImageOrientationPatient = [round(float(v), 6) for v in (*row_dir, *col_dir)]
        ds.PixelSpacing = list(pixel_spacing)
        ds.SliceThickness = step
        ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, cols, 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        ds.PixelData = stored[k].tobytes()
        path = folder / f"IM{shuffled[k] * 7 % n:04d}_{rng.integers(10**6)}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return {
        "stored": stored,
        "values": stored * slope + intercept,
        "files": files,  # in position order
        "ipp": [np.round(np.asarray(origin) + o * normal, decimals) for o in offsets],
        "row_dir": row_dir,
        "col_dir": col_dir,
        "spacing": pixel_spacing,
        "uid": series_uid,
    }


def _dicom_pixel_lps(made: dict) -> np.ndarray:
    """LPS of every pixel (slice, row, column) in C order, from the DICOM attributes: the
    column index steps along the row direction by PixelSpacing[1], the row index along the
    column direction by PixelSpacing[0]."""
    n, rows, cols = made["stored"].shape
    s, r, c = np.indices((n, rows, cols)).reshape(3, -1)
    ipp = np.asarray(made["ipp"])[s]
    return (
        ipp
        + (c * made["spacing"][1])[:, None] * made["row_dir"]
        + (r * made["spacing"][0])[:, None] * made["col_dir"]
    )


DICOM_ATOL = 1e-3
OBLIQUE_ROW = (np.cos(0.3), np.sin(0.3), 0.0)
OBLIQUE_COL = (-np.sin(0.3) * np.cos(0.2), np.cos(0.3) * np.cos(0.2), -np.sin(0.2))


@pytest.mark.parametrize("slope", [1.0, 0.5])
def test_dicom_series_sorted_by_position_in_hu_with_oblique_geometry(tmp_path, slope):
    made = make_series(tmp_path / "ct", row_dir=OBLIQUE_ROW, col_dir=OBLIQUE_COL, slope=slope)
    image = read_image_file(tmp_path / "ct")
    index = _canonical_index_of(image, _dicom_pixel_lps(made), DICOM_ATOL)
    assert np.array_equal(image.data[tuple(index.T)], made["values"].reshape(-1))
    assert image.data.dtype == (np.float32 if slope != 1.0 else np.int32)
    assert float(image.data.min()) < 0  # Hounsfield units, not stored values
    assert sorted(image.spacing) == pytest.approx(sorted([0.7, 0.9, 2.5]))
    assert placement(image).oblique
    assert source_stem(image) == "ct_s003_CT_abdomen"
    assert label_suffix_for(tmp_path / "ct") == ".nii.gz"


def test_dicom_labels_as_nifti_in_the_series_geometry(tmp_path):
    made = make_series(tmp_path / "ct", row_dir=OBLIQUE_ROW, col_dir=OBLIQUE_COL)
    image = read_image_file(tmp_path / "ct")
    labels = (image.data > 0).astype(np.uint8)
    write_labels(tmp_path / "ct_seg.nii.gz", labels, image)
    written = nib.load(tmp_path / "ct_seg.nii.gz")
    lps = _dicom_pixel_lps(made)
    found = np.linalg.solve(written.affine, np.c_[lps @ LPS_TO_RAS.T, np.ones(len(lps))].T)
    index = np.rint(found.T[:, :3]).astype(int)
    assert np.allclose(found.T[:, :3], index, atol=1e-3)
    out = np.asarray(written.dataobj)
    assert np.array_equal(out[tuple(index.T)], (made["values"] > 0).reshape(-1))
    assert int(written.header["sform_code"]) == 1  # scanner coordinates


@pytest.mark.parametrize("syntax", [JPEGLSLossless, RLELossless], ids=["jpeg-ls", "rle"])
def test_compressed_dicom_reads_like_uncompressed(tmp_path, syntax):
    made = make_series(tmp_path / "ct", n=4)
    for path in made["files"]:
        ds = pydicom.dcmread(path)
        ds.compress(syntax)
        ds.save_as(path)
    assert pydicom.dcmread(made["files"][0]).file_meta.TransferSyntaxUID == syntax
    image = read_image_file(tmp_path / "ct")
    index = _canonical_index_of(image, _dicom_pixel_lps(made), DICOM_ATOL)
    assert np.array_equal(image.data[tuple(index.T)], made["values"].reshape(-1))


def _sr_object(folder: Path) -> None:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    sr = "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sr
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID, ds.StudyInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.SeriesNumber, ds.SeriesDescription = "SR", 99, "report"
    ds.save_as(folder / "report.dcm", enforce_file_format=True)


def test_several_series_in_one_folder_listed_read_and_skipped(tmp_path):
    folder = tmp_path / "study"
    ct = make_series(folder, number=3, description="CT abdomen", seed=1)
    mr = make_series(folder / "sub", number=5, description="T1 axial", modality="MR", seed=2)
    make_series(folder, n=1, number=1, description="scout", seed=3)
    make_series(folder, n=3, number=2, description="topogram", image_type=("ORIGINAL", "LOCALIZER"))
    _sr_object(folder)
    (folder / "notes.txt").write_text("not DICOM")
    assert is_dicom_source(folder)

    scan = scan_dicom(folder)
    listed = {s.number: s for s in scan.series}
    assert sorted(listed) == [1, 2, 3, 5, 99]
    assert [s.number for s in scan.volumes] == [3, 5]
    assert listed[3].label == 'series 3 "CT abdomen" (CT, 6 slices)'
    assert listed[5].modality == "MR" and listed[5].slices == 6
    assert "single slice" in listed[1].skipped
    assert "localizer" in listed[2].skipped
    assert "Comprehensive SR" in listed[99].skipped and "not an image" in listed[99].skipped
    assert [(p.name, why) for p, why in scan.ignored] == [("notes.txt", "not a DICOM file")]
    assert any(line.startswith("skipped series 1") for line in scan.report())

    result = read_dicom_folder(folder)
    assert [source_stem(i) for i in result.images] == [
        "study_s003_CT_abdomen",
        "study_s005_T1_axial",
    ]
    for image, made in zip(result.images, (ct, mr), strict=True):
        index = _canonical_index_of(image, _dicom_pixel_lps(made), DICOM_ATOL)
        assert np.array_equal(image.data[tuple(index.T)], made["values"].reshape(-1))
    assert len(result.problems) == 4  # three skipped series, one ignored file
    with pytest.raises(InputError, match="2 series in one folder"):
        read_dicom(folder)
    assert read_dicom(folder, series_uid=mr["uid"]).data.shape == result.images[1].data.shape


def test_positions_rounded_by_the_scanner_are_still_one_volume(tmp_path):
    """Scanners write positions with few decimals: steps then differ by ~0.01 mm, which is
    no missing slice."""
    made = make_series(tmp_path / "ct", row_dir=OBLIQUE_ROW, col_dir=OBLIQUE_COL, decimals=2)
    image = read_image_file(tmp_path / "ct")
    index = _canonical_index_of(image, _dicom_pixel_lps(made), 0.02)
    assert np.array_equal(image.data[tuple(index.T)], made["values"].reshape(-1))


def test_a_series_spread_over_folders_is_one_series(tmp_path):
    made = make_series(tmp_path / "study" / "a", n=6)
    (tmp_path / "study" / "b").mkdir()
    for path in made["files"][1::2]:
        path.rename(tmp_path / "study" / "b" / path.name)
    scan = scan_dicom(tmp_path / "study")
    assert [s.slices for s in scan.series] == [6]
    image = read_dicom_series(scan.series[0])
    assert image.data.shape == (12, 16, 6)


def test_dicomdir_is_read_through_its_folder(tmp_path):
    from pydicom.fileset import FileSet

    made = make_series(tmp_path / "loose", n=5)
    fileset = FileSet()
    for path in made["files"]:
        fileset.add(pydicom.dcmread(path))
    fileset.write(tmp_path / "media")
    dicomdir = tmp_path / "media" / "DICOMDIR"
    assert dicomdir.is_file() and is_dicom_source(dicomdir)
    image = read_image_file(dicomdir)
    index = _canonical_index_of(image, _dicom_pixel_lps(made), DICOM_ATOL)
    assert np.array_equal(image.data[tuple(index.T)], made["values"].reshape(-1))


def test_inconsistent_series_get_one_clear_line(tmp_path):
    make_series(tmp_path / "gap", positions=[0, 2.5, 5, 10, 12.5, 15])
    with pytest.raises(InputError, match=r"series 3 .*not evenly spaced") as error:
        read_image_file(tmp_path / "gap")
    assert "\n" not in str(error.value)

    make_series(tmp_path / "twice", positions=[0, 0, 2.5, 2.5, 5, 5])
    with pytest.raises(InputError, match="not evenly spaced"):
        read_image_file(tmp_path / "twice")

    made = make_series(tmp_path / "turned")
    ds = pydicom.dcmread(made["files"][2])
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0.8, 0.6]
    ds.save_as(made["files"][2])
    with pytest.raises(InputError, match="2 different orientations"):
        read_image_file(tmp_path / "turned")

    made = make_series(tmp_path / "sizes")
    ds = pydicom.dcmread(made["files"][1])
    ds.Rows = 8
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    ds.save_as(made["files"][1])
    with pytest.raises(InputError, match=r"different sizes \(12 x 8, 12 x 16\)"):
        read_image_file(tmp_path / "sizes")


def test_a_corrupt_file_names_its_series_and_good_series_are_still_read(tmp_path):
    folder = tmp_path / "study"
    broken = make_series(folder, number=4, description="broken", seed=4)
    good = make_series(folder, number=6, description="good", seed=6)
    path = broken["files"][3]
    path.write_bytes(path.read_bytes()[:-100])  # truncated pixel data
    (folder / "junk.dcm").write_bytes(b"\x00" * 128 + b"DICM" + b"\xff" * 50)
    result = read_dicom_folder(folder)
    assert [source_stem(i) for i in result.images] == ["study_s006_good"]
    (problem,) = [p for p in result.problems if "series 4" in p]
    assert path.name in problem and "cannot be read" in problem
    assert any("junk.dcm: ignored: not a readable DICOM file" in p for p in result.problems)
    assert len(result.problems) == 2
    index = _canonical_index_of(result.images[0], _dicom_pixel_lps(good), DICOM_ATOL)
    assert np.array_equal(result.images[0].data[tuple(index.T)], good["values"].reshape(-1))


def test_folders_without_dicom(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no DICOM image series found \\(no files\\)"):
        read_image_file(tmp_path / "empty")
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.dcm").write_text("hello")
    with pytest.raises(InputError, match="1 files, none of them DICOM"):
        read_image_file(tmp_path / "text")
    assert not is_dicom_source(tmp_path / "empty")


def test_dicom_seg_references_the_source_series(tmp_path):
    made = make_series(tmp_path / "ct", row_dir=OBLIQUE_ROW, col_dir=OBLIQUE_COL, n=5)
    image = read_image_file(tmp_path / "ct")
    labels = np.zeros(image.data.shape, np.uint8)
    labels[image.data > 500] = 1
    labels[image.data > 1500] = 3  # class 2 stays empty
    target = tmp_path / "ct_seg.dcm"
    write_dicom_seg(target, labels, image.nifti, CLASSES, image.source)

    ds = pydicom.dcmread(target)
    assert ds.Modality == "SEG" and ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == made["uid"]
    assert ds.FrameOfReferenceUID == pydicom.dcmread(made["files"][0]).FrameOfReferenceUID
    seg = hd.seg.segread(target)
    labels_of = {n: seg.get_segment_description(n).SegmentLabel for n in (1, 2, 3)}
    assert labels_of == {1: "liver", 2: "spleen", 3: 'kidney "left"'}
    uids = [pydicom.dcmread(p).SOPInstanceUID for p in made["files"]]
    pixels = seg.get_pixels_by_source_instance(uids, combine_segments=True)  # slice, row, col
    expected = np.zeros(made["values"].shape, np.uint8)
    expected[made["values"] > 500] = 1
    expected[made["values"] > 1500] = 3
    assert np.array_equal(pixels, expected)


def test_dicom_seg_needs_a_dicom_source(tmp_path):
    image, _ = _source_image(np.eye(3))
    sitk.WriteImage(image, str(tmp_path / "ct.nrrd"))
    read = read_image_file(tmp_path / "ct.nrrd")
    with pytest.raises(InputError, match=r"DICOM SEG needs a DICOM series.*NRRD file"):
        write_dicom_seg(tmp_path / "x.dcm", np.zeros(read.data.shape, np.uint8), read.nifti, None)


# --- Without the radiology extra ----------------------------------------------------------


@pytest.mark.slow
def test_the_core_imports_without_the_radiology_extra():
    code = (
        "import sys\n"
        "for name in ('SimpleITK', 'pydicom', 'highdicom', 'nrrd'):\n"
        "    sys.modules[name] = None\n"
        "import napari_apformer.io.formats, napari_apformer.io.dicom\n"
        "import napari_apformer.io.label_files\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_extra_says_how_to_install_it(tmp_path, monkeypatch):
    image, _ = _source_image(np.eye(3))
    sitk.WriteImage(image, str(tmp_path / "ct.nrrd"))
    make_series(tmp_path / "dicom", n=2)
    monkeypatch.setitem(sys.modules, "SimpleITK", None)
    hint = r"needs `pip install napari-apformer\[radiology\]`"
    with pytest.raises(InputError, match="reading NRRD " + hint):
        read_image_file(tmp_path / "ct.nrrd")
    with pytest.raises(InputError, match="reading DICOM " + hint):
        read_image_file(tmp_path / "dicom")
