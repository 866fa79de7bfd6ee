"""What kind of scan an image holds, where its files say so, so that weights made for one kind
(the shipped ones: T1-weighted MR) can warn when they meet another (an EPI, a CT).

Only what the files state is used, never pixel statistics: intensity deciles and the model's
confidence could not tell a real T1 scan from an EPI (docs/reliability.md). The statements
read, first found wins:
- DICOM: Modality and ScanningSequence ("EP": echo planar) of the series (io.dicom);
- a BIDS sidecar beside the file (`scan.json` for `scan.nii.gz`): Modality,
  ScanningSequence, PulseSequenceType;
- a BIDS file-name suffix (`sub-01_task-rest_bold.nii.gz`, `sub-01_T2w.nii.gz`, `_ct`);
- a NIfTI header with volumes over time (4D, a time unit and a repetition time): fMRI or
  perfusion, which are EPI.
Nothing here raises: a sidecar that cannot be read is simply not a statement.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from napari_apformer.io.files import compound_suffix, stem_of
from napari_apformer.io.formats import NIFTI_SUFFIXES

if TYPE_CHECKING:
    from napari_apformer.io.image_file import ImageFile

# BIDS suffixes (modality, contrast); EPI contrasts share the contrast name "EPI".
BIDS_SUFFIXES: dict[str, tuple[str, str]] = {
    "T1w": ("MR", "T1w"),
    "inplaneT1": ("MR", "T1w"),
    "MPRAGE": ("MR", "T1w"),
    "T2w": ("MR", "T2w"),
    "inplaneT2": ("MR", "T2w"),
    "FLAIR": ("MR", "FLAIR"),
    "PDw": ("MR", "PDw"),
    "PDT2": ("MR", "PDw"),
    "T2starw": ("MR", "T2starw"),
    "angio": ("MR", "angio"),
    "bold": ("MR", "EPI"),
    "sbref": ("MR", "EPI"),
    "dwi": ("MR", "EPI"),
    "epi": ("MR", "EPI"),
    "ct": ("CT", ""),
    "CT": ("CT", ""),
    "pet": ("PT", ""),
}
NAMES = {"EPI": "an echo-planar EPI scan", "CT": "a CT scan", "PT": "a PET scan"}
SIDECAR_LIMIT = 1 << 20  # a BIDS sidecar is a few kB; larger JSON is not one
TIME_UNITS = ("sec", "msec", "usec")


@dataclass(frozen=True)
class Acquisition:
    """modality: DICOM's term ("MR", "CT", "PT", ...); contrast: a BIDS suffix ("T1w",
    "T2w", "FLAIR") or "EPI"; "" where unknown. evidence: where it was read, for messages."""

    modality: str
    contrast: str
    evidence: str

    @property
    def kind(self) -> str:
        """'an echo-planar EPI scan', 'a T2w MR scan', 'a CT scan'."""
        if self.contrast in NAMES:
            return NAMES[self.contrast]
        if self.contrast:
            return f"a {self.contrast} {self.modality or 'MR'} scan"
        return NAMES.get(self.modality, f"a {self.modality} scan")


def from_dicom(modality: str, scanning_sequence: str, where: str = "DICOM") -> Acquisition | None:
    """From DICOM's Modality and ScanningSequence (multi-valued, e.g. 'GR\\IR'); `where`
    names the source in the evidence."""
    sequences = {s.strip().upper() for s in re.split(r"[\\/,\s]+", scanning_sequence or "")}
    modality = (modality or "MR").upper()
    if modality == "MR" and "EP" in sequences:
        return Acquisition("MR", "EPI", f"{where} ScanningSequence EP")
    if modality != "MR":
        return Acquisition(modality, "", f"{where} Modality {modality}")
    return None


def of_file(path: Path) -> Acquisition | None:
    """What the file's BIDS sidecar, its BIDS name and its NIfTI header say, in that order."""
    path = Path(path)
    return _from_sidecar(path) or _from_bids_name(path) or _from_nifti_header(path)


def _from_bids_name(path: Path) -> Acquisition | None:
    stem = stem_of(path)
    if "_" not in stem:
        return None  # BIDS names are key-value pairs joined by "_", the suffix last
    suffix = stem.rsplit("_", 1)[1]
    if suffix not in BIDS_SUFFIXES:
        return None
    modality, contrast = BIDS_SUFFIXES[suffix]
    return Acquisition(modality, contrast, f"the BIDS name suffix _{suffix}")


def _from_sidecar(path: Path) -> Acquisition | None:
    sidecar = path.with_name(stem_of(path) + ".json")
    try:
        if sidecar == path or sidecar.stat().st_size > SIDECAR_LIMIT:
            return None
        raw: Any = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(raw, dict):
        return None
    sequence = raw.get("ScanningSequence")
    sequence = "\\".join(map(str, sequence)) if isinstance(sequence, list) else str(sequence or "")
    pulse = str(raw.get("PulseSequenceType") or "")
    modality = str(raw.get("Modality") or "").upper()
    if "EPI" in pulse.upper() or "ECHO PLANAR" in pulse.upper():
        return Acquisition("MR", "EPI", f"its sidecar {sidecar.name}: PulseSequenceType {pulse}")
    return from_dicom(modality, sequence, where=f"its sidecar {sidecar.name}:")


def _from_nifti_header(path: Path) -> Acquisition | None:
    if compound_suffix(path) not in NIFTI_SUFFIXES:
        return None
    try:
        import nibabel as nib

        header = nib.load(path).header
        dims = header["dim"]
        _, time_unit = header.get_xyzt_units()
        repetition = float(header["pixdim"][4])
    except Exception:  # the file was read before: a header quirk is simply no statement
        return None
    if int(dims[0]) >= 4 and int(dims[4]) > 1 and time_unit in TIME_UNITS and repetition > 0:
        return Acquisition(
            "MR", "EPI", f"its NIfTI header: {int(dims[4])} volumes over time, as fMRI has"
        )
    return None


def made_for_text(made_for: dict) -> str:
    """{"modality": "MR", "contrasts": ["T1w"]} -> 'T1w MR'."""
    contrasts = " or ".join(str(c) for c in made_for.get("contrasts") or [])
    return f"{contrasts} {made_for.get('modality') or ''}".strip()


def of_image(image: ImageFile) -> Acquisition | None:
    """The image's statement: the DICOM series' own, else its file's."""
    if image.acquisition is not None:
        return image.acquisition
    return of_file(image.source) if image.source is not None else None


def mismatch(acquisition: Acquisition | None, made_for: dict) -> str | None:
    """One line when the scan is not what the weights were made for (the card's `made_for`:
    {"modality": "MR", "contrasts": ["T1w"]}); None when they agree or either is unknown."""
    if acquisition is None or not made_for:
        return None
    modality = str(made_for.get("modality") or "")
    contrasts = [str(c) for c in made_for.get("contrasts") or []]
    seen = acquisition
    wrong_modality = bool(modality and seen.modality and seen.modality != modality)
    wrong_contrast = bool(contrasts and seen.contrast and seen.contrast not in contrasts)
    if not (wrong_modality or wrong_contrast):
        return None
    return (
        f"this looks like {acquisition.kind} ({acquisition.evidence}), but the weights were "
        f"made for {made_for_text(made_for)} scans: expect wrong labels (see the weights' limits)"
    )
