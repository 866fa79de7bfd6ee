"""Precision names for inference and the autocast dtype each means (torch-free to import,
so the command line can list them without loading torch)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from napari_apformer.errors import InputError

if TYPE_CHECKING:
    import torch

PRECISIONS = ("auto", "float32", "float16", "bfloat16")


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The dtype to autocast to, or None for plain float32.

    auto: float16 on CUDA (labels change on fewer than 0.1 % of voxels, see
    docs/performance.md), float32 elsewhere.
    """
    import torch

    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision == "auto":
        return torch.float16 if device.type == "cuda" else None
    return None if precision == "float32" else getattr(torch, precision)
