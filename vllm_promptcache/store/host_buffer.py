"""The host-RAM tier's bytes: one buffer, allocated once, cut into fixed-size slots.

Lives in each worker; the scheduler-side `HostTier` decides which slot holds
what.  Slot `s` holds one KV block of every layer: layer i's bytes are at
`[s, offset[i] : offset[i] + page_bytes[i]]`.  Pinned (page-locked) where a GPU
is present, and mapped into the GPU's address space (`map_to_device`), so the copy
kernels read and write slots directly at PCIe speed, with no staging copy.

`StagingPool` is the same kind of buffer, allocated once at start-up, lent out in
runs of slots: the disk tier's write staging, so no write allocates pinned memory.
"""

from __future__ import annotations

import threading
import weakref
from typing import Callable, Sequence

import torch


class HostBuffer:
    def __init__(self, num_slots: int, layer_page_bytes: Sequence[tuple[str, int]], pin: bool,
                 _data: torch.Tensor | None = None, _device_data: torch.Tensor | None = None):
        self.layer_names = [name for name, _ in layer_page_bytes]
        self.page_bytes = {name: nbytes for name, nbytes in layer_page_bytes}
        self.offsets = {}
        off = 0
        for name, nbytes in layer_page_bytes:
            self.offsets[name] = off
            off += nbytes
        self.slot_bytes = off
        self.num_slots = num_slots
        self.pinned = pin
        self.data = _data if _data is not None else torch.empty(
            (num_slots, self.slot_bytes), dtype=torch.uint8, pin_memory=pin)
        # The same bytes as a tensor on the accelerator (unified addressing), or None.
        self.device_data = _device_data

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    def map_to_device(self, view_of: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Give the buffer a device view (`view_of(pinned cpu tensor)`, e.g. compat's
        accelerator_view, which insists on pinned memory); kernels then address the slots
        from the GPU."""
        self.device_data = view_of(self.data)

    def layer_view(self, layer_name: str, on_device: bool = False) -> torch.Tensor:
        """[num_slots, page_bytes] view of one layer's bytes in every slot (through the
        device view with `on_device`)."""
        data = self.device_data if on_device else self.data
        if data is None:
            raise ValueError("this host buffer has no device view")
        off = self.offsets[layer_name]
        return data[:, off:off + self.page_bytes[layer_name]]

    def rows(self, start: int, count: int) -> "HostBuffer":
        """Slots [start, start + count) as a HostBuffer of their own (same memory)."""
        layout = [(n, self.page_bytes[n]) for n in self.layer_names]
        dev = None if self.device_data is None else self.device_data[start:start + count]
        return HostBuffer(count, layout, self.pinned, self.data[start:start + count], dev)


class StagingPool:
    """A fixed buffer of slots lent out in contiguous runs (first fit).  `lease(n)` gives a
    HostBuffer of n slots, or None when no run of n slots is free: the caller drops that
    write (and counts it) rather than allocating.  A lease goes back with `release()`, or
    when the last reference to it is dropped (the disk writer simply lets go of it)."""

    def __init__(self, num_slots: int, layer_page_bytes: Sequence[tuple[str, int]], pin: bool):
        self.buffer = HostBuffer(num_slots, layer_page_bytes, pin)
        self._free: list[tuple[int, int]] = [(0, num_slots)] if num_slots else []
        self._lock = threading.Lock()

    @property
    def num_slots(self) -> int:
        return self.buffer.num_slots

    def free_slots(self) -> int:
        with self._lock:
            return sum(n for _, n in self._free)

    def lease(self, count: int) -> HostBuffer | None:
        if count <= 0:
            raise ValueError(f"a lease needs at least one slot, asked for {count}")
        with self._lock:
            for i, (start, n) in enumerate(self._free):
                if n >= count:
                    if n == count:
                        del self._free[i]
                    else:
                        self._free[i] = (start + count, n - count)
                    break
            else:
                return None
        lease = self.buffer.rows(start, count)
        done = weakref.finalize(lease, self._give_back, start, count)
        lease.release = done  # idempotent: a finalizer runs once
        return lease

    def _give_back(self, start: int, count: int) -> None:
        with self._lock:
            self._free.append((start, count))
            self._free.sort()
            merged: list[tuple[int, int]] = []
            for s, n in self._free:
                if merged and merged[-1][0] + merged[-1][1] == s:
                    merged[-1] = (merged[-1][0], merged[-1][1] + n)
                else:
                    merged.append((s, n))
            self._free = merged
