"""Build the corpus of bad and odd inputs in tests/data/bad/ (python tests/make_bad_corpus.py).

Every file is made here from code, never by hand. CASES says what each must do:
"reject" (a one-line message containing `expect`) or "accept" (segmented; `expect` is what
must hold). Tests read CASES, so a new case is one entry here.
"""

from __future__ import annotations

import gzip
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import imageio.v3 as iio
import nibabel as nib
import numpy as np
import tifffile
from PIL import Image

CORPUS = Path(__file__).parent / "data" / "bad"
RAS_1MM = np.diag([1.0, 1.0, 1.0, 1.0])


def _head(shape: tuple[int, ...] = (24, 28, 20)) -> np.ndarray:
    """A smooth blob on a dark background: something a segmenter can run on."""
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    radius = np.sqrt(sum(g**2 for g in grids))
    return (1000 * np.clip(1.2 - radius, 0, 1)).astype(np.float32)


def _nifti(data: np.ndarray, affine: np.ndarray = RAS_1MM) -> nib.Nifti1Image:
    image = nib.Nifti1Image(data, affine)
    image.set_qform(affine, 1)
    image.set_sform(affine, 1)
    return image


def zero_bytes(path: Path) -> None:
    path.write_bytes(b"")


def truncated(path: Path) -> None:
    full = path.with_name("full.nii.gz")
    nib.save(_nifti(_head((64, 64, 64))), full)
    raw = gzip.decompress(full.read_bytes())
    full.unlink()
    path.write_bytes(gzip.compress(raw[: len(raw) // 3], mtime=0))


def enormous_header(path: Path) -> None:
    """A header claiming 32000 x 32000 x 32000 float32 voxels, followed by 16 bytes."""
    header = nib.Nifti1Header()
    header.set_data_dtype(np.float32)
    header.set_data_shape((32000, 32000, 32000))
    header.set_qform(RAS_1MM, 1)
    path.write_bytes(header.binaryblock + b"\0" * 4 + struct.pack("<4f", 1, 2, 3, 4))


def five_d(path: Path) -> None:
    nib.save(_nifti(np.ones((8, 8, 8, 2, 3), np.float32)), path)


def all_nan(path: Path) -> None:
    nib.save(_nifti(np.full((24, 24, 16), np.nan, np.float32)), path)


def all_inf(path: Path) -> None:
    nib.save(_nifti(np.full((24, 24, 16), np.inf, np.float32)), path)


def all_zero(path: Path) -> None:
    nib.save(_nifti(np.zeros((24, 24, 16), np.int16)), path)


def one_pixel(path: Path) -> None:
    iio.imwrite(path, np.array([[200]], np.uint8), extension=".png")


def tiny_volume(path: Path) -> None:
    nib.save(_nifti(np.arange(27, dtype=np.float32).reshape(3, 3, 3)), path)


def rgba(path: Path) -> None:
    grey = (_head((40, 56, 1))[..., 0] / 4).astype(np.uint8)
    alpha = np.full_like(grey, 255)
    iio.imwrite(path, np.stack([grey, grey // 2, grey, alpha], axis=-1), extension=".png")


def sixteen_bit(path: Path) -> None:
    iio.imwrite(path, (_head((48, 40, 1))[..., 0] * 60).astype(np.uint16), extension=".png")


def text_as_png(path: Path) -> None:
    path.write_text("this is a text file, not a picture\n")


def sheared(path: Path) -> None:
    affine = np.array([[1.0, 0.25, 0, -10], [0, 1.0, 0.1, -12], [0, 0, 1.5, 4], [0, 0, 0, 1]])
    nib.save(_nifti(_head(), affine), path)


def permuted(path: Path) -> None:
    """Voxel axes (i, j, k) run along (S, R, P): an axis-permuted, flipped affine."""
    affine = np.array([[0, 1.0, 0, -20], [0, 0, -1.2, 30], [2.0, 0, 0, -8], [0, 0, 0, 1]])
    nib.save(_nifti(_head(), affine), path)


def rewrite_header(path: Path, **fields) -> None:
    """Store NIfTI-1 header fields as given, past nibabel's checks on saving (hostile values)."""
    compressed = path.name.endswith(".gz")
    raw = bytearray(gzip.decompress(path.read_bytes()) if compressed else path.read_bytes())
    header = nib.Nifti1Header(bytes(raw[:348]), check=False)
    for name, value in fields.items():
        header[name] = value
    raw[:348] = header.binaryblock
    path.write_bytes(gzip.compress(bytes(raw), mtime=0) if compressed else bytes(raw))


def bgzip(path: Path) -> None:
    """Many gzip members, the last one empty, as bgzip (htslib) writes them."""
    full = path.with_name("full.nii")
    nib.save(_nifti(_head()), full)
    raw = full.read_bytes()
    full.unlink()
    blocks = [raw[i : i + 16384] for i in range(0, len(raw), 16384)] + [b""]
    path.write_bytes(b"".join(gzip.compress(block, mtime=0) for block in blocks))


def zero_padded(path: Path) -> None:
    nib.save(_nifti(_head()), path)
    path.write_bytes(path.read_bytes() + b"\0" * 4096)


def nan_sform_no_qform(path: Path) -> None:
    image = _nifti(_head())
    image.set_qform(RAS_1MM, 0)
    nib.save(image, path)
    rewrite_header(path, srow_x=[np.nan] * 4)


def nan_pixdim(path: Path) -> None:
    nib.save(_nifti(_head()), path)
    rewrite_header(path, pixdim=[1.0, np.nan, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])


def zero_sform(path: Path) -> None:
    """sform code 1 with every row zero (rank 0) beside a valid qform."""
    nib.save(_nifti(_head()), path)
    rewrite_header(path, srow_x=[0.0] * 4, srow_y=[0.0] * 4, srow_z=[0.0] * 4)


def complex_voxels(path: Path) -> None:
    nib.save(_nifti(_head().astype(np.complex64)), path)


def beyond_float32(path: Path) -> None:
    """int16 voxels up to 100 with a scale slope of 1e38: up to 1e40 once scaled."""
    image = _nifti((_head() / 10).astype(np.int16))
    nib.save(image, path)
    rewrite_header(path, scl_slope=1e38, scl_inter=0.0)


def huge_extensions(path: Path) -> None:
    """65 MiB of header extension (300 kB compressed) before 24 x 28 x 20 voxels."""
    image = _nifti(_head())
    image.header.extensions.append(nib.nifti1.Nifti1Extension("comment", bytes(65 * 2**20)))
    nib.save(image, path)


def planar_rgb(path: Path) -> None:
    grey = (_head((40, 56, 1))[..., 0] / 4).astype(np.uint8)
    planes = np.stack([grey, grey // 2, grey])
    tifffile.imwrite(path, planes, photometric="rgb", planarconfig="separate")


def mixed_pages(path: Path) -> None:
    with tifffile.TiffWriter(path) as tif:
        tif.write((_head((40, 56, 1))[..., 0] / 4).astype(np.uint8))
        tif.write(np.zeros((16, 16), np.uint8))


def cmyk_jpeg(path: Path) -> None:
    grey = (_head((40, 56, 1))[..., 0] / 4).astype(np.uint8)
    Image.fromarray(np.stack([grey, grey // 2, grey], axis=-1)).convert("CMYK").save(path)


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[Path], None]
    outcome: str  # "reject" or "accept"
    expect: str  # part of the message (reject), or what must hold (accept)
    opens_in_napari: bool = False  # a reject that napari can still show (the pixels are fine)
    # part of a note the reader makes about an accepted file: napari shows it as a warning,
    # `apformer predict` prints it as `apformer: warning: FILE: NOTE`
    note: str = ""


CASES = (
    Case("zero_bytes.nii.gz", zero_bytes, "reject", "empty file (0 bytes)"),
    Case("truncated.nii.gz", truncated, "reject", "truncated"),
    Case("enormous_header.nii", enormous_header, "reject", "header claims"),
    Case("five_d.nii.gz", five_d, "reject", "5D data"),
    Case("all_nan.nii.gz", all_nan, "reject", "not finite", opens_in_napari=True),
    Case("all_inf.nii.gz", all_inf, "reject", "not finite", opens_in_napari=True),
    Case("all_zero.nii.gz", all_zero, "accept", "all background"),
    Case("one_pixel.png", one_pixel, "reject", "too small", opens_in_napari=True),
    Case("tiny_3x3x3.nii.gz", tiny_volume, "reject", "too small", opens_in_napari=True),
    Case("rgba.png", rgba, "accept", "colour read as grey, alpha dropped"),
    Case("sixteen_bit.png", sixteen_bit, "accept", "16-bit range normalised"),
    Case("text_file.png", text_as_png, "reject", "not a readable PNG image"),
    Case("sheared.nii.gz", sheared, "accept", "labels keep the sheared affine"),
    Case("permuted.nii.gz", permuted, "accept", "labels keep the permuted affine"),
    Case("bgzip.nii.gz", bgzip, "accept", "multi-member gzip read in full"),
    Case("zero_padded.nii.gz", zero_padded, "accept", "gzip with trailing zeros read"),
    Case("nan_sform.nii.gz", nan_sform_no_qform, "reject", "no usable voxel-to-world transform"),
    Case("nan_pixdim.nii.gz", nan_pixdim, "reject", "voxel sizes (pixdim) nan x 1 x 1"),
    Case(
        "zero_sform.nii.gz",
        zero_sform,
        "accept",
        "read with the qform",
        note="the sform is degenerate (rank 0 of 3",
    ),
    Case("complex.nii.gz", complex_voxels, "reject", "unsupported voxel type complex64"),
    Case("slope_1e38.nii.gz", beyond_float32, "reject", "beyond the float32 range"),
    Case("huge_extensions.nii.gz", huge_extensions, "reject", "header extensions of 65 MiB"),
    Case("planar_rgb.tif", planar_rgb, "accept", "one colour image, not 3 slices"),
    Case("mixed_pages.tif", mixed_pages, "reject", "2 images of different sizes"),
    Case("cmyk.jpg", cmyk_jpeg, "accept", "CMYK converted to RGB, not inverted"),
)


def build(folder: Path = CORPUS) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for case in CASES:
        path = folder / case.name
        case.build(path)
        paths[case.name] = path
    return paths


if __name__ == "__main__":
    for name, path in build(Path(sys.argv[1]) if len(sys.argv) > 1 else CORPUS).items():
        print(f"{path.stat().st_size:>8} bytes  {name}")
