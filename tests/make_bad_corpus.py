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


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[Path], None]
    outcome: str  # "reject" or "accept"
    expect: str  # part of the message (reject), or what must hold (accept)
    opens_in_napari: bool = False  # a reject that napari can still show (the pixels are fine)


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
