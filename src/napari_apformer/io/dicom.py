"""DICOM series in: a folder (searched with its subfolders) or a DICOMDIR, one or more series.

GDCM (inside SimpleITK) finds the series, orders each one's slices by position along the
slice normal (not by file name or InstanceNumber), applies rescale slope and intercept (CT in
Hounsfield units), decodes compressed transfer syntaxes (JPEG, JPEG-LS, JPEG 2000, RLE) and
gives the series' geometry, oblique orientation included; ITK flags slices that are not
evenly spaced. pydicom reads each file's header (no pixels) to describe the series, to find
files GDCM left out (non-image objects, corrupt files) and to check that a series' slices
agree (size, orientation). Nothing here sorts slices or computes geometry by hand.

A series becomes an ImageFile like a NIfTI file (RAS voxel order, RAS affine; io.itk_image),
so labels go back to NIfTI in the series' geometry with nifti.write_nifti_labels, or to DICOM
SEG (io.label_files.write_dicom_seg).
"""

from __future__ import annotations

import os
import re
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from napari_apformer.errors import InputError, first_line
from napari_apformer.io.acquisition import from_dicom
from napari_apformer.io.files import stem_of
from napari_apformer.io.image_file import ImageFile
from napari_apformer.io.itk_image import (
    image_file_from_sitk,
    import_optional,
    import_sitk,
    itk_error_text,
    itk_warnings,
    pixel_itemsize,
)
from napari_apformer.io.memory import require_memory

DICOMDIR = "DICOMDIR"
PREAMBLE_BYTES = 132  # 128-byte preamble, then b"DICM"
SNIFF_FILES = 200  # files looked at to decide whether a folder holds DICOM
ORIENTATION_TOLERANCE = 1e-4  # direction cosines that differ more: another orientation
# ITK's series reader warns when a step between slices differs from the first one by more
# than this fraction of it (its default, 1e-4, refuses positions rounded to 1e-3 mm).
SPACING_TOLERANCE = 0.01
NON_UNIFORM_WARNING = "Non uniform sampling or missing slices detected"
HEADER_TAGS = [
    "SOPClassUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SeriesNumber",
    "SeriesDescription",
    "Modality",
    "ScanningSequence",
    "ImageType",
    "Rows",
    "Columns",
    "SamplesPerPixel",
    "NumberOfFrames",
    "ImageOrientationPatient",
    "RescaleSlope",
    "RescaleIntercept",
]


@dataclass(frozen=True)
class DicomSeries:
    """One series of a scanned folder.

    files: in GDCM's order, by position along the slice normal. skipped: why the series is
    not read as a volume (a localizer, a single slice, a non-image object, ...), else None.
    problem: what makes it unreadable although it is a volume (a corrupt file, mixed sizes or
    orientations); reading it raises InputError with this text.
    """

    root: Path
    uid: str
    number: int | None
    description: str
    modality: str
    files: tuple[Path, ...]
    skipped: str | None = None
    problem: str | None = None
    rescaled: bool = False  # slopes/intercepts that are not one integer pair: read as float32
    study_uid: str = ""
    images: bool = True  # False for objects without pixels (reports, plans): counted as files
    scanning_sequence: str = ""  # MR: e.g. "GR\\IR"; "EP" marks an echo-planar series

    @property
    def slices(self) -> int:
        return len(self.files)

    @property
    def label(self) -> str:
        """'series 3 "CT abdomen" (CT, 120 slices)' for messages."""
        number = f"series {self.number}" if self.number is not None else f"series {self.uid}"
        description = f' "{self.description}"' if self.description else ""
        kind = f"{self.modality}, " if self.modality else ""
        unit = "slice" if self.images else "file"
        plural = "" if self.slices == 1 else "s"
        return f"{number}{description} ({kind}{self.slices} {unit}{plural})"

    @property
    def name(self) -> str:
        """A file-name stem: the folder, the series number and description, e.g.
        'study_s003_CT_abdomen' (the UID's tail when there is no series number)."""
        number = f"s{self.number:03d}" if self.number is not None else f"uid{self.uid[-8:]}"
        description = re.sub(r"[^A-Za-z0-9.+-]+", "_", self.description).strip("._")[:48]
        parts = [stem_of(self.root) or "dicom", number, description]
        return "_".join(p for p in parts if p)


