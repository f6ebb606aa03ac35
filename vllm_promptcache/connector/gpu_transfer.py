"""The worker's GPU data path: host slots <-> vLLM's paged cache with no CPU copy.

The host buffer is pinned and mapped into the GPU's address space (a device view), so
each copy is one Triton launch per layer that reads (loads) or writes (saves) the host
slots directly over PCIe: `kernels.block_copy.copy_pages_` for whole blocks,
`kernels.rope_shift.rope_shift_paged_` for tokens loaded at other positions.  The only
host->device traffic besides the KV itself is one small non-blocking copy of the step's
index arrays out of a pinned staging buffer (`IndexStaging`).

Ordering and lifetimes, by construction:

* loads run on a side stream that first waits for the compute stream (vLLM may have just
  allocated or zeroed the blocks there); one event per layer, which `wait_layer` makes
  the compute stream wait for before that layer's attention -- except whole-block copies
  into blocks the forward also writes (vLLM writes a layer's new KV before its wait),
  which go first and are waited for before the forward.  A step whose forward is one
  FULL CUDA graph runs no Python between layers, so there the compute stream waits for
  all of the step's loads before the forward instead (`start_loads(..., wait_all=True)`).
* every tensor a side stream reads outlives the stream's use of it: the device view, the
  KV tensors and the frequency table live as long as the worker; index arrays are slices
  of persistent buffers (re-allocated only on growth, on the stream that reads them), and
  the pinned staging buffer is rewritten only after the event of its last copy.
* saves run on a second side stream, on the saver thread, after an event the compute
  stream recorded when the finished requests' KV was complete; the thread waits for the
  stream before reporting the save, so the host bytes are there when vLLM is told.

Also runs on CPU tensors under TRITON_INTERPRET=1 (no streams, no pinning): the tests.
"""

from __future__ import annotations

import threading
from typing import Any, Sequence

import numpy as np
import torch

from .. import compat
from ..kernels.block_copy import copy_pages_, paired_layouts
from ..kernels.rope_shift import paged_kv_views, rope_shift_paged_
from ..kernels.shifted_load import check_token_sources, host_as_layer
from ..store.host_buffer import HostBuffer

# Index entries (int64) the staging buffers hold at start; they double when a step needs more.
INITIAL_INDEX_CAPACITY = 1 << 16


class IndexStaging:
    """Index arrays to the device without a pageable or blocking copy: packed into a pinned
    buffer, sent by one non-blocking copy on the current stream into a persistent device
    buffer.  One instance per stream (and thread)."""

    def __init__(self, device: torch.device, capacity: int = INITIAL_INDEX_CAPACITY):
        self.device = device
        self.cuda = device.type == "cuda"
        self._copied = None  # event: the last copy out of the pinned buffer
        self._alloc(capacity)

    def _alloc(self, capacity: int) -> None:
        self.capacity = capacity
        self.pinned = torch.empty(capacity, dtype=torch.int64, pin_memory=self.cuda)
        # Allocated on the stream that will read it, so freeing it later is ordered there.
        self.on_device = torch.empty(capacity, dtype=torch.int64, device=self.device)

    def send(self, *arrays: Sequence[int]) -> list[torch.Tensor]:
        """The arrays (lists or numpy) as int64 device tensors (views of the persistent
        device buffer); one vectorized pack, no per-element Python work."""
        arrays = [np.asarray(a, dtype=np.int64).reshape(-1) for a in arrays]
        n = sum(len(a) for a in arrays)
        if self._copied is not None:
            self._copied.synchronize()  # normally long done: the last step's copy
        if n > self.capacity:
            cap = self.capacity
            while cap < n:
                cap *= 2
            self._alloc(cap)
        if n:
            self.pinned[:n].copy_(torch.from_numpy(np.concatenate(arrays)))
        self.on_device[:n].copy_(self.pinned[:n], non_blocking=self.cuda)
        if self.cuda:
            self._copied = torch.cuda.Event()
            self._copied.record()
        out, at = [], 0
        for a in arrays:
            out.append(self.on_device[at:at + len(a)])
            at += len(a)
        return out


