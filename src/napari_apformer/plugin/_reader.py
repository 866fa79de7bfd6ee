"""napari reader: NIfTI, PNG, JPEG, TIFF, NRRD, MetaImage and DICOM series through the
package's own readers.

napari calls `get_reader(path)`; it returns a function for files (or DICOM folders and
DICOMDIRs) we can open, else None. The function never raises: a file that turns out to be
unreadable gives an error notification with the problem first and the file after it, and
no layer. A DICOM folder opens one layer per readable series; each series or file left out
gets a warning.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from napari_apformer.errors import InputError
from napari_apformer.io.acquisition import of_image
from napari_apformer.io.display import display_array, placement
from napari_apformer.io.files import stem_of
from napari_apformer.io.formats import (
    is_dicom_source,
    is_readable_name,
    read_class_table,
    read_image_file,
    source_stem,
)
from napari_apformer.io.image_file import ImageFile
from napari_apformer.io.nifti import read_nifti
from napari_apformer.plugin.layer_metadata import SourceInfo, class_colormap, class_features

LABEL_NAME_MARKERS = ("_seg", "label", "mask")
MAX_LABEL_VALUES = 32  # integer images with at most this many values open as Labels
LayerData = tuple[np.ndarray, dict, str]


def get_reader(path: str | list[str]) -> Callable[[str | list[str]], list[LayerData]] | None:
    paths = [path] if isinstance(path, str) else list(path)
    # Files by name; DICOM folders and DICOMDIRs by what they hold.
    if not paths or not all(is_readable_name(Path(p)) or is_dicom_source(Path(p)) for p in paths):
        return None
    return read_layers


def read_layers(path: str | list[str]) -> list[LayerData]:
    paths = [path] if isinstance(path, str) else list(path)
    layers = []
    for p in paths:
        try:
            if not is_readable_name(Path(p)) and is_dicom_source(Path(p)):
                layers += dicom_layers(Path(p))
            else:
                layers.append(layer_data(read_file(Path(p))))
        except InputError as error:
            _notify_error(message_of(error))
        except MemoryError:
            _notify_error(f"not enough memory to open this file ({p})")
    # napari's "read, but no layers" value: the error above is the whole message
    return layers or [(None,)]


def read_file(path: Path) -> ImageFile:
    if path.name.lower().endswith((".nii", ".nii.gz")):
        return read_nifti(path, allow_series=True)
    return read_image_file(path)


def dicom_layers(path: Path) -> list[LayerData]:
    """One layer per readable series of a DICOM folder or DICOMDIR, each named by
    source_stem (folder, series number, description); a warning for each series or file
    left out. InputError when the folder holds no DICOM image series."""
    from napari_apformer.io.dicom import read_dicom_folder

    folder = read_dicom_folder(path)
    for line in folder.problems:
        _notify_warning(line)
    return [layer_data(image) for image in folder.images]


def layer_data(image: ImageFile) -> LayerData:
    """(data, layer keyword arguments, layer type) for napari."""
    where = placement(image)
    for note in image.notes:
        _notify_warning(f"{note} ({image.source})")
    if where.oblique:
        _notify_warning(
            "the voxel axes are oblique to the scanner axes; napari shows the nearest "
            "axis-aligned placement. Exported labels keep the exact original geometry "
            f"({image.source})"
        )
    data = display_array(image)
    kwargs: dict = {
        "name": source_stem(image),
        "scale": where.scale,
        "translate": where.translate,
        "axis_labels": where.axis_labels,
        "units": where.units,
        "metadata": SourceInfo(
            image.source, image.nifti, image.series, image.spacing, of_image(image)
        ).to_metadata(),
    }
    if not image.rgb and is_label_image(image.source, data):
        label_type = _label_type(data)
        if label_type is None:
            _notify_warning(
                f"label values up to {float(data.max()):.3g} do not fit a label layer (at "
                f"most 2**32 - 1); opened as an image ({image.source})"
            )
        else:
            _add_class_table(kwargs, image.source)
            return np.asarray(data, dtype=label_type), kwargs, "labels"
    kwargs["rgb"] = image.rgb
    return data, kwargs, "image"


def is_label_image(source: Path, data: np.ndarray) -> bool:
    if any(marker in stem_of(source).lower() for marker in LABEL_NAME_MARKERS):
        return np.issubdtype(data.dtype, np.integer) or _whole_numbers(data)
    if not np.issubdtype(data.dtype, np.integer):
        return False
    step = max(1, int(np.ceil((data.size / 2**20) ** (1 / data.ndim))))
    sample = data[(slice(None, None, step),) * data.ndim]
    if len(np.unique(sample)) > MAX_LABEL_VALUES:
        return False
    values = np.unique(data)
    # A constant image (all zeros, say) holds no labels: it opens as an image.
    return 1 < len(values) <= MAX_LABEL_VALUES and int(values[0]) >= 0


def _whole_numbers(data: np.ndarray) -> bool:
    finite = np.isfinite(data).all()
    return bool(finite and data.min() >= 0 and np.array_equal(data, np.round(data)))


def _label_type(data: np.ndarray) -> type | None:
    """The integer type of a label layer for `data`; None when its values do not fit one."""
    if np.issubdtype(data.dtype, np.integer):
        return data.dtype.type
    largest = float(data.max(initial=0))
    fitting = (t for t in (np.uint8, np.uint16, np.uint32) if largest <= np.iinfo(t).max)
    return next(fitting, None)


def _add_class_table(kwargs: dict, source: Path) -> None:
    """Class names and colours from the sidecar; a sidecar that cannot be used is ignored
    with a warning (the labels open without it)."""
    try:
        table = read_class_table(source)
    except InputError as error:
        where = f" ({error.source})" if error.source is not None else ""
        _notify_warning(f"{error.problem}; ignored, the labels open without class names{where}")
        return
    if table:
        kwargs["features"] = class_features(table)
        kwargs["colormap"] = class_colormap(table)


def message_of(error: InputError) -> str:
    """The problem first, the file it concerns after it (a message cut short in a
    notification still says what went wrong)."""
    return f"{error.problem} ({error.source})" if error.source is not None else error.problem


def _notify_error(message: str) -> None:
    from napari.utils.notifications import show_error

    show_error(message)


def _notify_warning(message: str) -> None:
    from napari.utils.notifications import show_warning

    show_warning(message)