@dataclass
class DicomScan:
    """What a folder holds: its series (volumes and skipped ones) and the files that belong
    to no series (not DICOM, unreadable), with the reason."""

    root: Path
    series: list[DicomSeries] = field(default_factory=list)
    ignored: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def volumes(self) -> list[DicomSeries]:
        return [s for s in self.series if s.skipped is None]

    @property
    def skipped(self) -> list[DicomSeries]:
        return [s for s in self.series if s.skipped is not None]

    def report(self) -> list[str]:
        """One line per series and per ignored file, for the command line and the plugin."""
        lines = []
        for s in self.series:
            if s.skipped is not None:
                lines.append(f"skipped {s.label}: {s.skipped}")
            elif s.problem is not None:
                lines.append(f"cannot read {s.label}: {s.problem}")
            else:
                lines.append(f"found {s.label}")
        lines += [f"ignored {path}: {why}" for path, why in self.ignored]
        return lines


@dataclass
class DicomFolder:
    """The volumes read from a folder, and one line for each series or file left out."""

    images: list[ImageFile]
    problems: list[str]


def is_dicom_source(path: Path) -> bool:
    """A DICOMDIR file, or a folder (subfolders included) that holds a DICOMDIR, a file
    with the DICOM preamble or a .dcm file among the first SNIFF_FILES files."""
    path = Path(path)
    if path.is_file():
        return path.name.upper() == DICOMDIR
    if not path.is_dir():
        return False
    for n, candidate in enumerate(_files_under(path)):
        if n >= SNIFF_FILES:
            break
        if candidate.name.upper() == DICOMDIR or candidate.suffix.lower() == ".dcm":
            return True
        if _has_preamble(candidate):
            return True
    return False


def scan_dicom(path: Path) -> DicomScan:
    """The series of a folder (with its subfolders) or of a DICOMDIR's folder; InputError
    when there is no DICOM image series at all."""
    sitk = import_sitk("reading DICOM", path)
    pydicom = import_optional("pydicom", "reading DICOM", path)

    path = Path(path)
    root = path.parent if path.is_file() and path.name.upper() == DICOMDIR else path
    if not root.is_dir():
        raise InputError("not a folder or a DICOMDIR", path)
    files = [f for f in _files_under(root) if f.name.upper() != DICOMDIR]
    folders_of: dict[str, set[Path]] = defaultdict(set)
    with itk_warnings():
        for folder in sorted({f.parent for f in files}):
            try:
                uids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
            except RuntimeError:
                continue
            for uid in uids:
                folders_of[uid].add(folder)
        ordered: dict[str, tuple[Path, ...]] = {}
        for uid, folders in folders_of.items():
            if len(folders) == 1:
                (folder,) = folders
                names = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)
            else:  # a series spread over folders: GDCM orders it from their common parent
                common = Path(os.path.commonpath([str(f) for f in folders]))
                names = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(common), uid, False, True)
            ordered[uid] = tuple(Path(os.path.normpath(n)) for n in names)
    placed = {f for names in ordered.values() for f in names}
    headers = {f: _header(pydicom, f, force=f in placed) for f in {*files, *placed}}
    # Files GDCM left out: not DICOM, unreadable, non-image objects, or broken slices.
    left_out: dict[str, list[Path]] = defaultdict(list)
    scan = DicomScan(root)
    for f in files:
        if f in placed:
            continue
        header = headers[f]
        if isinstance(header, str):
            scan.ignored.append((f, header))
        elif not header.get("SOPClassUID") and not header.get("SeriesInstanceUID"):
            scan.ignored.append((f, "not a readable DICOM file (no SOP class, no series)"))
        else:
            left_out[str(header.get("SeriesInstanceUID", ""))].append(f)
    for uid, names in ordered.items():
        broken = left_out.pop(uid, [])
        scan.series.append(
            _describe(root, uid, names, [headers[f] for f in names], broken)  # type: ignore[misc]
        )
    for uid, names in left_out.items():
        first = headers[names[0]]
        scan.series.append(
            DicomSeries(
                root,
                uid,
                _int(first.get("SeriesNumber")),  # type: ignore[union-attr]
                str(first.get("SeriesDescription", "") or ""),  # type: ignore[union-attr]
                str(first.get("Modality", "") or ""),  # type: ignore[union-attr]
                tuple(sorted(names)),
                skipped=_not_image_reason(first),  # type: ignore[arg-type]
                images=False,
            )
        )
    scan.series.sort(key=lambda s: (s.number is None, s.number or 0, s.description, s.uid))
    if not scan.series:
        what = f"{len(scan.ignored)} files, none of them DICOM" if scan.ignored else "no files"
        raise InputError(f"no DICOM image series found ({what})", path)
    return scan


