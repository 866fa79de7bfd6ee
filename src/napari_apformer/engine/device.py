"""Which torch device to run on: auto picks CUDA, then MPS, then the CPU."""

from __future__ import annotations

import torch

from napari_apformer.errors import InputError


def available_devices() -> list[str]:
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices[:0] = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        devices.insert(0, "mps")
    return devices


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """'auto', 'cpu', 'cuda', 'cuda:N' or 'mps' to a device that exists here."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device(available_devices()[0])
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(
            "CUDA was asked for but torch sees no CUDA GPU here; use --device cpu "
            "or install the CUDA build of torch (see README)"
        )
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise InputError(f"{name}: only {torch.cuda.device_count()} CUDA device(s) here")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise InputError("MPS was asked for but is not available on this machine")
    return device


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "out of memory" in str(error).lower()
    )


DEVICE_FAILURE_MARKERS = ("cuda error", "cudnn", "cublas", "device-side assert", "mps backend")


def is_device_failure(error: BaseException) -> bool:
    """A driver or accelerator error (a GPU lost mid-run), not a bug in the inputs."""
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(error, accelerator_error):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(m in text for m in DEVICE_FAILURE_MARKERS)
