"""Writing files so that a crash or a kill never leaves a half-written output."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Call write(tmp) on a temporary file beside `path`, then rename it onto `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes)  # writers pick the format from the suffix
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".part{suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual mode
        os.replace(tmp, path)
    finally:
        with suppress(FileNotFoundError):
            tmp.unlink()


def compound_suffix(path: Path) -> str:
    """'.nii.gz' for 'x.nii.gz', else the last suffix, lower-case."""
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def stem_of(path: Path) -> str:
    suffix = compound_suffix(path)
    return path.name[: len(path.name) - len(suffix)] if suffix else path.name


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
