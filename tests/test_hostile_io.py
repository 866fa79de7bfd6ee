"""Hostile files against the readers (issue 12, items 11 to 14 and 16): each file is built
here, small, and must give one line naming the file and the problem, or the right result."""

import gzip
import struct
import zlib
from pathlib import Path

import imageio.v3 as iio
import nibabel as nib
import numpy as np
import pytest
import tifffile
from PIL import Image

from make_bad_corpus import rewrite_header
from napari_apformer.errors import InputError
from napari_apformer.io import memory, nifti
from napari_apformer.io.formats import read_image_file, write_labels
from napari_apformer.plugin import _reader

LAS = np.array([[-1.0, 0, 0, 10], [0, 1.0, 0, -20], [0, 0, 2.0, 5], [0, 0, 0, 1]])


@pytest.fixture
def notices(monkeypatch):
    shown = []
    monkeypatch.setattr(_reader, "_notify_error", shown.append)
    monkeypatch.setattr(_reader, "_notify_warning", shown.append)
    return shown


def refused(path: Path, expect: str) -> str:
    """The one-line InputError for `path`, which must name it and contain `expect`."""
    with pytest.raises(InputError) as error:
        read_image_file(path)
    message = str(error.value)
    assert message.startswith(str(path)) and expect in message and "\n" not in message, message
    return message


def save_nifti(path: Path, data: np.ndarray, sform_code: int = 1, qform_code: int = 1) -> None:
    image = nib.Nifti1Image(data, LAS)
    image.set_sform(LAS, sform_code)
    image.set_qform(LAS, qform_code)
    nib.save(image, path)


def volume(shape=(12, 10, 8)) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 1000, shape).astype(np.int16)


# Item 11: memory -----------------------------------------------------------------------------