def read_dicom_series(series: DicomSeries) -> ImageFile:
    """One series as a volume in RAS voxel order, its affine from GDCM's geometry;
    InputError naming the series for a skipped or inconsistent one."""
    where = f"{series.root}: {series.label}"
    if series.skipped is not None:
        raise InputError(f"not read: {series.skipped}", where)
    if series.problem is not None:
        raise InputError(series.problem, where)
    sitk = import_sitk("reading DICOM", series.root)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(f) for f in series.files])
    if series.rescaled:
        reader.SetOutputPixelType(sitk.sitkFloat32)
    info = sitk.ImageFileReader()
    info.SetFileName(str(series.files[0]))
    try:
        with itk_warnings():
            info.ReadImageInformation()
    except RuntimeError as error:
        message = f"cannot read {series.files[0].name} ({itk_error_text(error)})"
        raise InputError(message, where) from None
    width, height = (int(s) for s in info.GetSize()[:2])
    itemsize = 4 if series.rescaled else pixel_itemsize(sitk, info.GetPixelID(), where)
    require_memory(2 * width * height * series.slices * itemsize, where)
    reader.SetSpacingWarningRelThreshold(SPACING_TOLERANCE)
    try:
        with itk_warnings() as warned:
            image = reader.Execute()
    except RuntimeError as error:
        raise InputError(f"cannot read the series ({itk_error_text(error)})", where) from None
    uneven = [w for w in warned if NON_UNIFORM_WARNING in w]
    if uneven:
        found = re.search(r"nonuniformity:\s*([-+0-9.eE]+)", uneven[0])
        deviation = f" by up to {float(found[1]):.3g} mm" if found else ""  # ITK's figure
        step = float(image.GetSpacing()[2])
        raise InputError(
            f"its slices are not evenly spaced along the slice normal (steps differ from "
            f"their mean, {step:.3g} mm,{deviation}: a missing or duplicated slice, or slices "
            "of several acquisitions in one series); not read",
            where,
        )
    image_file = image_file_from_sitk(image, series.root, "dicom", dicom=series)
    image_file.acquisition = from_dicom(series.modality, series.scanning_sequence)
    return image_file


def read_dicom(path: Path, series_uid: str | None = None) -> ImageFile:
    """The one volume series of a folder or DICOMDIR (or the one with `series_uid`);
    InputError listing the series when there are several."""
    scan = scan_dicom(path)
    if series_uid is not None:
        chosen = [s for s in scan.series if s.uid == series_uid]
        if not chosen:
            raise InputError(f"no series with UID {series_uid}", path)
        return read_dicom_series(chosen[0])
    volumes = scan.volumes
    if len(volumes) == 1:
        return read_dicom_series(volumes[0])
    if not volumes:
        reasons = "; ".join(f"{s.label}: {s.skipped}" for s in scan.skipped)
        raise InputError(f"no volume to segment ({reasons})", path)
    listed = "; ".join(s.label for s in volumes)
    raise InputError(
        f"{len(volumes)} series in one folder ({listed}); read them one by one "
        "(io.dicom.read_dicom_folder)",
        path,
    )


def read_dicom_folder(path: Path) -> DicomFolder:
    """Every volume series of a folder or DICOMDIR that can be read, and one line for each
    series skipped or unreadable (named) and for each file left out; InputError only when
    the folder holds no DICOM image series."""
    scan = scan_dicom(path)
    images, problems = [], []
    for series in scan.series:
        if series.skipped is not None:
            problems.append(f"{series.root}: skipped {series.label}: {series.skipped}")
            continue
        try:
            images.append(read_dicom_series(series))
        except InputError as error:
            problems.append(str(error))
    problems += [f"{p}: ignored: {why}" for p, why in scan.ignored]
    return DicomFolder(images, problems)


