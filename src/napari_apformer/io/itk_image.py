"""NRRD (.nrrd, .nhdr) and MetaImage (.mha, .mhd) with SimpleITK, and the one conversion
between SimpleITK images and this package's form (a RAS voxel array and affine, as for NIfTI).

ITK (like DICOM) places voxels in LPS: point = origin + direction @ diag(spacing) @ index,
index (i, j, k) along the file's fastest axis first. The RAS affine is that map with x and y
negated; the voxel array in (i, j, k) order is SimpleITK's (k, j, i) array transposed. Only
permutations and flips are applied after that (io.geometry), never resampling. Labels written
back in a source's format carry the origin, spacing and direction the source had, number for
number (kept in `ItkGeometry`).

SimpleITK is an optional dependency (the `radiology` extra): imported here on first use.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np

from napari_apformer.errors import InputError
from napari_apformer.io.files import compound_suffix, write_atomically
from napari_apformer.io.geometry import Reorientation
from napari_apformer.io.image_file import (
    ImageFile,
    ItkGeometry,
    NiftiGeometry,
    check_float32_range,
    check_pixel_type,
    label_dtype,
)
from napari_apformer.io.memory import require_memory

NRRD_SUFFIXES = (".nrrd", ".nhdr")
METAIMAGE_SUFFIXES = (".mha", ".mhd")
ITK_SUFFIXES = NRRD_SUFFIXES + METAIMAGE_SUFFIXES
FORMAT_OF_SUFFIX = {".nrrd": "nrrd", ".nhdr": "nrrd", ".mha": "metaimage", ".mhd": "metaimage"}
FORMAT_NAMES = {"nrrd": "NRRD", "metaimage": "MetaImage", "dicom": "DICOM"}
# Labels are written as single files (atomic rename): detached headers become attached.
LABEL_SUFFIX_OF = {".nrrd": ".nrrd", ".nhdr": ".nrrd", ".mha": ".mha", ".mhd": ".mha"}
WRITABLE_SUFFIXES = (".nrrd", ".mha")
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
MAX_VOXEL_BYTES = 16 * 2**30  # as for NIfTI: refuse headers that claim more
ORTHOGONAL_TOLERANCE = 1e-4
INSTALL_HINT = "pip install napari-apformer[radiology]"


def import_sitk(action: str, source: object = None):
    """The SimpleITK module; InputError saying how to install it when it is missing."""
    return import_optional("SimpleITK", action, source)


def import_optional(module: str, action: str, source: object = None):
    """A module of the `radiology` extra (SimpleITK, pydicom, highdicom); InputError such as
    "reading DICOM needs `pip install napari-apformer[radiology]`" when it is missing."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise InputError(f"{action} needs `{INSTALL_HINT}`", source) from None


def itk_error_text(error: BaseException, limit: int = 200) -> str:
    """The useful part of an ITK exception: its 'ITK ERROR: Class(0x..): message' lines
    without the source location and object address."""
    text = str(error)
    found = re.findall(r"ITK ERROR: \w+\(0x[0-9a-f]+\): (.*)", text)
    lines = found or [line for line in text.splitlines() if line.strip()][-1:]
    message = " ".join(" ".join(lines).split())
    return (message or type(error).__name__)[:limit]


@contextlib.contextmanager
def itk_warnings() -> Iterator[list[str]]:
    """ITK's warnings while the block runs, collected (not printed on stderr) as one line
    each without the source location."""
    sitk = import_sitk("reading this file")
    collected: list[str] = []

    class _Collector(sitk.LoggerBase):
        def DisplayText(self, text: str) -> None:
            collected.append(text)

        def DisplayErrorText(self, text: str) -> None:
            collected.append(text)

        def DisplayWarningText(self, text: str) -> None:
            collected.append(text)

        def DisplayGenericOutputText(self, text: str) -> None:
            collected.append(text)

        def DisplayDebugText(self, text: str) -> None:
            pass

    collector = _Collector()
    previous = collector.SetAsGlobalITKLogger()
    display = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(True)  # warnings are how ITK reports some checks
    lines: list[str] = []
    try:
        yield lines
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(display)
        previous.SetAsGlobalITKLogger()
        for text in collected:
            body = [s for s in text.splitlines() if s.strip() and not s.startswith("WARNING: In")]
            line = re.sub(r"^\w+ \(0x[0-9a-f]+\): ", "", " ".join(body).strip())
            if line:
                lines.append(" ".join(line.split()))