class ShiftGeometry:
    """What shifted loads need to know of the model: RoPE and the KV layout."""

    def __init__(self, inv_freq: torch.Tensor, rotary_dim: int, is_neox: bool,
                 num_kv_heads: int, head_size: int, block_size: int, layout: str):
        self.inv_freq, self.rotary_dim, self.is_neox = inv_freq, rotary_dim, is_neox
        self.num_kv_heads, self.head_size, self.block_size = num_kv_heads, head_size, block_size
        self.layout = layout


class GpuTransfers:
    def __init__(self, kv: dict[str, torch.Tensor], raw_kv: dict[str, torch.Tensor],
                 buffer: HostBuffer, shift: ShiftGeometry | None = None):
        """kv: blocks-first views; raw_kv: the layers as vLLM allocated them; buffer: the
        host tier, already mapped (`HostBuffer.map_to_device`)."""
        self.kv = kv
        self.buffer = buffer
        self.device = next(iter(kv.values())).device
        self.cuda = self.device.type == "cuda"
        # Built once: a bad layout fails at start-up, not in a step.
        self.layouts = {name: paired_layouts(v, buffer.layer_view(name, on_device=True))
                        for name, v in kv.items()}
        self.shift = shift
        self.shift_views = {}
        if shift is not None:
            shift.inv_freq = shift.inv_freq.to(self.device, torch.float32)
            for name, raw in raw_kv.items():
                host = host_as_layer(buffer.layer_view(name, on_device=True), raw)
                args = (shift.layout, shift.num_kv_heads, shift.head_size, shift.block_size)
                self.shift_views[name] = (paged_kv_views(host, *args), paged_kv_views(raw, *args))
        self.load_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.save_stream = torch.cuda.Stream(self.device) if self.cuda else None
        with self._on(self.load_stream):
            self._load_indices = IndexStaging(self.device)
        with self._on(self.save_stream):
            self._save_indices = IndexStaging(self.device)
        self._save_lock = threading.Lock()  # one saver thread today; keep it safe if more
        self._layer_events: dict[str, Any] = {}
        self._loads_done = None

    def _on(self, stream):
        return torch.cuda.stream(stream) if stream is not None else _Nothing()

    # -- loads (the step's thread) ---------------------------------------------------
    def start_loads(self, block_ids: list[int], slots: list[int], shifted: list[Any],
                    first_blocks: np.ndarray | None = None, forward_context: Any = None) -> int:
        """Issue this step's loads: whole blocks, then tokens at new positions, one launch
        of each per layer, an event after each layer.  `shifted`: ShiftedLoad records.
        Returns 0: the bytes a load thread moves beside the forward (`CpuTransfers`);
        here every load overlaps the forward on the side stream.

        first_blocks: the copied blocks this step's forward also writes KV into (the
        scheduler names them: `PromptCacheMetadata.shared_blocks`).  vLLM writes a
        layer's new KV before that layer
        waits for its load, so whole-block copies into these blocks (a run's partial
        last block, whose free slots the forward fills) go first, every layer, and the
        compute stream waits for them before the forward.  None (not known): with whole
        blocks to copy, the compute stream waits for every load.  Token loads write only
        their own slots, so they never need to go first.  A step whose forward replays
        one FULL CUDA graph (`forward_context`) waits for every load too."""
        if not len(block_ids) and not shifted:
            return 0
        wait_all = compat.full_cudagraph_step(forward_context)
        if first_blocks is None and len(block_ids):
            wait_all = True
        src_tokens = dst_tokens = deltas = np.zeros(0, dtype=np.int64)
        if shifted:
            N = self.shift.block_size
            for load in shifted:
                check_token_sources(load.src_slots, load.src_offsets, self.buffer.num_slots, N)
            src_tokens = np.concatenate([np.asarray(load.src_slots, dtype=np.int64) * N
                                         + np.asarray(load.src_offsets, dtype=np.int64)
                                         for load in shifted])
            dst_tokens = np.concatenate([np.asarray(load.dst_slots, dtype=np.int64)
                                         for load in shifted])
            deltas = np.concatenate([np.asarray(load.deltas, dtype=np.int64) for load in shifted])
        if slots and (min(slots) < 0 or max(slots) >= self.buffer.num_slots):
            raise IndexError(f"host slots out of range [0, {self.buffer.num_slots})")
        blocks_np, slots_np = np.asarray(block_ids, np.int64), np.asarray(slots, np.int64)
        first = (np.isin(blocks_np, first_blocks) if first_blocks is not None and len(blocks_np)
                 else np.zeros(len(blocks_np), dtype=bool))
        compute = torch.cuda.current_stream(self.device) if self.cuda else None
        with self._on(self.load_stream):
            if self.cuda:
                self.load_stream.wait_stream(compute)
            (src_first, dst_first, src_slots, dst_blocks, src_tok, dst_tok,
             delta) = self._load_indices.send(slots_np[first], blocks_np[first],
                                              slots_np[~first], blocks_np[~first],
                                              src_tokens, dst_tokens, deltas)
            if first.any():
                for name in self.kv:
                    host_lay, paged_lay = self.layouts[name][1], self.layouts[name][0]
                    copy_pages_(host_lay, src_first, paged_lay, dst_first)
                if self.cuda:
                    compute.wait_stream(self.load_stream)
            for name in self.kv:
                if (~first).any():
                    host_lay, paged_lay = self.layouts[name][1], self.layouts[name][0]
                    copy_pages_(host_lay, src_slots, paged_lay, dst_blocks)
                if len(src_tokens):
                    (hk, hv), (dk, dv) = self.shift_views[name]
                    s = self.shift
                    rope_shift_paged_(hk, hv, src_tok, dk, dv, dst_tok, delta, s.inv_freq,
                                      s.rotary_dim, s.is_neox)
                if self.cuda:
                    event = torch.cuda.Event()
                    event.record(self.load_stream)
                    self._layer_events[name] = event
            if self.cuda:
                self._loads_done = torch.cuda.Event()
                self._loads_done.record(self.load_stream)
        if wait_all and self.cuda:
            compute.wait_stream(self.load_stream)
            self._layer_events.clear()
        return 0

    def wait_layer(self, name: str) -> None:
        event = self._layer_events.pop(name, None)
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    def end_step(self) -> None:
        """After the forward: the host waits for this step's loads, so a later save or
        disk promotion may reuse their slots."""
        self._layer_events.clear()
        if self._loads_done is not None:
            self._loads_done.synchronize()
            self._loads_done = None

    def step_done_event(self) -> Any:
        """An event on the compute stream: the step's KV (finished requests') is written."""
        if not self.cuda:
            return None
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    # -- saves (the saver thread) ----------------------------------------------------
    def save(self, block_ids: list[int], dst: HostBuffer, slots: list[int], ready: Any) -> None:
        """dst slots <- GPU blocks, every layer; returns when the bytes are in host memory.
        `dst` is the host tier or a staging lease, mapped to the device."""
        if slots and (min(slots) < 0 or max(slots) >= dst.num_slots):
            raise IndexError(f"destination slots out of range [0, {dst.num_slots})")
        same = dst is self.buffer
        with self._save_lock, self._on(self.save_stream):
            if ready is not None:
                self.save_stream.wait_event(ready)
            src_blocks, dst_slots = self._save_indices.send(block_ids, slots)
            for name, kv in self.kv.items():
                if same:
                    paged_lay, host_lay = self.layouts[name]
                else:
                    paged_lay, host_lay = paired_layouts(kv, dst.layer_view(name, on_device=True))
                copy_pages_(paged_lay, src_blocks, host_lay, dst_slots)
            if self.cuda:
                self.save_stream.synchronize()

    def shutdown(self) -> None:
        pass


class _Nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
