"""PNG, JPEG (imageio) and TIFF (tifffile): grey, colour, 16-bit, and TIFF stacks."""

from __future__ import annotations

from pathlib import Path

import imageio.v3 as iio
import numpy as np
import tifffile

from napari_apformer.errors import InputError
from napari_apformer.io.files import compound_suffix, write_atomically
from napari_apformer.io.image_file import ImageFile, label_dtype, spatial_ndim

FORMAT_NAMES = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".tif": "TIFF", ".tiff": "TIFF"}


def read_image(path: Path) -> ImageFile:
    suffix = compound_suffix(path)
    if not path.is_file():
        raise InputError("file not found", path)
    if path.stat().st_size == 0:
        raise InputError("empty file (0 bytes)", path)
    try:
        if suffix in (".tif", ".tiff"):
            data = tifffile.imread(path)
        else:  # name the decoder: probing every imageio plugin gives odd messages
            data = iio.imread(path, plugin="pillow")
    except Exception as error:  # the decoders raise many types for a bad file
        text = (
            str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        )
        raise InputError(
            f"not a readable {FORMAT_NAMES.get(suffix, suffix)} image ({text})", path
        ) from None
    data = np.asarray(data)
    numeric = np.issubdtype(data.dtype, np.number) or data.dtype == np.bool_
    if data.dtype.fields is not None or not numeric:
        raise InputError(f"unsupported pixel type {data.dtype}", path)
    while data.ndim > 2 and data.shape[0] == 1:  # single-page stacks
        data = data[0]
    rgb = data.ndim >= 3 and data.shape[-1] in (3, 4)
    if data.ndim >= 3 and data.shape[-1] == 2:  # grey + alpha
        data = data[..., 0]
    spatial = spatial_ndim(data, rgb, path)
    return ImageFile(data=data, source=path, rgb=rgb, spacing=(1.0,) * spatial)


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