def _describe(
    root: Path, uid: str, files: tuple[Path, ...], headers: list, broken: list[Path]
) -> DicomSeries:
    """A series GDCM found, with why it is skipped or cannot be read, from its headers."""
    good = [h for h in headers if not isinstance(h, str)]
    first = good[0] if good else {}
    number = _int(first.get("SeriesNumber"))
    description = str(first.get("SeriesDescription", "") or "")
    modality = str(first.get("Modality", "") or "")
    image_types = {v.upper() for h in good for v in _values(h.get("ImageType"))}
    frames = max((_int(h.get("NumberOfFrames")) or 1 for h in good), default=1)
    samples = {_int(h.get("SamplesPerPixel")) or 1 for h in good}
    skipped = None
    if "LOCALIZER" in image_types:
        skipped = "a localizer (ImageType LOCALIZER), not a volume"
    elif frames > 1:
        skipped = f"a multi-frame object ({frames} frames in one file), not supported"
    elif samples != {1}:
        skipped = f"colour pixels ({max(samples)} samples per pixel), not a grey-value volume"
    elif len(files) + len(broken) == 1:
        skipped = "a single slice (a localizer or a 2D image), not a volume"
    problem = None
    sizes = sorted({(_int(h.get("Columns")), _int(h.get("Rows"))) for h in good})
    orientations = _orientations(good)
    if broken:
        names = ", ".join(f.name for f in broken[:3]) + (" ..." if len(broken) > 3 else "")
        problem = (
            f"{len(broken)} of its files cannot be read as images ({names}: corrupt, truncated "
            "or an unsupported transfer syntax); the series would miss slices"
        )
    elif len(sizes) > 1:
        listed = ", ".join(f"{c} x {r}" for c, r in sizes)
        problem = f"its slices have different sizes ({listed}); not one volume"
    elif len(orientations) > 1:
        problem = f"its slices have {len(orientations)} different orientations; not one volume"
    pairs = {
        (_float(h.get("RescaleSlope"), 1.0), _float(h.get("RescaleIntercept"), 0.0)) for h in good
    }
    rescaled = len(pairs) > 1 or any(not (s.is_integer() and i.is_integer()) for s, i in pairs)
    return DicomSeries(
        root,
        uid,
        number,
        description,
        modality,
        files,
        skipped=skipped,
        problem=problem,
        rescaled=rescaled,
        study_uid=str(first.get("StudyInstanceUID", "") or ""),
        scanning_sequence="\\".join(str(v) for v in _values(first.get("ScanningSequence"))),
    )


def _orientations(headers: list) -> list[np.ndarray]:
    """The distinct ImageOrientationPatient values of a series' slices (within tolerance)."""
    found: list[np.ndarray] = []
    for h in headers:
        values = _values(h.get("ImageOrientationPatient"))
        try:
            cosines = np.array([float(v) for v in values])
        except (TypeError, ValueError):
            continue
        if cosines.shape != (6,):
            continue
        if not any(np.allclose(cosines, seen, atol=ORIENTATION_TOLERANCE) for seen in found):
            found.append(cosines)
    return found


def _not_image_reason(header) -> str:
    sop = str(header.get("SOPClassUID", "") or "")
    name = _sop_name(sop)
    if "Image Storage" in name:
        return f"{name} files that GDCM cannot read (corrupt, truncated or unsupported)"
    return f"{name or 'an object without a SOP class'}: not an image"


def _sop_name(uid: str) -> str:
    try:
        from pydicom.uid import UID

        name = UID(uid).name if uid else ""
    except Exception:  # an invalid UID string
        name = ""
    return name if name and name != uid else (f"SOP class {uid}" if uid else "")


def _header(pydicom, path: Path, force: bool = False):
    """The header (no pixel data) as a pydicom Dataset, or a reason string when the file
    is not DICOM or cannot be read. force: also without the preamble (files GDCM read)."""
    from pydicom.errors import InvalidDicomError

    try:
        with warnings.catch_warnings():  # pydicom warns about what it reads leniently
            warnings.simplefilter("ignore")
            return pydicom.dcmread(
                path, stop_before_pixels=True, specific_tags=HEADER_TAGS, force=force
            )
    except InvalidDicomError:
        return "not a DICOM file"
    except Exception as error:  # truncated or corrupt header
        return f"not a readable DICOM file ({first_line(error)})"


def _files_under(root: Path):
    """Files under `root`, subfolders included, hidden ones left out, in a stable order."""
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        for name in sorted(names):
            if not name.startswith("."):
                yield Path(os.path.normpath(os.path.join(folder, name)))


def _has_preamble(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(PREAMBLE_BYTES)
    except OSError:
        return False
    return len(head) == PREAMBLE_BYTES and head[128:] == b"DICM"


def _values(value) -> list:
    if value is None:
        return []
    if isinstance(value, str | bytes):
        return [value]
    try:
        return list(value)
    except TypeError:
        return [value]


def _int(value) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _float(value, default: float) -> float:
    try:
        return float(value) if value not in (None, "") else default
    except (TypeError, ValueError):
        return default
