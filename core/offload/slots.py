"""A fixed pool of K layer-sized buffers on the compute device: the only memory offloaded layers occupy.

Every materialised decoder layer lives in one slot, so "at most K layers on the device" holds by
construction. A slot is one flat byte buffer; a layer's parameters are views into it at aligned offsets
(the layout), so any layer fits any slot even when layers differ in shape or dtype.

CPU: the prefetch worker reads straight into the slot. CUDA: the worker reads into the slot's pinned host
staging buffer, then copies host -> device on a side stream and records a `ready` event the compute stream
waits on; releasing a slot records a `done` event on the compute stream that the next copy into the slot
waits on, so a slot is never overwritten while a kernel may still read it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

ALIGN_BYTES = 64


@dataclass(frozen=True)
class TensorSpec:
    """One parameter of a layer inside a slot: its name in the layer, dtype, shape and byte offset."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int

    @property
    def nbytes(self) -> int:
        return self.dtype.itemsize * int(torch.Size(self.shape).numel())


Layout = tuple[TensorSpec, ...]  # a layer's tensors inside a slot


def plan_layout(tensors: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> tuple[Layout, int]:
    """Place `(name, dtype, shape)` tensors in one buffer at aligned offsets; return (layout, total bytes)."""
    layout, offset = [], 0
    for name, dtype, shape in tensors:
        spec = TensorSpec(name, dtype, tuple(shape), offset)
        layout.append(spec)
        offset += -(-spec.nbytes // ALIGN_BYTES) * ALIGN_BYTES
    return tuple(layout), offset


def _views(flat: torch.Tensor, layout: Layout) -> dict[str, torch.Tensor]:
    return {s.name: flat[s.offset : s.offset + s.nbytes].view(s.dtype).view(s.shape) for s in layout}


class SlotPool:
    """K slots of `slot_bytes` each on a CPU compute device (the prefetch worker reads into them)."""

    def __init__(self, num_slots: int, slot_bytes: int, device: torch.device) -> None:
        self.num_slots = num_slots
        self.slot_bytes = slot_bytes
        self.device = device
        self.buffers = [torch.empty(slot_bytes, dtype=torch.uint8, device=device) for _ in range(num_slots)]
        self._params: dict[tuple[int, Layout], dict[str, nn.Parameter]] = {}

    @property
    def nbytes(self) -> int:
        return self.num_slots * self.slot_bytes

    def params(self, slot: int, layout: Layout) -> dict[str, nn.Parameter]:
        """Parameters viewing slot `slot` laid out as `layout` (built once, then reused)."""
        key = (slot, layout)
        if key not in self._params:
            views = _views(self.buffers[slot], layout)
            self._params[key] = {n: nn.Parameter(v, requires_grad=False) for n, v in views.items()}
        return self._params[key]

    def free(self) -> None:
        """Drop the slot memory (the offloader is closed)."""
        self.buffers = []
        self._params = {}

    def staging(self, slot: int, layout: Layout) -> dict[str, torch.Tensor]:
        """Host buffers a disk source reads into: on CPU, the slot itself."""
        return self.params(slot, layout)

    def before_fetch(self, slot: int) -> None:
        """Worker thread, before a source writes the slot's staging buffers."""

    def fill(self, slot: int, layout: Layout, host: dict[str, torch.Tensor]) -> None:
        """Worker thread: put the fetched host tensors into the slot."""
        for name, dst in self.params(slot, layout).items():
            src = host[name]
            if src.data_ptr() != dst.data_ptr():
                dst.copy_(src)

    def wait_ready(self, slot: int) -> None:
        """Main thread, before the layer in `slot` runs."""

    def released(self, slot: int) -> None:
        """Main thread, after the layer in `slot` ran and its parameters were unbound."""


class CudaSlotPool(SlotPool):
    """Slots on a CUDA device, filled from pinned host staging buffers on a side stream."""

    def __init__(self, num_slots: int, slot_bytes: int, device: torch.device) -> None:
        super().__init__(num_slots, slot_bytes, device)
        self.stream = torch.cuda.Stream(device)
        self.pinned = [torch.empty(slot_bytes, dtype=torch.uint8).pin_memory() for _ in range(num_slots)]
        self.ready = [torch.cuda.Event() for _ in range(num_slots)]
        self.done = [torch.cuda.Event() for _ in range(num_slots)]
        self._staging: dict[tuple[int, Layout], dict[str, torch.Tensor]] = {}

    def staging(self, slot: int, layout: Layout) -> dict[str, torch.Tensor]:
        key = (slot, layout)
        if key not in self._staging:
            self._staging[key] = _views(self.pinned[slot], layout)
        return self._staging[key]

    def free(self) -> None:
        super().free()
        self.pinned = []
        self._staging = {}

    def before_fetch(self, slot: int) -> None:
        # The previous host->device copy out of this staging buffer must finish before it is overwritten.
        self.ready[slot].synchronize()

    def fill(self, slot: int, layout: Layout, host: dict[str, torch.Tensor]) -> None:
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(self.done[slot])
            for name, dst in self.params(slot, layout).items():
                dst.copy_(host[name], non_blocking=True)
            self.ready[slot].record(self.stream)

    def wait_ready(self, slot: int) -> None:
        torch.cuda.current_stream(self.device).wait_event(self.ready[slot])

    def released(self, slot: int) -> None:
        self.done[slot].record(torch.cuda.current_stream(self.device))


def make_slot_pool(num_slots: int, slot_bytes: int, device: torch.device) -> SlotPool:
    """The pool type for `device` (CUDA side-stream copies on a GPU, direct reads on CPU)."""
    if device.type == "cuda":
        return CudaSlotPool(num_slots, slot_bytes, device)
    return SlotPool(num_slots, slot_bytes, device)