def fake_machine(monkeypatch, root: Path, mem_available: int, self_cgroup: str) -> Path:
    """/proc/meminfo, /proc/self/cgroup and /sys/fs/cgroup under `root`; returns the last."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "meminfo").write_text(f"MemTotal: 1 kB\nMemAvailable: {mem_available // 1024} kB\n")
    (root / "cgroup").write_text(self_cgroup)
    monkeypatch.setattr(memory, "MEMINFO", root / "meminfo")
    monkeypatch.setattr(memory, "SELF_CGROUP", root / "cgroup")
    monkeypatch.setattr(memory, "CGROUP_ROOT", root / "sys")
    return root / "sys"


def write_files(folder: Path, files: dict[str, object]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, value in files.items():
        (folder / name).write_text(f"{value}\n")


@pytest.fixture
def cgroup_limit(tmp_path, monkeypatch):
    """Set a cgroup v2 memory limit (nothing used yet) on a machine with 64 GiB available."""

    def limit(max_bytes: int) -> None:
        sys_root = fake_machine(monkeypatch, tmp_path / "machine", 64 * 2**30, "0::/job\n")
        write_files(sys_root / "job", {"memory.max": max_bytes, "memory.current": 0})

    return limit


def test_available_memory_sees_cgroup_v2_and_v1_limits(tmp_path, monkeypatch):
    sys_root = fake_machine(monkeypatch, tmp_path / "v2", 8 * 2**30, "0::/slurm/job7\n")
    write_files(sys_root, {"memory.max": "max", "memory.current": 2**30})
    write_files(sys_root / "slurm", {"memory.max": 4 * 2**30, "memory.current": 3 * 2**30})
    write_files(
        sys_root / "slurm" / "job7",
        {"memory.max": 2**30, "memory.current": 900 * 2**20, "memory.stat": "anon 5\n"},
    )
    with (sys_root / "slurm" / "job7" / "memory.stat").open("a") as stat:
        stat.write(f"inactive_file {48 * 2**20}\n")
    assert memory.available_bytes() == (1024 - 900 + 48) * 2**20  # page cache counts as free
    sys_root = fake_machine(
        monkeypatch, tmp_path / "v1", 8 * 2**30, "5:cpu:/\n4:memory:/docker/abc\n0::/\n"
    )
    no_limit = 9223372036854771712
    write_files(sys_root / "memory", {"memory.limit_in_bytes": 3 * 2**30})
    (sys_root / "memory" / "memory.usage_in_bytes").write_text(f"{2**30}\n")
    write_files(
        sys_root / "memory" / "docker" / "abc",
        {"memory.limit_in_bytes": no_limit, "memory.usage_in_bytes": 2**20},
    )
    assert memory.available_bytes() == 2 * 2**30
    fake_machine(monkeypatch, tmp_path / "none", 8 * 2**30, "0::/\n")
    assert memory.available_bytes() == 8 * 2**30


def test_the_engine_estimate_grows_with_the_slice():
    """A 16384 x 16384 slice (1 GiB of float32) needs about 9 GB, not 48 MiB."""
    assert memory.working_bytes_per_slice(256, 256) < 2 * memory.WORKING_BYTES_PER_SLICE
    assert memory.working_bytes_per_slice(16384, 16384) > 8 * 2**30


def tiled_tiff(path: Path, side: int) -> None:
    """A side x side uint8 TIFF of zlib-compressed zero tiles: a few kB on disk."""
    tiles = (np.zeros((256, 256), np.uint8) for _ in range((side // 256) ** 2))
    tifffile.imwrite(
        path, tiles, shape=(side, side), dtype=np.uint8, tile=(256, 256), compression="zlib"
    )


@pytest.mark.slow
def test_images_are_sized_from_their_header_before_decoding(tmp_path, cgroup_limit):
    Image.new("L", (4000, 4000)).save(tmp_path / "wide.png")
    Image.new("L", (4000, 4000)).save(tmp_path / "wide.jpg")
    tiled_tiff(tmp_path / "tiled.tif", 8192)
    save_nifti(tmp_path / "slice.nii.gz", np.zeros((4096, 4096, 1), np.float32))
    iio.imwrite(tmp_path / "small.png", np.zeros((64, 64), np.uint8))
    cgroup_limit(32 * 2**20)
    for name in ("wide.png", "wide.jpg", "tiled.tif", "slice.nii.gz"):
        message = refused(tmp_path / name, "of memory but only 32 MiB is available")
        assert "reading it needs" in message and "MiB" in message.split("needs")[1]
    assert read_image_file(tmp_path / "small.png").data.shape == (64, 64)


def test_header_extensions_are_capped_before_nibabel_reads_them(tmp_path, notices):
    image = nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), LAS)
    content = bytes(nifti.MAX_EXTENSION_BYTES + 2**20)  # 65 MiB, 300 kB compressed
    image.header.extensions.append(nib.nifti1.Nifti1Extension("comment", content))
    nib.save(image, tmp_path / "extended.nii.gz")
    message = refused(tmp_path / "extended.nii.gz", "header extensions of 65 MiB")
    assert "refusing more than 64 MiB" in message
    # An extension whose size field is negative: nibabel would read the whole file.
    image = nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), LAS)
    image.header.extensions.append(nib.nifti1.Nifti1Extension("comment", b"x" * 24))
    nib.save(image, tmp_path / "negative.nii")
    raw = bytearray((tmp_path / "negative.nii").read_bytes())
    raw[352:356] = struct.pack("<i", -16)
    (tmp_path / "negative.nii").write_bytes(bytes(raw))
    refused(tmp_path / "negative.nii", "corrupt header extension: it says -16 bytes")
    assert _reader.read_layers(str(tmp_path / "extended.nii.gz")) == [(None,)]
    assert len(notices) == 1 and "header extensions" in notices[0]


# Item 12: values and layouts read wrongly ----------------------------------------------------


def test_values_beyond_float32_are_refused(tmp_path):
    data = np.ones((12, 10, 8))
    data[3, 4, 5] = 1e300
    save_nifti(tmp_path / "float64.nii", data)
    refused(tmp_path / "float64.nii", "values reach 1e+300, beyond the float32 range")
    save_nifti(tmp_path / "slope.nii", volume())  # int16 up to 999, slope 1e36: up to 1e39
    rewrite_header(tmp_path / "slope.nii", scl_slope=1e36, scl_inter=0.0)
    refused(tmp_path / "slope.nii", "beyond the float32 range")
    tifffile.imwrite(tmp_path / "float64.tif", data[..., 5])
    refused(tmp_path / "float64.tif", "beyond the float32 range")
    save_nifti(tmp_path / "fine.nii", data.clip(0, 1e30))  # float64 within range: read
    assert read_image_file(tmp_path / "fine.nii").data.max() == pytest.approx(1e30)


def test_cmyk_jpeg_is_read_as_rgb(tmp_path):
    rgb = np.zeros((32, 48, 3), np.uint8)
    rgb[:, :24] = (200, 100, 50)
    rgb[:, 24:] = (20, 40, 220)
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
    image = read_image_file(tmp_path / "cmyk.jpg")
    assert image.rgb and image.data.shape == (32, 48, 3)
    assert np.abs(image.data.astype(int) - rgb).mean() < 6  # not inverted


def test_planar_rgb_tiff_is_one_colour_image(tmp_path):
    planes = np.random.default_rng(0).integers(0, 255, (3, 40, 50), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "planar.tif", planes, photometric="rgb", planarconfig="separate")
    image = read_image_file(tmp_path / "planar.tif")
    assert image.rgb and np.array_equal(image.data, np.moveaxis(planes, 0, -1))


def test_tiff_pages_of_different_sizes_are_refused_and_equal_ones_stacked(tmp_path):
    with tifffile.TiffWriter(tmp_path / "mixed.tif") as tif:
        tif.write(np.zeros((40, 50), np.uint8))
        tif.write(np.ones((30, 20), np.uint8))
    refused(tmp_path / "mixed.tif", "holds 2 images of different sizes (30 x 20, 40 x 50)")
    with tifffile.TiffWriter(tmp_path / "pages.tif") as tif:
        tif.write(np.zeros((40, 50), np.uint8))
        tif.write(np.ones((40, 50), np.uint8))
    data = read_image_file(tmp_path / "pages.tif").data
    assert data.shape == (2, 40, 50) and data[1].all() and not data[0].any()


def test_complex_pixels_are_refused(tmp_path, notices):
    save_nifti(tmp_path / "complex.nii", volume().astype(np.complex64))
    refused(tmp_path / "complex.nii", "unsupported voxel type complex64")
    tifffile.imwrite(tmp_path / "complex.tif", np.ones((20, 30), np.complex64))
    refused(tmp_path / "complex.tif", "unsupported pixel type complex64")
    assert _reader.read_layers(str(tmp_path / "complex.nii")) == [(None,)]
    assert len(notices) == 1 and "complex64" in notices[0]


# Item 13: transforms and voxel sizes ---------------------------------------------------------

BAD_SFORMS = {
    "nan": np.full((3, 4), np.nan),
    "inf": np.full((3, 4), np.inf),
    "zero": np.zeros((3, 4)),
    "rank-2": np.array([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [1.0, 1.0, 0, 0]]),
}


def with_sform(path: Path, rows: np.ndarray, qform_code: int = 1) -> np.ndarray:
    data = volume()
    save_nifti(path, data, qform_code=qform_code)
    rewrite_header(path, srow_x=rows[0], srow_y=rows[1], srow_z=rows[2])
    return data


@pytest.mark.parametrize("name", list(BAD_SFORMS))
def test_a_broken_sform_falls_back_to_the_qform(tmp_path, name, notices):
    path = tmp_path / f"{name}.nii"
    data = with_sform(path, BAD_SFORMS[name])
    image = read_image_file(path)
    assert len(image.notes) == 1 and "using the qform instead" in image.notes[0]
    assert np.allclose(image.nifti.affine, LAS)
    assert np.array_equal(image.nifti.reorientation.from_canonical(image.data), data)
    write_labels(tmp_path / "labels.nii", (image.data > 500).astype(np.uint8), image)
    labels = nib.load(tmp_path / "labels.nii")
    assert np.array_equal(np.asarray(labels.dataobj), (data > 500).astype(np.uint8))
    assert int(labels.header["sform_code"]) == 0 and int(labels.header["qform_code"]) == 1
    assert np.allclose(labels.affine, LAS)
    [(_, _, kind)] = _reader.read_layers(str(path))
    assert kind == "image" and len(notices) == 1 and "using the qform instead" in notices[0]
    assert notices[0].endswith(f"({path})")  # the problem first, the file after it


def no_valid_transform(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    files = {}
    for name in ("nan", "rank-2"):
        path = tmp_path / f"{name}_sform_only.nii"
        with_sform(path, BAD_SFORMS[name], qform_code=0)
        files[name] = (path, "the sform holds" if name == "nan" else "rank 2 of 3")
    path = tmp_path / "nan_qform_only.nii"
    save_nifti(path, volume(), sform_code=0)
    rewrite_header(path, quatern_b=np.nan)
    files["nan qform"] = (path, "the qform holds values that are not finite")
    path = tmp_path / "not_a_rotation.nii"
    save_nifti(path, volume(), sform_code=0)
    rewrite_header(path, quatern_b=1.0, quatern_c=1.0, quatern_d=1.0)
    files["quaternion"] = (path, "the qform cannot be computed")
    path = tmp_path / "both.nii"
    with_sform(path, BAD_SFORMS["inf"])
    rewrite_header(path, quatern_c=np.inf)
    files["both"] = (path, "the sform holds values that are not finite (NaN or inf) and the qform")
    path = tmp_path / "nan_pixdim.nii"
    save_nifti(path, volume())
    rewrite_header(path, pixdim=[1.0, np.nan, 1.0, 2.0, 1.0, 1.0, 1.0, 1.0])
    files["pixdim"] = (path, "voxel sizes (pixdim) nan x 1 x 2 are not finite")
    return files


def test_no_usable_transform_or_voxel_size_is_one_line_everywhere(tmp_path, notices):
    for path, expect in no_valid_transform(tmp_path).values():
        refused(path, expect)
        notices.clear()
        assert _reader.read_layers(str(path)) == [(None,)]
        assert len(notices) == 1 and notices[0].endswith(f"({path})") and expect in notices[0]


# Item 14: valid gzip files that the size check refused ---------------------------------------


def test_multi_member_and_zero_padded_gzip_load(tmp_path):
    data = volume((40, 30, 20))
    save_nifti(tmp_path / "plain.nii", data)
    raw = (tmp_path / "plain.nii").read_bytes()
    chunks = [raw[i : i + 8192] for i in range(0, len(raw), 8192)]  # bgzip: blocks + empty
    members = b"".join(gzip.compress(c, mtime=0) for c in [*chunks, b""])
    (tmp_path / "bgzip.nii.gz").write_bytes(members)
    (tmp_path / "padded.nii.gz").write_bytes(gzip.compress(raw, mtime=0) + b"\0" * 4096)
    for name in ("bgzip.nii.gz", "padded.nii.gz"):
        image = read_image_file(tmp_path / name)
        assert np.array_equal(image.nifti.reorientation.from_canonical(image.data), data)


def over_4_gib_of_zeros(path: Path) -> int:
    """A valid one-member .nii.gz of 2048 x 2048 x 1025 uint8 zeros (4 GiB + 4 MiB, so the
    trailer's size field wraps to 4 MiB + 352) in about 4 MB, built in two seconds."""
    header = nib.Nifti1Header()
    header.set_data_dtype(np.uint8)
    header.set_data_shape((2048, 2048, 1025))
    header.set_sform(np.eye(4), 1)
    header["vox_offset"] = 352
    head = header.binaryblock + b"\0" * 4
    chunk, chunks = bytes(2**22), 1025  # zeros after the header, 4 MiB at a time
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    # After a full flush the same input compresses to the same bytes: compress it once.
    block = compressor.compress(chunk) + compressor.flush(zlib.Z_FULL_FLUSH)
    crc = zlib.crc32(head)
    for _ in range(chunks):
        crc = zlib.crc32(chunk, crc)
    size = len(head) + chunks * len(chunk)
    with path.open("wb") as f:
        f.write(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff")  # gzip member header
        first = zlib.compressobj(9, zlib.DEFLATED, -15)
        f.write(first.compress(head) + first.flush(zlib.Z_FULL_FLUSH))
        for _ in range(chunks):
            f.write(block)
        f.write(compressor.flush(zlib.Z_FINISH))
        f.write(struct.pack("<II", crc, size % 2**32))
    return size


@pytest.mark.slow
def test_a_volume_over_4_gib_is_not_called_truncated(tmp_path, cgroup_limit):
    path = tmp_path / "big.nii.gz"
    size = over_4_gib_of_zeros(path)
    assert path.stat().st_size < 2**29 and size > 2**32
    assert struct.unpack("<I", path.read_bytes()[-4:])[0] == size % 2**32
    image = nib.load(path)
    assert image.shape == (2048, 2048, 1025)
    cgroup_limit(64 * 2**30)
    nifti._check_payload(path, image)  # the check before reading: no "truncated"
    cgroup_limit(2**30)  # and memory, not the size field, decides
    with pytest.raises(InputError, match=r"needs 4\.0 GiB of memory but only 1\.0 GiB"):
        nifti._check_payload(path, image)


def test_a_truncated_gzip_is_still_called_truncated(tmp_path):
    save_nifti(tmp_path / "plain.nii", np.random.default_rng(0).random((64, 64, 64)))
    raw = (tmp_path / "plain.nii").read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(gzip.compress(raw, mtime=0)[: len(raw) // 4])
    (tmp_path / "short.nii.gz").write_bytes(gzip.compress(raw[: len(raw) // 3], mtime=0))
    for name in ("cut.nii.gz", "short.nii.gz"):
        refused(tmp_path / name, "truncated")
    header = nib.Nifti1Header()  # claims 4 GiB in 1 kB: more than deflate can expand to
    header.set_data_shape((1024, 1024, 1024))
    header.set_data_dtype(np.float32)
    header.set_sform(np.eye(4), 1)
    header["vox_offset"] = 352
    (tmp_path / "claims.nii.gz").write_bytes(gzip.compress(header.binaryblock + bytes(500)))
    refused(tmp_path / "claims.nii.gz", "truncated: the header needs 4294967648 bytes, more than")


# Item 16: the napari reader ------------------------------------------------------------------

BAD_SIDECARS = {
    "overflow": '{"labels": [{"value": 1e999, "name": "x", "colour": "#ff0000"}]}',
    "nested": '{"labels": ' + "[" * 100_000 + "]" * 100_000 + "}",
    "negative": '{"labels": [{"value": -1, "name": "x", "colour": "#ff0000"}]}',
    "not json": '{"labels": [',
}


@pytest.mark.parametrize("name", list(BAD_SIDECARS))
def test_a_bad_sidecar_is_ignored_with_a_warning(tmp_path, name, notices):
    labels = np.zeros((10, 10, 4), np.uint8)
    labels[2:5, 2:5] = 2
    save_nifti(tmp_path / "case_seg.nii.gz", labels)
    (tmp_path / "case_seg.json").write_text(BAD_SIDECARS[name])
    [(data, kwargs, kind)] = _reader.read_layers(str(tmp_path / "case_seg.nii.gz"))
    assert kind == "labels" and "features" not in kwargs and data.max() == 2
    assert len(notices) == 1 and notices[0].endswith(f"({tmp_path / 'case_seg.json'})")
    assert "ignored" in notices[0] and "\n" not in notices[0]


def test_a_sidecar_that_is_not_a_class_table_is_ignored_quietly(tmp_path, notices):
    save_nifti(tmp_path / "case_seg.nii.gz", np.eye(8, dtype=np.uint8)[..., None] * 3)
    (tmp_path / "case_seg.json").write_text('{"RepetitionTime": 2.0}')  # BIDS metadata
    [(_, _, kind)] = _reader.read_layers(str(tmp_path / "case_seg.nii.gz"))
    assert kind == "labels" and not notices


def test_label_values_no_label_layer_can_hold_open_as_an_image(tmp_path, notices):
    data = np.zeros((10, 10, 4), np.float32)
    data[2:5, 2:5] = 1e23
    save_nifti(tmp_path / "huge_seg.nii.gz", data)
    [(layer, _, kind)] = _reader.read_layers(str(tmp_path / "huge_seg.nii.gz"))
    assert kind == "image" and float(layer.max()) == pytest.approx(1e23)
    assert len(notices) == 1 and "label values up to 1e+23" in notices[0]
    data[2:5, 2:5] = 70_000  # whole numbers a uint32 layer holds
    save_nifti(tmp_path / "big_seg.nii.gz", data)
    [(layer, _, kind)] = _reader.read_layers(str(tmp_path / "big_seg.nii.gz"))
    assert kind == "labels" and layer.dtype == np.uint32 and layer.max() == 70_000
    assert len(notices) == 1  # no new notice
