"""The host-RAM tier's bytes: one buffer, allocated once, cut into fixed-size slots.

Lives in each worker; the scheduler-side `HostTier` decides which slot holds
what.  Slot `s` holds one KV block of every layer: layer i's bytes are at
`[s, offset[i] : offset[i] + page_bytes[i]]`.  Pinned (page-locked) where a GPU
is present, so host<->GPU copies run at full PCIe speed and asynchronously.
"""

from __future__ import annotations

from typing import Sequence

import torch


class HostBuffer:
    def __init__(self, num_slots: int, layer_page_bytes: Sequence[tuple[str, int]], pin: bool):
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
        self.data = torch.empty((num_slots, self.slot_bytes), dtype=torch.uint8, pin_memory=pin)

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    def layer_view(self, layer_name: str) -> torch.Tensor:
        """[num_slots, page_bytes] view of one layer's bytes in every slot."""
        off = self.offsets[layer_name]
        return self.data[:, off:off + self.page_bytes[layer_name]]
