"""Brain tissue labels from the MNI ICBM152 2009 template that the nilearn wheel ships.

The three files are read straight from the wheel (or an installed nilearn's data folder) with
nibabel; nilearn itself is never imported. Classes: background, CSF, grey matter, white matter.
"""

from __future__ import annotations

import gzip
import importlib.util
import zipfile
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from napari_apformer.errors import InputError

DATA_FOLDER = "nilearn/datasets/data"
FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
CLASSES = [
    {"value": 0, "name": "background", "colour": "#000000"},
    {"value": 1, "name": "CSF", "colour": "#4f9dde"},
    {"value": 2, "name": "grey matter", "colour": "#e8a33c"},
    {"value": 3, "name": "white matter", "colour": "#f2f0e6"},
]
BRAIN_FRACTION = 0.2  # brain = T1 / max(T1) > 0.2
NOTICE = """Derived from the MNI ICBM152 2009 non-linear symmetric template (version 09a, 1 mm) as
distributed in the nilearn wheel (nilearn/datasets/data/mni_icbm152_{t1,gm,wm}_tal_nlin_sym_09a_
converted.nii.gz). Tissue labels: brain = T1/max > 0.2; CSF = clip(1 - GM - WM, 0, 1) inside the
brain; label = argmax of CSF, GM, WM (napari_apformer.train.mni152).

Template notice:

Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, Montreal Neurological
Institute, McGill University. Permission to use, copy, modify, and distribute this software
and its documentation for any purpose and without fee is hereby granted, provided that the
above copyright notice appear in all copies. The authors and McGill University make no
representations about the suitability of this software for any purpose. It is provided
"as is" without express or implied warranty. The authors are not responsible for any data
loss, equipment damage, property loss, or injury to subjects or patients resulting from the
use or misuse of this software package.

References: Fonov et al., NeuroImage 47 (2009) S102 and NeuroImage 54 (2011) 313-327;
Collins et al., NeuroImage 9 (1999) S355.
"""


@dataclass
class Template:
    t1: np.ndarray  # float32, RAS voxel order, 1 mm
    gm: np.ndarray  # grey-matter probability in [0, 1]
    wm: np.ndarray
    affine: np.ndarray


def find_template(source: Path | None = None) -> Path:
    """A nilearn wheel or a folder holding the three files; by default an installed nilearn's
    data folder (found without importing nilearn)."""
    if source is not None:
        return source
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise InputError(
            "the MNI152 template ships in the nilearn wheel: give its path "
            "(pip download --no-deps nilearn) or install nilearn"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"


def load_template(source: Path | None = None) -> Template:
    where = find_template(source)
    images = {key: _load(where, name) for key, name in FILES.items()}
    t1 = images["t1"]
    arrays = {k: np.asarray(v.dataobj, dtype=np.float32) for k, v in images.items()}
    if not (arrays["t1"].shape == arrays["gm"].shape == arrays["wm"].shape):
        raise InputError("the template files differ in shape", where)
    scale = {k: max(float(a.max()), 1e-6) for k, a in arrays.items()}
    return Template(
        arrays["t1"],
        np.clip(arrays["gm"] / (scale["gm"] if scale["gm"] > 1.5 else 1.0), 0, 1),
        np.clip(arrays["wm"] / (scale["wm"] if scale["wm"] > 1.5 else 1.0), 0, 1),
        t1.affine,
    )


def tissue_labels(t1: np.ndarray, gm: np.ndarray, wm: np.ndarray) -> np.ndarray:
    """0 background, 1 CSF, 2 grey matter, 3 white matter: brain = T1/max > 0.2, CSF =
    clip(1 - GM - WM, 0, 1) inside the brain, label = argmax of the three inside the brain."""
    brain = t1 / max(float(t1.max()), 1e-6) > BRAIN_FRACTION
    csf = np.clip(1.0 - gm - wm, 0.0, 1.0)
    tissue = np.argmax(np.stack([csf, gm, wm]), axis=0).astype(np.uint8) + 1
    return np.where(brain, tissue, 0).astype(np.uint8)


DATA_TEXT = (
    "the MNI ICBM152 2009 non-linear symmetric T1 template (1 mm, from the nilearn wheel) with "
    "tissue labels from its grey- and white-matter maps; slices along all three axes"
)
LICENCE_TEXT = (
    "Weights derived from the MNI ICBM152 2009 template: Copyright (C) 1993-2009 Louis "
    "Collins, McConnell Brain Imaging Centre, Montreal Neurological Institute, McGill "
    "University; use, copy, modify and distribute with this notice, no warranty (full notice: "
    "napari_apformer/samples/NOTICE_MNI152.txt). Code: MIT."
)
VALIDATION_BLOCK = (0.55, 0.65)  # of each axis's brain extent: one contiguous block per axis
MIDLINE_MM = 4.0  # sagittal slices this close to x = 0 are left out (between the hemispheres)


def slice_split(template: Template) -> tuple[dict[int, list[int]], dict[int, list[int]]]:
    """Train and validation slice indices per RAS axis (0 sagittal, 1 coronal, 2 axial)."""
    labels = tissue_labels(template.t1, template.gm, template.wm)
    train: dict[int, list[int]] = {}
    val: dict[int, list[int]] = {}
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        present = np.flatnonzero(labels.any(axis=others))
        low, high = int(present[0]), int(present[-1])
        start = low + int(VALIDATION_BLOCK[0] * (high - low))
        stop = low + int(VALIDATION_BLOCK[1] * (high - low))
        indices = range(low, high + 1)
        if axis == 0:
            world_x = template.affine[0, 0] * np.arange(labels.shape[0]) + template.affine[0, 3]
            indices = [i for i in indices if abs(world_x[i]) >= MIDLINE_MM]
        val[axis] = [i for i in indices if start <= i < stop]
        train[axis] = [i for i in indices if not start <= i < stop]
    return train, val


def dataset(source: Path | None, normalisation, rule=None) -> tuple:
    """(training, validation) SliceSets of the template, split by slice_split; `rule`: the
    model's input rule (datasets.training_rule)."""
    from napari_apformer.train.datasets import volume_slices

    template = load_template(source)
    labels = tissue_labels(template.t1, template.gm, template.wm)
    train_slices, val_slices = slice_split(template)
    common = {
        "in_channels": 1,
        "normalisation": normalisation,
        "n_classes": len(CLASSES),
        "axes": (0, 1, 2),
        "spacing": tuple(float(z) for z in np.abs(np.diag(template.affine))[:3]),
        "name": "MNI152",
        "rule": rule,
    }
    return (
        volume_slices(template.t1, labels, keep=train_slices, **common),
        volume_slices(template.t1, labels, keep=val_slices, **common),
    )


def _load(where: Path, name: str) -> nib.Nifti1Image:
    try:
        if where.is_file() and zipfile.is_zipfile(where):
            with zipfile.ZipFile(where) as wheel:
                raw = gzip.decompress(wheel.read(f"{DATA_FOLDER}/{name}"))
            return nib.Nifti1Image.from_bytes(raw)
        return nib.load(str(where / name))
    except (OSError, KeyError, zipfile.BadZipFile) as error:
        raise InputError(f"cannot read the template file {name} ({error})", where) from None
