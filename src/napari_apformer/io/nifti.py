"""NIfTI (.nii, .nii.gz) with nibabel: read into RAS voxel order, write labels back exactly."""

from __future__ import annotations

import math
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.openers import ImageOpener

from napari_apformer.errors import InputError, first_line
from napari_apformer.io.files import compound_suffix, write_atomically
from napari_apformer.io.geometry import Reorientation
from napari_apformer.io.image_file import (
    ImageFile,
    NiftiGeometry,
    check_float32_range,
    check_pixel_type,
    label_dtype,
)
from napari_apformer.io.memory import require_memory, size_text

MAX_VOXEL_BYTES = 16 * 2**30  # refuse headers that claim more than this before reading data
MAX_EXTENSION_BYTES = 64 * 2**20  # header extensions (metadata) nibabel would read into memory
NIFTI2_HEADER_BYTES = 540
DEFLATE_MAX_RATIO = 1032  # no deflate (gzip) stream expands more than this
NIFTI_INTENT_LABEL = 1002


def _shape_of(image: nib.Nifti1Image | nib.Nifti2Image) -> tuple[int, ...]:
    """The image's shape without trailing axes of size 1 beyond the third."""
    shape = tuple(int(s) for s in image.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def nifti_volume_count(path: Path) -> int | None:
    """The number of volumes of a 4D NIfTI file, from its header; None for anything else,
    including a header nibabel cannot read (read_nifti then says why)."""
    try:
        image = nib.load(str(path))
    except Exception:  # reported when the file is read
        return None
    if not isinstance(image, nib.Nifti1Image | nib.Nifti2Image):
        return None
    shape = _shape_of(image)
    return shape[3] if len(shape) == 4 else None


def read_nifti(path: Path, allow_series: bool = False, volume: int | None = None) -> ImageFile:
    """allow_series: accept 4D files (volumes along a 4th axis); otherwise they are refused.
    volume: read only this volume (0-based) of a 4D file, as a 3D image in its geometry."""
    _check_extensions(path)
    try:
        image = nib.load(str(path))
    except FileNotFoundError:
        raise InputError("file not found", path) from None
    except Exception as error:  # nibabel raises many types for a bad header
        if path.is_file() and path.stat().st_size == 0:
            raise InputError("empty file (0 bytes)", path) from None
        stored = _stored_header(path)
        if stored is not None:  # nibabel fails on a transform it cannot compute: say which
            _usable_affine(stored[0], path)
        raise InputError(f"not a readable NIfTI file ({first_line(error)})", path) from None
    if not isinstance(image, nib.Nifti1Image | nib.Nifti2Image):
        raise InputError(f"not a NIfTI image ({type(image).__name__})", path)
    shape = _shape_of(image)
    if volume is not None:
        if len(shape) != 4:
            raise InputError("not a 4D file: it has no volumes to choose from", path)
        if not 0 <= volume < shape[3]:
            raise InputError(
                f"volume {volume} does not exist: the file has {shape[3]} (0 to {shape[3] - 1})",
                path,
            )
    series = len(shape) == 4 and allow_series and volume is None
    if len(shape) > 3 and not series and volume is None:
        raise InputError(
            f"{len(shape)}D data of shape {image.shape} is not supported: give a "
            f"2D image or {'a 3D or 4D' if allow_series else 'one 3D'} volume",
            path,
        )
    if 0 in shape:
        raise InputError(f"empty image of shape {image.shape}", path)
    header = image.header
    if header.get_data_dtype().fields is not None:
        raise InputError(
            f"unsupported voxel type {header.get_data_dtype()} (colour NIfTI is not supported)",
            path,
        )
    check_pixel_type(header.get_data_dtype(), path, "voxel")
    zooms = tuple(float(z) for z in header.get_zooms()[: min(3, len(shape))])
    if not all(math.isfinite(z) for z in zooms):
        sizes = " x ".join(f"{z:g}" for z in zooms)
        raise InputError(f"voxel sizes (pixdim) {sizes} are not finite; fix the header", path)
    affine, notes = _usable_affine(header, path)
    _check_payload(path, image)
    try:
        if volume is None:
            data = np.asanyarray(image.dataobj)
        else:  # only that volume's bytes are read and decoded
            data = np.asanyarray(image.dataobj[..., volume]).reshape(shape[:3])
            shape = shape[:3]
    except (EOFError, OSError) as error:
        detail = first_line(error).split(" from")[0]  # nibabel: "... bytes from <name>"
        raise InputError(
            f"truncated or corrupt: the voxel data cannot be read in full ({detail})", path
        ) from None
    except Exception as error:  # corrupt payload
        raise InputError(f"cannot read the voxel data ({first_line(error)})", path) from None
    check_float32_range(data, path)  # a scale slope can take int16 beyond float32
    data = data.reshape(shape + (1,) * (3 - len(shape)))
    reorientation = Reorientation.from_affine(affine)
    zooms += (1.0,) * (3 - len(zooms))
    geometry = NiftiGeometry(affine.copy(), header.copy(), reorientation, data.shape[:3])
    return ImageFile(
        data=reorientation.to_canonical(data),  # the volumes axis, if any, stays last
        source=path,
        spacing=reorientation.canonical_zooms(zooms),
        nifti=geometry,
        series=series,
        notes=notes,
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
    if geometry is not None:  # keep both transforms and their codes exactly, where usable
        for name in ("sform", "qform"):
            transform, _ = _transform(geometry.header, name)
            code = int(geometry.header[f"{name}_code"]) if transform is not None else 0
            getattr(out, f"set_{name}")(geometry.affine if transform is None else transform, code)
    write_atomically(path, lambda tmp: nib.save(out, str(tmp)))


def _usable_affine(header: nib.Nifti1Header, path: Path) -> tuple[np.ndarray, tuple[str, ...]]:
    """The transform nibabel would use (the sform, else the qform, else one from the voxel
    sizes) when it is usable, else the other coded one with a note saying so; InputError
    when none is usable (NaN, inf, zero or rank-deficient: no orientation to read)."""
    names = [name for name in ("sform", "qform") if int(header[f"{name}_code"]) > 0]
    problems = []
    for name in names or ["voxel-size transform"]:
        transform, problem = _transform(header, name)
        if transform is not None:
            notes = tuple(f"the {bad} {why}; using the {name} instead" for bad, why in problems)
            return transform, notes
        problems.append((name, problem))
    raise InputError(
        " and ".join(f"the {name} {why}" for name, why in problems)
        + "; no usable voxel-to-world transform (fix the header, e.g. with fslorient)",
        path,
    )


def _transform(header: nib.Nifti1Header, name: str) -> tuple[np.ndarray | None, str | None]:
    """(the sform, qform or voxel-size transform, None) if usable, else (None, the problem)."""
    getter = {"sform": header.get_sform, "qform": header.get_qform}.get(name)
    try:
        affine = (getter or header.get_base_affine)()
    except Exception as error:  # nibabel: quaternion parameters that are not a rotation
        return None, f"cannot be computed ({first_line(error)})"
    if not np.isfinite(affine).all():
        return None, "holds values that are not finite (NaN or inf)"
    rank = int(np.linalg.matrix_rank(affine[:3, :3]))
    if rank < 3:
        return None, f"is degenerate (rank {rank} of 3: its voxel axes do not span space)"
    return affine, None


def _check_extensions(path: Path) -> None:
    """Refuse header extensions too large or malformed for nibabel to read safely: it holds
    them in memory two or three times over, and a negative size makes it read the whole
    file. Before nibabel sees the file; files that are not NIfTI get nibabel's own message."""
    area = _extension_area(path)
    if area is None:
        return
    length, region, endian = area
    if length > MAX_EXTENSION_BYTES:
        raise InputError(
            f"header extensions of {size_text(length)}; refusing more than "
            f"{size_text(MAX_EXTENSION_BYTES)} (extensions are metadata, not voxels)",
            path,
        )
    position = 0
    while len(region) - position >= 16:  # each: int32 size (itself included), int32 code
        esize = int(np.frombuffer(region, f"{endian}i4", 1, position)[0])
        if esize < 8 or esize > len(region) - position:
            raise InputError(
                f"corrupt header extension: it says {esize} bytes, "
                f"{len(region) - position} remain before the voxel data",
                path,
            )
        position += esize


def _extension_area(path: Path) -> tuple[float, bytes, str] | None:
    """(bytes from the header's end to the voxels, those bytes when at most
    MAX_EXTENSION_BYTES, byte order) when the header says that extensions follow."""
    found = _stored_header(path)
    if found is None or not found[1]:
        return None
    header = found[0]
    size = header.template_dtype.itemsize
    length = float(header["vox_offset"]) - size - 4
    if not length >= 16:  # nibabel reads no extension (NaN included)
        return None
    region = b""
    if length <= MAX_EXTENSION_BYTES:
        try:
            with ImageOpener(path) as f:
                f.seek(size + 4)
                region = f.read(int(length))
        except (OSError, EOFError, zlib.error):
            return None  # nibabel says what is wrong
    return length, region, header.endianness


def _stored_header(path: Path) -> tuple[nib.Nifti1Header, bool] | None:
    """The header as stored (unchecked, extensions not read) and whether extensions follow
    it; None where the file does not start with a NIfTI header."""
    try:
        with ImageOpener(path) as f:  # decompresses .nii.gz
            raw = f.read(NIFTI2_HEADER_BYTES + 4)
    except (OSError, EOFError, zlib.error):
        return None
    for klass in (nib.Nifti1Header, nib.Nifti2Header):
        size = klass.template_dtype.itemsize
        if klass.may_contain_header(raw[:size]):
            return klass(raw[:size], check=False), raw[size : size + 1] not in (b"", b"\0")
    return None


def _check_payload(path: Path, image: nib.Nifti1Image) -> None:
    """Refuse a header that claims more voxels than the file can hold, or than memory can,
    before allocating."""
    header = image.header
    voxels = math.prod(int(s) for s in image.shape)
    claimed = voxels * header.get_data_dtype().itemsize
    if claimed > MAX_VOXEL_BYTES:
        raise InputError(
            f"header claims {claimed / 2**30:.1f} GiB of voxel data; refusing more "
            f"than {MAX_VOXEL_BYTES // 2**30} GiB",
            path,
        )
    needed = int(image.dataobj.offset) + claimed  # image.header forgets the offset
    size = path.stat().st_size
    if compound_suffix(path) != ".nii.gz" and size < needed:
        raise InputError(f"truncated: the header needs {needed} bytes, the file has {size}", path)
    # The gzip trailer's size (ISIZE) is that of the last member only, modulo 2**32: wrong for
    # bgzip (many members), zero padding and volumes over 4 GiB. What is certain is deflate's
    # largest expansion; a stream that ends early is found while reading.
    if compound_suffix(path) == ".nii.gz" and size * DEFLATE_MAX_RATIO < needed:
        raise InputError(
            f"truncated: the header needs {needed} bytes, more than a gzip file of {size} "
            "bytes can hold",
            path,
        )
    slope, inter = (getattr(image.dataobj, name, None) for name in ("slope", "inter"))
    scaled = slope not in (None, 1.0) or inter not in (None, 0.0)  # nibabel gives float64
    require_memory(claimed + (8 * voxels if scaled else 0), path)


# Per-class probabilities: stored type -> the scale slope that turns stored values back into
# probabilities (NIfTI has no float16; uint16 is as small and has a finer step on [0, 1]).
PROBABILITY_TYPES = {"uint8": 1 / 255, "uint16": 1 / 65535, "float32": 1.0}


def write_nifti_probabilities(
    path: Path,
    probabilities: np.ndarray,
    geometry: NiftiGeometry | None,
    spacing: tuple[float, ...] | None = None,
    stored: str = "uint8",
) -> None:
    """Per-class probabilities (K, *spatial shape of the image, RAS order for a volume) as one
    4D NIfTI, classes along the 4th axis, in the source's voxel order and geometry as
    write_nifti_labels places labels. uint8/uint16 store round(p * 255 or 65535) with the
    header's scale slope set to 1/255 or 1/65535, so NIfTI readers that apply it (nibabel's
    get_fdata, ITK, 3D Slicer, FSL) read probabilities."""
    if stored not in PROBABILITY_TYPES:
        raise InputError(f"probabilities are stored as {', '.join(PROBABILITY_TYPES)}", path)
    slope = PROBABILITY_TYPES[stored]
    if geometry is not None:
        placed = [
            geometry.reorientation.from_canonical(p).reshape(geometry.source_shape)
            for p in probabilities
        ]
        header, affine = geometry.header.copy(), geometry.affine
    else:  # (Y, X) or (Z, Y, X) as napari shows it, reversed as write_nifti_labels does
        ndim = probabilities.ndim - 1
        placed = [p.T.reshape(p.shape[::-1] + (1,) * (3 - ndim)) for p in probabilities]
        steps = [*(spacing or (1.0,) * ndim)][::-1] + [1.0] * (3 - ndim)
        header, affine = None, np.diag([*steps, 1.0])
    voxels = np.stack(placed, axis=-1).astype(np.float32)
    if stored != "float32":
        voxels = np.rint(np.clip(voxels, 0.0, 1.0) / slope).astype(stored)
    out = nib.Nifti1Image(np.ascontiguousarray(voxels), affine, header)
    out.set_data_dtype(np.dtype(stored))
    out.header.set_slope_inter(slope, 0.0)
    out.header.set_intent(0)
    out.header["cal_min"], out.header["cal_max"] = 0.0, 1.0
    out.header["descrip"] = b"class probabilities, classes on axis 4"
    zooms = list(out.header.get_zooms())
    out.header.set_zooms((*zooms[:3], 1.0))
    out.header.set_xyzt_units(xyz="mm", t="unknown")
    if geometry is not None:
        for name in ("sform", "qform"):
            transform, _ = _transform(geometry.header, name)
            code = int(geometry.header[f"{name}_code"]) if transform is not None else 0
            kept = geometry.affine if transform is None else transform
            getattr(out, f"set_{name}")(kept, code)
    write_atomically(path, lambda tmp: nib.save(out, str(tmp)))