def read_itk_image(path: Path) -> ImageFile:
    """An NRRD or MetaImage file as an ImageFile in RAS voxel order (like read_nifti)."""
    suffix = compound_suffix(path)
    kind = FORMAT_OF_SUFFIX.get(suffix, "nrrd")
    name = FORMAT_NAMES[kind]
    sitk = import_sitk(f"reading {name}", path)
    if not path.is_file():
        raise InputError("file not found", path)
    if path.stat().st_size == 0:
        raise InputError("empty file (0 bytes)", path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.SetImageIO("NrrdImageIO" if kind == "nrrd" else "MetaImageIO")
    try:
        with itk_warnings():
            reader.ReadImageInformation()
    except RuntimeError as error:
        raise InputError(f"not a readable {name} file ({itk_error_text(error)})", path) from None
    size = tuple(int(s) for s in reader.GetSize())
    while len(size) > 3 and size[-1] == 1:
        size = size[:-1]
    if len(size) not in (2, 3) or reader.GetDimension() > 3:
        raise InputError(
            f"{reader.GetDimension()}D data of size {' x '.join(map(str, reader.GetSize()))} "
            "is not supported: give a 2D image or one 3D volume",
            path,
        )
    if 0 in size:
        raise InputError(f"empty image of size {' x '.join(map(str, size))}", path)
    components = int(reader.GetNumberOfComponents())
    if components != 1:
        raise InputError(
            f"{components} values per voxel (colour or vector data) is not supported; "
            "give a scalar (grey-value) image",
            path,
        )
    itemsize = pixel_itemsize(sitk, reader.GetPixelID(), path)
    claimed = math.prod(size) * itemsize
    if claimed > MAX_VOXEL_BYTES:
        raise InputError(
            f"header claims {claimed / 2**30:.1f} GiB of voxel data; refusing more "
            f"than {MAX_VOXEL_BYTES // 2**30} GiB",
            path,
        )
    require_memory(2 * claimed, path)  # SimpleITK's buffer and the array copied from it
    try:
        with itk_warnings() as notes:
            image = reader.Execute()
    except RuntimeError as error:
        raise InputError(
            f"cannot read the voxel data ({itk_error_text(error)}); truncated or corrupt?", path
        ) from None
    return image_file_from_sitk(image, path, kind, notes=tuple(notes))


def image_file_from_sitk(
    image,
    source: Path,
    kind: str,
    dicom: object | None = None,
    notes: tuple[str, ...] = (),
) -> ImageFile:
    """A 2D or 3D scalar SimpleITK image as an ImageFile: the voxel array in RAS order, the
    RAS affine and a NIfTI header made from it, and the source's own geometry in `itk`."""
    sitk = import_sitk("reading this file", source)
    dimension = int(image.GetDimension())
    if dimension == 4 and image.GetSize()[3] == 1:  # a trailing singleton axis
        image = image[:, :, :, 0]
        dimension = 3
    itk = ItkGeometry(
        format=kind,
        dimension=dimension,
        origin=tuple(float(v) for v in image.GetOrigin()),
        spacing=tuple(float(v) for v in image.GetSpacing()),
        direction=tuple(float(v) for v in image.GetDirection()),
        dicom=dicom,  # type: ignore[arg-type]
    )
    affine = affine_of(itk, source)
    array = sitk.GetArrayFromImage(image)  # (k, j, i) or (j, i): a copy
    del image
    check_pixel_type(array.dtype, source, "voxel")
    if array.dtype == np.float64 and kind == "dicom":
        array = array.astype(np.float32)  # rescaled DICOM: float32 holds what 16 bits can
    check_float32_range(array, source)
    voxels = array.T  # (i, j, k) or (i, j): a view
    voxels = voxels.reshape(voxels.shape + (1,) * (3 - voxels.ndim))
    reorientation = Reorientation.from_affine(affine)
    zooms = (*itk.spacing, 1.0)[:3] if dimension == 2 else itk.spacing
    geometry = NiftiGeometry(
        affine, nifti_header_for(affine, voxels.shape, zooms), reorientation, voxels.shape, itk
    )
    return ImageFile(
        data=reorientation.to_canonical(voxels),
        source=source,
        spacing=reorientation.canonical_zooms(zooms),
        nifti=geometry,
        notes=notes,
    )


def affine_of(itk: ItkGeometry, source: object = None) -> np.ndarray:
    """The RAS affine (voxel (i, j, k) to scanner RAS millimetres) of an ITK geometry; a 2D
    image lies in the plane z = 0 with its third axis along +S."""
    n = itk.dimension
    direction = np.eye(3)
    direction[:n, :n] = np.reshape(itk.direction, (n, n))
    spacing = np.ones(3)
    spacing[:n] = itk.spacing
    origin = np.zeros(3)
    origin[:n] = itk.origin
    affine = np.eye(4)
    affine[:3, :3] = LPS_TO_RAS @ direction @ np.diag(spacing)
    affine[:3, 3] = LPS_TO_RAS @ origin
    if not np.isfinite(affine).all() or np.linalg.matrix_rank(affine[:3, :3]) < 3:
        raise InputError(
            "the voxel-to-world transform (origin, spacing, direction) is not finite or "
            "its axes do not span space; fix the header",
            source,
        )
    return affine


def itk_geometry_of(geometry: NiftiGeometry, target: object = None) -> ItkGeometry:
    """The source's own ITK geometry, or one computed from the RAS affine of a NIfTI source
    (InputError when the affine shears, which NRRD and MetaImage cannot hold)."""
    if geometry.itk is not None:
        return geometry.itk
    matrix = LPS_TO_RAS @ geometry.affine[:3, :3]
    spacing = np.linalg.norm(matrix, axis=0)
    direction = matrix / spacing
    if not np.allclose(direction.T @ direction, np.eye(3), atol=ORTHOGONAL_TOLERANCE):
        raise InputError(
            "the source's affine shears (its voxel axes are not perpendicular), which NRRD "
            "and MetaImage cannot hold; write the labels as NIfTI",
            target,
        )
    return ItkGeometry(
        format="nifti",
        dimension=3,
        origin=tuple(float(v) for v in LPS_TO_RAS @ geometry.affine[:3, 3]),
        spacing=tuple(float(v) for v in spacing),
        direction=tuple(float(v) for v in direction.ravel()),
    )


def labels_image(labels: np.ndarray, geometry: NiftiGeometry, target: object = None):
    """Labels in RAS voxel order (3D, on the source's grid) as a SimpleITK image in the
    source's voxel order and geometry, with the smallest unsigned type that holds them."""
    sitk = import_sitk("writing NRRD or MetaImage labels", target)
    itk = itk_geometry_of(geometry, target)
    voxels = geometry.reorientation.from_canonical(labels).reshape(geometry.source_shape)
    if itk.dimension == 2:
        voxels = voxels[:, :, 0]
    dtype = label_dtype(int(labels.max(initial=0)))
    image = sitk.GetImageFromArray(np.ascontiguousarray(voxels.T, dtype=dtype))
    image.SetOrigin(itk.origin)
    image.SetSpacing(itk.spacing)
    image.SetDirection(itk.direction)
    return image


def write_itk_labels(
    path: Path,
    labels: np.ndarray,
    geometry: NiftiGeometry | None,
    metadata: dict[str, str] | None = None,
) -> None:
    """Labels (RAS voxel order) as NRRD or MetaImage (.mha) in the source's voxel order and
    geometry, compressed; `metadata` becomes header fields (NRRD: `key:=value`)."""
    if geometry is None:
        raise InputError(
            "NRRD and MetaImage labels need a source with a geometry (NIfTI, NRRD, "
            "MetaImage or DICOM); write PNG or TIFF labels for this image",
            path,
        )
    suffix = compound_suffix(path)
    if suffix not in WRITABLE_SUFFIXES:
        raise InputError(
            f"labels are written as single files: {', '.join(WRITABLE_SUFFIXES)} "
            "(a detached header and its data file cannot be replaced at once)",
            path,
        )
    sitk = import_sitk("writing NRRD or MetaImage labels", path)
    image = labels_image(labels, geometry, path)
    for key, value in (metadata or {}).items():
        image.SetMetaData(key, value)
    io_name = "NrrdImageIO" if suffix == ".nrrd" else "MetaImageIO"

    def write(tmp: Path) -> None:
        writer = sitk.ImageFileWriter()
        writer.SetFileName(str(tmp))
        writer.SetImageIO(io_name)  # the temporary name need not end in the suffix
        writer.UseCompressionOn()
        writer.Execute(image)

    write_atomically(path, write)


def nifti_header_for(
    affine: np.ndarray, shape: tuple[int, ...], zooms: tuple[float, ...]
) -> nib.Nifti1Header:
    """A NIfTI header for a volume that did not come from NIfTI: both transforms set to the
    affine with the scanner code, millimetres; what write_nifti_labels needs."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_zooms(tuple(float(z) for z in zooms))
    header.set_xyzt_units("mm")
    header.set_sform(affine, code="scanner")
    header.set_qform(affine, code="scanner")
    return header


def pixel_itemsize(sitk, pixel_id: int, source: object) -> int:
    sizes = {
        sitk.sitkUInt8: 1,
        sitk.sitkInt8: 1,
        sitk.sitkUInt16: 2,
        sitk.sitkInt16: 2,
        sitk.sitkUInt32: 4,
        sitk.sitkInt32: 4,
        sitk.sitkUInt64: 8,
        sitk.sitkInt64: 8,
        sitk.sitkFloat32: 4,
        sitk.sitkFloat64: 8,
    }
    if pixel_id not in sizes:
        name = sitk.GetPixelIDValueAsString(pixel_id)
        raise InputError(f"unsupported voxel type {name}", source)
    return sizes[pixel_id]
