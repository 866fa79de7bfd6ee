"""What `apformer predict` segments and where each result goes.

Inputs are image files, folders of them, and DICOM folders or DICOMDIRs, in which each volume
series is an input of its own (named by the folder, series number and description) and the
series that are not volumes (localizers, single slices, reports) are listed as left out. The
label format follows the output name, or `--format`, else the source's own (NIfTI for DICOM).
Nothing here imports torch; SimpleITK and pydicom only when a DICOM folder is given.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from napari_apformer.errors import InputError
from napari_apformer.io.files import compound_suffix, stem_of
from napari_apformer.io.formats import (
    NIFTI_SUFFIXES,
    READABLE_SUFFIXES,
    is_readable_name,
    label_suffix_for,
)

if TYPE_CHECKING:
    from napari_apformer.io.dicom import DicomSeries
    from napari_apformer.io.image_file import ImageFile

LABEL_STEM_SUFFIX = "_seg"
PROBABILITY_STEM_SUFFIX = "_prob"
DICOM_SEG_SUFFIX = ".dcm"
SEG_NRRD_SUFFIX = ".seg.nrrd"
# --format NAME -> the labels' suffix
OUTPUT_FORMATS = {
    "nii.gz": ".nii.gz",
    "nii": ".nii",
    "seg.nrrd": SEG_NRRD_SUFFIX,
    "nrrd": ".nrrd",
    "mha": ".mha",
    "dcm": DICOM_SEG_SUFFIX,
    "png": ".png",
    "tif": ".tif",
}
# An output name with one of these suffixes is a file name (one input), else a folder.
OUTPUT_SUFFIXES = (".nii", ".nii.gz", ".png", ".tif", ".tiff", ".nrrd", ".mha", DICOM_SEG_SUFFIX)
DICOM_HINT = "or a folder of DICOM files or a DICOMDIR"
SOURCE_KINDS = {  # sources with a geometry, by suffix
    ".nii": "NIfTI",
    ".nii.gz": "NIfTI",
    ".nrrd": "NRRD",
    ".nhdr": "NRRD",
    ".mha": "MetaImage",
    ".mhd": "MetaImage",
}


@dataclass(frozen=True)
class Source:
    """One thing to segment: an image file, or one series of a DICOM folder (`path` is the
    folder or DICOMDIR given). `stem` names its outputs."""

    path: Path
    stem: str
    series: DicomSeries | None = None
    volume: int | None = None  # of a 4D NIfTI file (0-based)

    def __str__(self) -> str:
        if self.series is not None:
            return f"{self.path}: {self.series.label}"
        return str(self.path) if self.volume is None else f"{self.path}: volume {self.volume}"

    @property
    def name(self) -> str:
        """A short name for progress lines: the file name, or the series' output stem."""
        return self.stem if self.series is not None else self.path.name

    @property
    def files(self) -> tuple[Path, ...]:
        """The files it is read from (never written onto)."""
        return self.series.files if self.series is not None else (self.path,)

    @property
    def sort_key(self) -> tuple:
        number = self.series.number if self.series is not None else None
        uid = self.series.uid if self.series is not None else ""
        return str(self.path), number is not None, number or 0, uid, self.volume or 0

    def read(self) -> ImageFile:
        """The image (a DICOM series read with GDCM, anything else by its suffix)."""
        if self.series is not None:
            from napari_apformer.io.dicom import read_dicom_series

            return read_dicom_series(self.series)
        if self.volume is not None:
            from napari_apformer.io.nifti import read_nifti

            return read_nifti(self.path, volume=self.volume)
        from napari_apformer.io.formats import read_image_file

        return read_image_file(self.path)


@dataclass
class Inputs:
    """What the command line named: the sources, and one line per DICOM series or file left
    out (not a volume, not DICOM), for the user and the statistics table."""

    sources: list[Source] = field(default_factory=list)
    left_out: list[tuple[str, str]] = field(default_factory=list)  # (what, why)

    @property
    def name(self) -> str:
        """A short name for progress lines: the file name, or the series' output stem."""
        return self.stem if self.series is not None else self.path.name

    @property
    def files(self) -> list[Path]:
        return [f for s in self.sources for f in s.files]


def is_output_name(path: Path) -> bool:
    """Whether a file of this name could be a label output (skipped in input folders)."""
    stem = stem_of(path)
    return stem.endswith((LABEL_STEM_SUFFIX, PROBABILITY_STEM_SUFFIX, ".seg"))


def collect_sources(inputs: Sequence[Path], volume: int | None = None) -> Inputs:
    """Files as given; a folder's readable image files (not recursive, outputs skipped), or,
    for a folder without any, its DICOM series (subfolders searched); a DICOMDIR's series.
    A 4D NIfTI file gives one source per volume (`<stem>_vol<I>`), or only `volume`.
    InputError for a missing file, an unsupported type or a folder with neither."""
    found = Inputs()
    for item in inputs:
        if item.is_dir():
            images = sorted(
                p
                for p in item.iterdir()
                if p.is_file()
                and is_readable_name(p)
                and not p.name.startswith(".")
                and not is_output_name(p)
            )
            if images:
                for p in images:
                    found.sources += file_sources(p, volume)
                continue
            from napari_apformer.io.dicom import is_dicom_source

            if not is_dicom_source(item):
                raise InputError(
                    f"no readable images ({', '.join(READABLE_SUFFIXES)}) and no DICOM files",
                    item,
                )
            add_dicom(found, item)
        elif not item.exists():
            raise InputError("file not found", item)
        elif item.name.upper() == "DICOMDIR":
            add_dicom(found, item)
        elif not is_readable_name(item):
            raise InputError(
                f"unsupported file type; expected {', '.join(READABLE_SUFFIXES)} {DICOM_HINT}",
                item,
            )
        else:
            found.sources += file_sources(item, volume)
    return found


