"""NIfTI (.nii, .nii.gz) with nibabel: read into RAS voxel order, write labels back exactly."""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from napari_apformer.errors import InputError
from napari_apformer.io.files import compound_suffix, write_atomically
from napari_apformer.io.geometry import Reorientation
from napari_apformer.io.image_file import ImageFile, NiftiGeometry, label_dtype
from napari_apformer.io.memory import available_bytes, size_text

MAX_VOXEL_BYTES = 16 * 2**30  # refuse headers that claim more than this before reading data
NIFTI_INTENT_LABEL = 1002


def read_nifti(path: Path, allow_series: bool = False) -> ImageFile:
    """allow_series: accept 4D files (volumes along a 4th axis); otherwise they are refused."""
    try:
        image = nib.load(str(path))
    except FileNotFoundError:
        raise InputError("file not found", path) from None
    except Exception as error:  # nibabel raises many types for a bad header
        if path.is_file() and path.stat().st_size == 0:
            raise InputError("empty file (0 bytes)", path) from None
        raise InputError(f"not a readable NIfTI file ({_first_line(error)})", path) from None
    if not isinstance(image, nib.Nifti1Image | nib.Nifti2Image):
        raise InputError(f"not a NIfTI image ({type(image).__name__})", path)
    shape = tuple(int(s) for s in image.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    series = len(shape) == 4 and allow_series
    if len(shape) > 3 and not series:
        raise InputError(
            f"{len(shape)}D data of shape {image.shape} is not supported: give a "
            f"2D image or {'a 3D or 4D' if allow_series else 'one 3D'} volume",
            path,
        )
    if 0 in shape:
        raise InputError(f"empty image of shape {image.shape}", path)
    _check_payload(path, image)
    try:
        data = np.asanyarray(image.dataobj)
    except Exception as error:  # truncated or corrupt payload
        raise InputError(f"cannot read the voxel data ({_first_line(error)})", path) from None
    if data.dtype.fields is not None or not np.issubdtype(data.dtype, np.number):
        raise InputError(
            f"unsupported voxel type {data.dtype} (colour NIfTI is not supported)", path
        )
    data = data.reshape(shape + (1,) * (3 - len(shape)))
    reorientation = Reorientation.from_affine(image.affine)
    zooms = tuple(float(z) for z in image.header.get_zooms()[:3]) + (1.0,) * (3 - len(shape))
    geometry = NiftiGeometry(
        image.affine.copy(), image.header.copy(), reorientation, data.shape[:3]
    )
    return ImageFile(
        data=reorientation.to_canonical(data),  # the volumes axis, if any, stays last
        source=path,
        spacing=reorientation.canonical_zooms(zooms),
        nifti=geometry,
        series=series,
    )


def write_nifti_labels(
    path: Path,
    labels: np.ndarray,
    geometry: NiftiGeometry | None,
    spacing: tuple[float, ...] | None = None,
    origin: tuple[float, ...] | None = None,
) -> None:
    """Labels written in a source's voxel order and geometry.

    With `geometry` (a NIfTI source), labels are 3D in its RAS voxel order. Without it, labels
    are a (Y, X) or (Z, Y, X) array as napari shows it, with the voxel size `spacing` and the
    position `origin` of its first voxel per axis; NIfTI stores axes as (X, Y, Z), so they are
    reversed, which puts them back in the same place when read by this package or napari.
    """
    if geometry is not None:
        voxels = geometry.reorientation.from_canonical(labels).reshape(geometry.source_shape)
        header = geometry.header.copy()
        affine = geometry.affine
    else:
        voxels = labels.T.reshape(labels.shape[::-1] + (1,) * (3 - labels.ndim))
        steps = [*(spacing or (1.0,) * labels.ndim)][::-1] + [1.0] * (3 - labels.ndim)
        shift = [*(origin or (0.0,) * labels.ndim)][::-1] + [0.0] * (3 - labels.ndim)
        affine = np.diag([*steps, 1.0])
        affine[:3, 3] = shift
        header = None
    dtype = label_dtype(int(labels.max(initial=0)))
    out = nib.Nifti1Image(np.ascontiguousarray(voxels, dtype=dtype), affine, header)
    out.set_data_dtype(dtype)
    out.header.set_slope_inter(1.0, 0.0)
    out.header.set_intent(NIFTI_INTENT_LABEL)
    out.header["cal_min"], out.header["cal_max"] = 0, int(labels.max(initial=0))
    if geometry is not None:  # keep both transforms and their codes exactly
        source_header = geometry.header
        out.set_sform(source_header.get_sform(), int(source_header["sform_code"]))
        out.set_qform(source_header.get_qform(), int(source_header["qform_code"]))
    write_atomically(path, lambda tmp: nib.save(out, str(tmp)))


def _check_payload(path: Path, image: nib.Nifti1Image) -> None:
    """Refuse a header that claims more voxels than the file can hold, before allocating."""
    header = image.header
    claimed = int(np.prod(image.shape, dtype=np.int64)) * header.get_data_dtype().itemsize
    if claimed > MAX_VOXEL_BYTES:
        raise InputError(
            f"header claims {claimed / 2**30:.1f} GiB of voxel data; refusing more "
            f"than {MAX_VOXEL_BYTES // 2**30} GiB",
            path,
        )
    needed = int(header.get_data_offset()) + claimed
    available = _uncompressed_size(path)
    if available is not None and available < needed:
        raise InputError(
            f"truncated: the header needs {needed} bytes, the file has {available}", path
        )
    slope, inter = (getattr(image.dataobj, name, None) for name in ("slope", "inter"))
    scaled = slope not in (None, 1.0) or inter not in (None, 0.0)  # nibabel gives float64
    in_memory = claimed // header.get_data_dtype().itemsize * 8 if scaled else claimed
    free = available_bytes()
    if free is not None and in_memory > free:
        raise InputError(
            f"reading it needs {size_text(in_memory)} of memory but only {size_text(free)} is "
            "available; close other programs or use a machine with more memory",
            path,
        )


def _uncompressed_size(path: Path) -> int | None:
    """Bytes of the (decompressed) file; None where it cannot be known cheaply."""
    if compound_suffix(path) != ".nii.gz":
        return path.stat().st_size
    try:
        with path.open("rb") as f:
            f.seek(-4, 2)
            size = struct.unpack("<I", f.read(4))[0]  # gzip ISIZE: size modulo 2**32
        if path.stat().st_size >= 2**32 // 8:  # could have wrapped around
            return None
        with gzip.open(path, "rb") as g:  # a cheap check that the stream starts well
            g.read(1)
        return size
    except (OSError, EOFError, zlib.error, struct.error):
        return 0


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:200]
