"""The worker's CPU data path: host slots <-> the CPU backend's paged cache.

The twin of `gpu_transfer.GpuTransfers`, with the same methods, so the worker only
routes.  Whole blocks are numpy or torch row copies (`kernels.block_copy`); tokens
loaded at other positions go through the C loop (`kernels.cpu_native`) or torch
(`kernels.shifted_load`).

Ordering and lifetimes:

* a step's loads into blocks its forward also writes (a slot of the step's slot
  mapping, or a block the scheduler names in `first_blocks`), and every load where no
  load thread is bound, run in `start_loads`, before the forward;
* the rest run on the load thread (`cpu_layer_loads.LayerwiseLoads`) layer by layer
  beside the forward, each attention layer waiting for its own (`wait_layer`); their
  checks, plans and offset tables are built in `start_loads`, so a bad source fails
  there and the thread only moves bytes;
* `end_step` waits for the thread, so a later save or promotion never reuses a slot a
  load still reads;
* saves run on the saver thread and return when the bytes are in `dst`.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np
import torch

from .. import compat
from ..kernels import load_slots_into_blocks, row_runs, save_blocks_to_slots
from ..kernels.block_copy import load_rows_numpy, page_rows_numpy
from ..store.host_buffer import HostBuffer
from .cpu_layer_loads import LayerwiseLoads, LayerWork, choose_load_cpu, split_beside
from .gpu_transfer import ShiftGeometry

logger = logging.getLogger("vllm.promptcache")


class CpuTransfers:
    def __init__(self, kv: dict[str, torch.Tensor], raw_kv: dict[str, torch.Tensor],
                 buffer: HostBuffer, block_size: int, shift: ShiftGeometry | None = None,
                 load_cpu: str = "auto", rank: int = 0, ranks: int = 1):
        """kv: blocks-first views, in forward order; raw_kv: the layers as vLLM allocated
        them; load_cpu: the `--promptcache-load-cpu` setting, for the load thread."""
        self.kv = kv
        self.raw_kv = raw_kv
        self.buffer = buffer
        self.block_size = block_size
        self.device = next(iter(kv.values())).device
        self.shift = shift
        if shift is not None:
            # Build (or find) the C loop of shifted loads now, not on the first request's
            # step; it logs once where it cannot, and loads then go through torch.
            from ..kernels.cpu_native import native_move

            if native_move() is not None:
                logger.info("promptcache: shifted loads move through the C loop "
                            "(kernels/cpu_shifted.c)")
        # numpy views of each layer's host pages and paged rows, for the load thread
        # (which runs no torch op); empty where a layer's rows cannot be viewed so.
        self._page_rows: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for name, view in kv.items():
            rows = page_rows_numpy(view)
            if rows is None:
                self._page_rows.clear()
                break
            self._page_rows[name] = (buffer.layer_view(name).numpy(), rows)
        cpu, why = choose_load_cpu(load_cpu, rank, ranks=ranks)
        self.layer_loads = LayerwiseLoads(list(kv), cpu)
        logger.info("promptcache: CPU loads %s (%s)",
                    "may run beside the forward" if cpu is not None
                    else "run before the forward", why)

    # -- loads (the step's thread) ---------------------------------------------------
    def start_loads(self, block_ids: Sequence[int], slots: Sequence[int], shifted: list[Any],
                    first_blocks: np.ndarray | None = None, forward_context: Any = None) -> int:
        """This step's loads: whole blocks, then tokens at new positions (`shifted`:
        ShiftedLoad records).  Returns the bytes left to run beside the forward.

        first_blocks: copied blocks the forward also writes KV into (as in
        `GpuTransfers.start_loads`); with the blocks of the step's slot mapping
        (`forward_context`) they load here, before the forward."""
        if not len(block_ids) and not shifted:
            return 0
        block_ids, slots = (np.asarray(a, dtype=np.int64) for a in (block_ids, slots))
        tokens = join_shifted(shifted)
        page_beside = np.zeros(len(block_ids), dtype=bool)
        token_beside = np.zeros(len(tokens[0]), dtype=bool)
        written = (compat.step_written_slots(forward_context)
                   if self.layer_loads.can_run_beside else None)
        if written is not None:
            if first_blocks is None:
                first_blocks = np.zeros(0, dtype=np.int64)
            written_blocks = np.union1d(written // self.block_size,
                                        np.asarray(first_blocks, dtype=np.int64))
            page_beside, token_beside = split_beside(
                block_ids, tokens[2] // self.block_size, written_blocks,
                pages=bool(self._page_rows),
                tokens=len(tokens[0]) > 0 and self._shifted_layerwise())
        if (~page_beside).any():
            self._load_blocks(block_ids[~page_beside], slots[~page_beside])
        if (~token_beside).any():
            self._load_shifted(*(a[~token_beside] for a in tokens))
        if not (page_beside.any() or token_beside.any()):
            return 0
        per_token = self.buffer.slot_bytes // self.block_size
        beside = (int(page_beside.sum()) * self.buffer.slot_bytes
                  + int(token_beside.sum()) * per_token)
        if not self.layer_loads.layerwise:
            beside = 0  # a probe step: run() moves them here, before the forward
        self.layer_loads.run(self._layer_work(block_ids[page_beside], slots[page_beside],
                                              *(a[token_beside] for a in tokens)))
        return beside

    def _load_blocks(self, block_ids: np.ndarray, slots: np.ndarray) -> None:
        """Whole blocks from host slots, every layer, now."""
        src_slots = torch.from_numpy(slots)
        dst_blocks = torch.from_numpy(block_ids).to(self.device)
        runs = row_runs(slots, block_ids)
        for name, kv in self.kv.items():
            load_slots_into_blocks(self.buffer.layer_view(name), src_slots, kv, dst_blocks, runs)

    def _shifted_layerwise(self) -> bool:
        """Whether shifted loads can run beside the forward: through the C loop only
        (the load thread runs no torch op)."""
        from ..kernels.cpu_native import native_dtypes, native_move

        return (self.shift is not None and native_move() is not None
                and next(iter(self.raw_kv.values())).dtype in native_dtypes())

    def _layer_work(self, block_ids: np.ndarray, slots: np.ndarray, src_slots: np.ndarray,
                    src_offsets: np.ndarray, dst: np.ndarray, deltas: np.ndarray) -> LayerWork:
        """work(i): layer i's share of the loads that run beside the forward, prepared
        here (checks, plans, offset tables) so that the load thread only moves bytes."""
        runs = row_runs(slots, block_ids) if len(slots) else None
        calls = None
        if len(dst):
            from ..kernels.shifted_load import prepare_layers_shifted

            s = self.shift
            calls = prepare_layers_shifted(
                [self.buffer.layer_view(name) for name in self.kv],
                [self.raw_kv[name] for name in self.kv], "cpu", s.num_kv_heads,
                s.head_size, self.block_size,
                self._plan_shifted(src_slots, src_offsets, dst, deltas), s.rotary_dim,
                s.is_neox)
        if len(slots) and (slots.min() < 0 or slots.max() >= self.buffer.num_slots):
            raise IndexError(f"host slots out of range [0, {self.buffer.num_slots})")
        rows = [self._page_rows[name] for name in self.kv] if runs is not None else None

        def work(i: int) -> None:
            if rows is not None:
                load_rows_numpy(rows[i][0], slots, rows[i][1], block_ids, runs)
            if calls is not None:
                calls[i]()

        return work

    def _load_shifted(self, src_slots: np.ndarray, src_offsets: np.ndarray, dst: np.ndarray,
                      deltas: np.ndarray) -> None:
        """Tokens from host slots at other positions, every layer, now."""
        from ..kernels.shifted_load import load_layers_shifted

        s = self.shift
        src_slots, src_offsets, dst, deltas = (
            torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))
            for a in (src_slots, src_offsets, dst, deltas))
        plan = self._plan_shifted(src_slots, src_offsets, dst, deltas)
        load_layers_shifted([self.buffer.layer_view(name) for name in self.kv],
                            [self.raw_kv[name] for name in self.kv], src_slots, src_offsets,
                            "cpu", s.num_kv_heads, s.head_size, self.block_size, dst,
                            deltas, s.inv_freq.to(self.device), s.rotary_dim, s.is_neox,
                            plan=plan)

    def _plan_shifted(self, src_slots, src_offsets, dst, deltas):
        """A shifted load's sources checked and its plan built, once for every layer of
        the step (numpy arrays or CPU tensors)."""
        from ..kernels.shifted_load import check_token_sources, plan_cpu_load

        check_token_sources(np.asarray(src_slots), np.asarray(src_offsets),
                            self.buffer.num_slots, self.block_size)
        return plan_cpu_load(src_slots, src_offsets, dst, deltas, self.block_size,
                             self.shift.inv_freq, next(iter(self.raw_kv.values())).dtype)

    def wait_layer(self, name: str) -> None:
        self.layer_loads.wait_layer(name)

    def end_step(self) -> None:
        """After the forward: every layer's loads are done, so a later save or disk
        promotion may reuse their slots."""
        self.layer_loads.finish()

    def step_done_event(self) -> None:
        """On CPU the step's KV is written when the forward returns: nothing to wait for."""
        return None

    # -- saves (the saver thread) ----------------------------------------------------
    def save(self, block_ids: list[int], dst: HostBuffer, slots: list[int], ready: Any) -> None:
        """dst slots <- blocks, every layer; returns when the bytes are in `dst` (the host
        tier or a staging lease)."""
        if slots and (min(slots) < 0 or max(slots) >= dst.num_slots):
            # As on the GPU path: a row copy past the end would copy nothing, silently.
            raise IndexError(f"destination slots out of range [0, {dst.num_slots})")
        src_blocks = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        dst_slots = torch.tensor(slots, dtype=torch.long)
        runs = row_runs(block_ids, slots)
        for name, kv in self.kv.items():
            save_blocks_to_slots(kv, src_blocks, dst.layer_view(name), dst_slots, runs)

    def shutdown(self) -> None:
        try:
            self.layer_loads.shutdown()
        except RuntimeError:  # a failed load, already logged by the step it failed
            logger.exception("promptcache: a layer-wise load failed before shutdown")


def join_shifted(loads: list[Any]) -> tuple[np.ndarray, ...]:
    """(src_slots, src_offsets, dst_slots, deltas) of every shifted load, joined."""
    fields = ("src_slots", "src_offsets", "dst_slots", "deltas")
    if not loads:
        return tuple(np.zeros(0, dtype=np.int64) for _ in fields)
    return tuple(np.concatenate([np.asarray(getattr(load, f), dtype=np.int64) for load in loads])
                 for f in fields)