def file_sources(path: Path, volume: int | None) -> list[Source]:
    """The file as one source, or a 4D NIfTI file's volumes (every one, or `volume` only);
    the volume count comes from the header, the voxels are read later, a volume at a time."""
    count = None
    if compound_suffix(path) in NIFTI_SUFFIXES:
        from napari_apformer.io.nifti import nifti_volume_count

        count = nifti_volume_count(path)
    if count is None:
        return [Source(path, stem_of(path))]
    chosen = range(count) if volume is None else [volume]
    if volume is not None and not 0 <= volume < count:
        raise InputError(
            f"--volume {volume}: the file has {count} volumes (0 to {count - 1})", path
        )
    width = len(str(count - 1))
    return [Source(path, f"{stem_of(path)}_vol{v:0{width}d}", volume=v) for v in chosen]


def add_dicom(found: Inputs, item: Path) -> None:
    """Every volume series of a DICOM folder or DICOMDIR as a source (inconsistent ones
    too: reading them fails with a line naming them), the others as left out."""
    from napari_apformer.io.dicom import scan_dicom

    scan = scan_dicom(item)
    volumes = [s for s in scan.series if s.skipped is None]
    names = Counter(s.name for s in volumes)
    for series in scan.series:
        if series.skipped is not None:
            found.left_out.append((f"{item}: {series.label}", series.skipped))
            continue
        stem = series.name
        if names[stem] > 1:  # same number and description (two patients, two studies)
            stem = f"{stem}_{series.uid.replace('.', '')[-8:]}"
        found.sources.append(Source(item, stem, series))
    found.left_out += [(str(path), f"not read: {why}") for path, why in scan.ignored]


def take_shard(sources: Sequence[Source], shard: tuple[int, int] | None) -> list[Source]:
    """Every N-th source of the sorted list from the I-th (as cohort.take_shard for files)."""
    if shard is None:
        return list(sources)
    index, count = shard
    return sorted(sources, key=lambda s: s.sort_key)[index::count]


def labels_suffix(source: Source, output_format: str | None) -> str:
    if output_format is not None:
        return OUTPUT_FORMATS[output_format]
    return ".nii.gz" if source.series is not None else label_suffix_for(source.path)


def output_path_for(
    source: Source, output: Path, single: bool, output_format: str | None = None
) -> Path:
    """OUTPUT itself when it names a label file and there is one input, else
    OUTPUT/<stem>_seg<suffix>."""
    if single and compound_suffix(output) in OUTPUT_SUFFIXES:
        if output_format is not None and not output.name.lower().endswith(
            OUTPUT_FORMATS[output_format]
        ):
            raise InputError(f"--format {output_format} and the output name disagree", output)
        return output
    return output / f"{source.stem}{LABEL_STEM_SUFFIX}{labels_suffix(source, output_format)}"


def probabilities_path(labels_path: Path) -> Path:
    """Where the probability maps of a label file go: `<name>_prob.nii.gz` beside it (the
    label stem without its `_seg` or `.seg`)."""
    stem = stem_of(labels_path)
    for ending in (".seg", LABEL_STEM_SUFFIX):
        if stem.endswith(ending) and len(stem) > len(ending):
            stem = stem[: -len(ending)]
    return labels_path.with_name(f"{stem}{PROBABILITY_STEM_SUFFIX}.nii.gz")


def check_output_format(source: Source, target: Path) -> None:
    """Before anything runs: InputError when the output format cannot hold what the source
    gives (DICOM SEG of a source that is not DICOM, NRRD/MetaImage labels without a
    geometry, 2D PNG labels of a volume format)."""
    suffix = compound_suffix(target)
    kind = "DICOM" if source.series is not None else SOURCE_KINDS.get(compound_suffix(source.path))
    if suffix == DICOM_SEG_SUFFIX and source.series is None:
        raise InputError(
            f"DICOM SEG (.dcm) needs a DICOM series as input, and {source} is not one; "
            "write NIfTI (.nii.gz), NRRD (.seg.nrrd) or MetaImage (.mha) labels instead",
            target,
        )
    if suffix in (".nrrd", ".mha") and kind is None:
        raise InputError(
            f"{suffix} labels need a source with a geometry (NIfTI, NRRD, MetaImage or "
            f"DICOM); {source.path.name} has none: write .png or .tif labels",
            target,
        )
    if suffix == ".png" and kind is not None:
        also = " or .dcm" if kind == "DICOM" else ""
        raise InputError(
            f"{kind} labels must be written as .nii.gz, .nii, .nrrd or .mha{also} to keep "
            "their geometry",
            target,
        )
