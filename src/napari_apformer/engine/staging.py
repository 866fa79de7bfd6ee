"""Host buffers for model inputs: allocated once, reused batch after batch.

On CUDA they are pinned, so the copy to the GPU runs asynchronously while the CPU prepares the
next batch. Two buffers take turns; before one is refilled we wait for the copy that last read
it (an event recorded after that copy), never for the whole device.
"""

from __future__ import annotations

import torch


class HostStaging:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pinned = device.type == "cuda"
        self._slots: dict[tuple[int, ...], list[tuple[torch.Tensor, torch.cuda.Event | None]]] = {}
        self._turn = 0

    def buffer(self, shape: tuple[int, ...]) -> tuple[torch.Tensor, int]:
        """A host tensor of `shape` (float32) to fill, and its slot number for `send`."""
        key = tuple(shape[1:])
        slots = self._slots.setdefault(key, [])
        self._turn = (self._turn + 1) % 2
        while len(slots) <= self._turn:
            slots.append((self._allocate((max(shape[0], 1), *key)), None))
        tensor, copied = slots[self._turn]
        if tensor.shape[0] < shape[0]:
            tensor = self._allocate(shape)
            slots[self._turn] = (tensor, None)
        elif copied is not None:
            copied.synchronize()
        return tensor[: shape[0]], self._turn

    def send(self, host: torch.Tensor, slot: int) -> torch.Tensor:
        """Copy a filled buffer to the device (asynchronously where pinned)."""
        if self.device.type == "cpu":
            return host
        moved = host.to(self.device, non_blocking=self.pinned)
        if self.pinned:
            event = torch.cuda.Event()
            event.record()
            key = tuple(host.shape[1:])
            self._slots[key][slot] = (self._slots[key][slot][0], event)
        return moved

    def _allocate(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.empty(shape, dtype=torch.float32, pin_memory=self.pinned)
