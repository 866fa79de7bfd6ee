"""PNG, JPEG (imageio) and TIFF (tifffile): grey, colour, 16-bit, and TIFF stacks."""

from __future__ import annotations

from pathlib import Path

import imageio.v3 as iio
import numpy as np
import tifffile
from PIL import Image

from napari_apformer.errors import InputError, first_line
from napari_apformer.io.files import compound_suffix, write_atomically
from napari_apformer.io.image_file import (
    ImageFile,
    check_float32_range,
    check_pixel_type,
    label_dtype,
    spatial_ndim,
)
from napari_apformer.io.memory import require_memory

TO_RGB_MODES = ("CMYK", "YCbCr", "LAB", "HSV")
FORMAT_NAMES = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".tif": "TIFF", ".tiff": "TIFF"}


def read_image(path: Path) -> ImageFile:
    suffix = compound_suffix(path)
    if not path.is_file():
        raise InputError("file not found", path)
    if path.stat().st_size == 0:
        raise InputError("empty file (0 bytes)", path)
    try:
        data = _read_tiff(path) if suffix in (".tif", ".tiff") else _read_pillow(path)
    except InputError:
        raise
    except Exception as error:  # the decoders raise many types for a bad file
        text = first_line(error)
        raise InputError(
            f"not a readable {FORMAT_NAMES.get(suffix, suffix)} image ({text})", path
        ) from None
    data = np.asarray(data)
    check_pixel_type(data.dtype, path)
    check_float32_range(data, path)
    while data.ndim > 2 and data.shape[0] == 1:  # single-page stacks
        data = data[0]
    rgb = data.ndim >= 3 and data.shape[-1] in (3, 4)
    if data.ndim >= 3 and data.shape[-1] == 2:  # grey + alpha
        data = data[..., 0]
    spatial = spatial_ndim(data, rgb, path)
    return ImageFile(data=data, source=path, rgb=rgb, spacing=(1.0,) * spatial)


def _read_pillow(path: Path) -> np.ndarray:
    """PNG and JPEG, sized from the header before decoding; CMYK and other colour spaces
    converted to RGB (read as they are stored, CMYK would look like inverted RGBA)."""
    with Image.open(path) as image:  # reads the header only
        width, height = image.size
        frames = getattr(image, "n_frames", 1)
        bands = 4 if image.mode in ("P", "PA") else len(image.getbands())  # palette: to RGBA
        depth = 2 if image.mode.startswith("I;16") else 4 if image.mode in ("I", "F") else 1
        mode = "RGB" if image.mode in TO_RGB_MODES else None
    # Pillow's own buffer (4 bytes a pixel for colour), a converted copy and the array: at
    # most about 4 bytes a pixel for each byte of the array, plus 4 (measured: RGB 10, L 3)
    require_memory(width * height * frames * (4 * bands * depth + 4), path)
    return iio.imread(path, plugin="pillow", mode=mode)  # name the decoder: probing is odd


def _read_tiff(path: Path) -> np.ndarray:
    """The file's image (tifffile's first series), sized from the header before decoding.

    Colour stored plane by plane (planar configuration 2, samples before the rows) is moved
    to the last axis, where colour goes. Several images of one shape are read as a stack;
    images of different shapes are refused rather than reading only the first."""
    with tifffile.TiffFile(path) as tif:
        series = tif.series
        if not series:
            raise InputError("holds no image", path)
        shapes = sorted({tuple(s.shape) for s in series})
        if len(shapes) > 1:
            sizes = ", ".join(" x ".join(map(str, shape)) for shape in shapes)
            raise InputError(
                f"holds {len(series)} images of different sizes ({sizes}); save each image "
                "as a file of its own",
                path,
            )
        if any(s.keyframe.photometric == tifffile.PHOTOMETRIC.SEPARATED for s in series):
            raise InputError("CMYK TIFF is not supported; save the image as RGB", path)
        # the decoded array, and at most as much again in strips or tiles being decoded
        require_memory(2 * sum(s.nbytes for s in series), path)
        images = [_samples_last(s.asarray(), s.axes) for s in series]
    return images[0] if len(images) == 1 else np.stack(images)


def _samples_last(data: np.ndarray, axes: str) -> np.ndarray:
    """tifffile names colour samples "S"; planar files store them before the rows."""
    return np.moveaxis(data, axes.index("S"), -1) if "S" in axes else data


def write_image_labels(path: Path, labels: np.ndarray) -> None:
    """PNG for 2D labels, TIFF for 2D or 3D; label values stored as they are (uint8/uint16)."""
    suffix = compound_suffix(path)
    dtype = label_dtype(int(labels.max(initial=0)))
    labels = np.ascontiguousarray(labels, dtype=dtype)
    if suffix == ".png":
        if labels.ndim != 2:
            raise InputError(f"PNG holds 2D labels only, got shape {labels.shape}", path)
        write_atomically(path, lambda tmp: iio.imwrite(tmp, labels, extension=".png"))
    elif suffix in (".tif", ".tiff"):
        write_atomically(path, lambda tmp: tifffile.imwrite(tmp, labels, compression="zlib"))
    else:
        raise InputError("labels can be written as .png, .tif or .tiff here", path)
