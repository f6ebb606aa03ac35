"""The connector's worker side: moves KV bytes between vLLM's paged cache, the
host buffer and the disk files.

Runs in each vLLM worker.  Loads are synchronous from vLLM's point of view and
layer-wise, through one of two data paths with the same methods: on CUDA
(`gpu_transfer.py`) Triton copies that read the pinned host buffer through a device
view, issued on a side stream in `start_load_kv`, one event per layer; on CPU
(`cpu_transfer.py`) numpy, torch and C-loop copies, those the forward does not touch
on a load thread beside it.  Each attention layer waits only for its own layer
(`wait_for_layer_load`), so copies overlap the forward.  This class only routes.

Saves run on a background thread, never on the step: vLLM holds the finished request's
blocks until `get_finished` reports the save.  A save also stages the blocks for the
tiers below host (write-through) in a lease of a staging pool allocated at start-up
(`SecondaryIO.stage`); the disk file or remote value is written by the tier's own
thread after vLLM got its blocks back.  Promotions (secondary -> host) run on the
tier's reader threads, started when the step's metadata is bound where no load of the
step reads their slots, else after the step's loads; both report through the worker
metadata.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

import numpy as np
import torch

from .. import background_threads, compat
from ..background_threads import BackgroundPool
from ..config import PromptCacheConfig
from ..kernels import blocks_first
from ..metrics import PromptCacheStats, export_store_counts
from ..store.secondary_io import SecondaryIO
from ..store.host_buffer import HostBuffer, StagingPool
from .cpu_layer_loads import process_cpus
from .cpu_transfer import CpuTransfers
from .gpu_transfer import GpuTransfers, ShiftGeometry
from .metadata import BlockTransfer, TierWrite, PromptCacheMetadata, PromptCacheWorkerMeta
from .tiers import host_tier_geometry, worker_tiers

# Staged (GPU -> RAM copied, not yet on disk) bytes beyond which disk saves are dropped;
# also the size of the staging pool allocated (pinned on GPU machines) at start-up.
MAX_STAGED_BYTES = 1 << 30
# On a step without a forward, how long the worker waits for promotions in flight
# (wait_for_save): a few blocks from a local disk land in about a millisecond.
IDLE_STEP_READ_WAIT_S = 0.005
# ... or, with none in flight, for a write in flight to end: no request waits for a
# write, and one arriving meanwhile waits for this step, so the bound is shorter.
IDLE_STEP_WRITE_WAIT_S = 0.002
# How long a step waits for a direct read (one its loads read, secondary.py) before it
# counts the read as failed: its blocks are then reported to vLLM, which recomputes them.
DIRECT_READ_WAIT_S = 0.5
logger = logging.getLogger("vllm.promptcache")  # under vLLM's handlers and VLLM_LOGGING_LEVEL


class PromptCacheWorker:
    def __init__(self, vllm_config: Any, kv_cache_config: Any, config: PromptCacheConfig):
        self.config = config
        self.num_blocks = kv_cache_config.num_blocks
        self.layer_pages = compat.layer_page_bytes(kv_cache_config)
        self.num_slots, self.slot_bytes = host_tier_geometry(vllm_config, kv_cache_config, config)
        self.buffer: HostBuffer | None = None
        self.kv: dict[str, torch.Tensor] = {}
        self.device: torch.device | None = None
        self._stats = PromptCacheStats()
        self._stats_lock = threading.Lock()
        self._saver = BackgroundPool(1, thread_name_prefix="promptcache-save")
        self._saved: queue.SimpleQueue[tuple[str, bool]] = queue.SimpleQueue()
        self._failed: set[str] = set()
        # Promotions of the bound step already started (start_promotions), by id.
        self._early_promos: set[str] = set()
        self._early_meta: PromptCacheMetadata | None = None
        # GPU blocks a load of this step could not fill (a direct read failed), for
        # vLLM's get_block_ids_with_load_errors: it recomputes them.
        self._load_errors: set[int] = set()
        # The data path, set up with the caches: GpuTransfers on CUDA, else CpuTransfers.
        self._transfers: GpuTransfers | CpuTransfers | None = None
        self._staging: StagingPool | None = None
        self.raw_kv: dict[str, torch.Tensor] = {}
        self.block_size = vllm_config.cache_config.block_size
        self.world_size = vllm_config.parallel_config.world_size
        self.rope = None
        if config.position_independent:
            from ..kernels.rope_params import rope_params

            mc, pc = vllm_config.model_config, vllm_config.parallel_config
            self.rope = rope_params(vllm_config)
            self.num_kv_heads = mc.get_num_kv_heads(pc)
            self.head_size = mc.get_head_size()
        # The tiers below host, by name ("disk", "remote"): the bytes of their writes
        # and promotions (store/secondary_io.py).
        self.secondary: dict[str, SecondaryIO] = worker_tiers(
            vllm_config, config, self.layer_pages, self.slot_bytes, MAX_STAGED_BYTES)

    # -- set-up ----------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        # Forward order: loads go layer by layer (the host buffer keeps layer_pages' order).
        for name, page_bytes in compat.forward_order(self.layer_pages):
            view = blocks_first(kv_caches[name], self.num_blocks)
            block_bytes = view[0].numel() * view.element_size()
            if block_bytes != page_bytes:
                raise RuntimeError(
                    f"promptcache: layer {name} has {block_bytes} bytes per block, the KV cache "
                    f"config says {page_bytes}; this KV layout is not supported")
            self.kv[name] = view
            self.raw_kv[name] = kv_caches[name]
        self.device = next(iter(self.kv.values())).device
        if self.rope is not None:
            self._check_shiftable_layout()
        on_cuda = self.device.type == "cuda"
        self.buffer = HostBuffer(self.num_slots, self.layer_pages, pin=on_cuda)
        assert self.buffer.slot_bytes == self.slot_bytes
        if self.secondary:
            self._staging = StagingPool(max(1, MAX_STAGED_BYTES // self.slot_bytes),
                                        self.layer_pages, pin=on_cuda)
        if on_cuda:
            self.buffer.map_to_device(compat.accelerator_view)
            if self._staging is not None:
                self._staging.buffer.map_to_device(compat.accelerator_view)
            self._transfers = GpuTransfers(self.kv, self.raw_kv, self.buffer,
                                           self._shift_geometry())
        else:
            self._transfers = CpuTransfers(self.kv, self.raw_kv, self.buffer, self.block_size,
                                           self._shift_geometry(), self.config.load_cpu,
                                           compat.tp_rank(), self.world_size)
            # Saves and disk/remote IO beside the load thread, off the forward's CPU,
            # where no other process (another engine's worker) is bound to that CPU.
            cpu, why = background_threads.choose_cpu(self._transfers.layer_loads.cpu,
                                                     process_cpus(),
                                                     named=self.config.load_cpu != "auto")
            background_threads.set_cpu(cpu)
            logger.info("promptcache: background threads (saves, disk and remote IO) %s",
                        f"on {why}" if cpu is not None else f"stay on the forward's CPUs: {why}")
        logger.info("promptcache: host buffer of %.2f GiB allocated (%d slots, %s)",
                    self.buffer.nbytes / 2**30, self.num_slots,
                    "pinned" if on_cuda else "pageable")

    def _shift_geometry(self) -> ShiftGeometry | None:
        if self.rope is None:
            return None
        inv_freq, rotary_dim, is_neox = self.rope
        layout = "cpu" if self.device.type == "cpu" else "flash_attn"
        return ShiftGeometry(inv_freq, rotary_dim, is_neox, self.num_kv_heads, self.head_size,
                             self.block_size, layout)

    def _check_shiftable_layout(self) -> None:
        """Refuse at start-up, not mid-step, a cache that shifted loads cannot write."""
        from ..kernels.rope_shift import paged_kv_views

        layout = "cpu" if self.device.type == "cpu" else "flash_attn"
        for name, raw in self.raw_kv.items():
            if raw.dtype not in (torch.float32, torch.float16, torch.bfloat16):
                raise RuntimeError(f"--promptcache-position-independent needs a float16, "
                                   f"bfloat16 or float32 KV cache; layer {name} is {raw.dtype}")
            try:
                paged_kv_views(raw, layout, self.num_kv_heads, self.head_size, self.block_size)
            except ValueError as e:
                raise RuntimeError(f"--promptcache-position-independent does not support this "
                                   f"attention backend's KV layout ({name}): {e}") from None

    # -- promotions --------------------------------------------------------------
    def start_promotions(self, meta: PromptCacheMetadata) -> None:
        """Start this step's promotions (secondary -> host reads) as soon as the step's
        metadata is bound, before the forward, wherever no load of the step reads the
        host slots they fill.  A read of a few blocks then lands during the forward and
        is reported at the end of the same step, so the request it serves loads from
        host in the next step; started at the end of the step (as the others still are,
        after the step's loads are done) it lands a step later.  Only slots this step's
        loads read can be refilled in the same metadata: a slot the scheduler gave a
        promotion is otherwise free or was last read by an earlier, finished step."""
        self._early_promos, self._early_meta = set(), meta
        if not meta.promotions:
            return
        read: set[int] = set()
        for load in meta.loads:
            read.update(load.slots)
        for shifted in meta.shifted_loads:
            read.update(int(s) for s in shifted.src_slots)
        for promo in meta.promotions:
            # A direct read is started by start_load_kv, once it knows the loads.
            if not promo.for_req and read.isdisjoint(promo.slots):
                self._promote(promo)
                self._early_promos.add(promo.promo_id)

    def _wait_idle(self, timeout_s: float) -> None:
        """Wait (at most `timeout_s` in all) for the promotions in flight: on a step
        without a forward, nothing else waits on the worker, and a read that lands now
        is reported at this step's end, so the request waiting for it loads in the next
        step rather than one or two later (each such step is a round trip through the
        engine).  With no read left, for one write in flight to end (at most
        IDLE_STEP_WRITE_WAIT_S): the engine steps on only to hear of the writes
        (has_pending_push_work), so one step per ended write will do.  Bounded, so a
        request arriving meanwhile waits no longer."""
        deadline = time.monotonic() + timeout_s
        for io in self.secondary.values():
            if not io.wait_reads(deadline - time.monotonic()):
                return
        for io in self.secondary.values():
            if io.writes_in_flight():
                io.wait_for_a_write(min(IDLE_STEP_WRITE_WAIT_S, deadline - time.monotonic()))
                return

    def _promote(self, promo: Any, watch: bool = False) -> None:
        self.secondary[promo.tier].promote(promo.promo_id, promo.object_id, promo.indices,
                                           promo.slots, self.buffer, promo.keys, watch=watch)

    def _read_direct(self, meta: PromptCacheMetadata) -> list[BlockTransfer]:
        """This step's direct reads (promotions its own loads read, secondary.py), made
        before the loads; returns the loads left to make.  A load of a slot whose read
        failed or did not land in DIRECT_READ_WAIT_S is dropped and its GPU block
        reported as a load error (vLLM recomputes it).  Where another load of the step
        reads one of the slots (what the slot held before the scheduler gave it to the
        read), the read is made after the step's loads, as any promotion, and its own
        request's blocks are reported instead: never a read over a slot being loaded."""
        if self._early_meta is not meta:
            self._early_promos, self._early_meta = set(), meta
        direct = [p for p in meta.promotions
                  if p.for_req and p.promo_id not in self._early_promos]
        if not direct:
            return meta.loads
        owner = {slot: p.for_req for p in direct for slot in p.slots}
        clash = any(owner.get(s, t.req_id) != t.req_id for t in meta.loads for s in t.slots) \
            or any(int(s) in owner for sh in meta.shifted_loads for s in sh.src_slots)
        failed: set[int] = set(owner) if clash else set()
        if not clash:
            # Waited for only where a load of the step reads it (vLLM may not have
            # scheduled the request after all: then it is a plain promotion).
            loaded = {s for t in meta.loads for s in t.slots if owner.get(s) == t.req_id}
            waited = [p for p in direct if not loaded.isdisjoint(p.slots)]
            watched = {p.promo_id for p in waited}
            for p in direct:
                self._promote(p, watch=p.promo_id in watched)
                self._early_promos.add(p.promo_id)
            deadline = time.monotonic() + DIRECT_READ_WAIT_S
            for p in waited:
                if not self.secondary[p.tier].wait_promotion(p.promo_id,
                                                             deadline - time.monotonic()):
                    failed.update(p.slots)
        with self._stats_lock:
            for p in direct:
                self._stats.inc("direct_read_blocks_total", len(p.slots), tier=p.tier)
        if not failed:
            return meta.loads
        loads, errors = [], 0
        tier_of = {slot: p.tier for p in direct for slot in p.slots}
        for t in meta.loads:
            keep = [(b, s) for b, s in zip(t.block_ids, t.slots)
                    if not (s in failed and owner[s] == t.req_id)]
            for b, s in zip(t.block_ids, t.slots):
                if s in failed and owner[s] == t.req_id:
                    self._load_errors.add(b)
                    errors += 1
                    with self._stats_lock:
                        self._stats.inc("load_errors_total", 1, tier=tier_of[s])
            if keep:
                loads.append(BlockTransfer(t.req_id, [b for b, _ in keep], [s for _, s in keep]))
        if errors:
            logger.warning("promptcache: %d block(s) read from below host in their loading "
                           "step did not arrive%s; vLLM recomputes them", errors,
                           " (another load of the step read their slots)" if clash else "")
        return loads

    def take_load_errors(self) -> set[int]:
        """GPU blocks this step's loads could not fill (vLLM recomputes them)."""
        out, self._load_errors = self._load_errors, set()
        return out

    # -- loads -----------------------------------------------------------------
    def start_load_kv(self, meta: PromptCacheMetadata, forward_context: Any = None) -> None:
        """This step's loads.  Blocks the forward also writes into load before it; the
        rest beside it where the data path can (a side stream, a verified load thread)."""
        loads = self._read_direct(meta) if meta.promotions else meta.loads
        if not (loads or meta.shifted_loads):
            return
        start = time.perf_counter()  # on CUDA the issue time: the copies are asynchronous
        block_ids, slots = _concat(loads)
        # The scheduler names the copied blocks the forward also writes into (on CUDA
        # the step's slot mapping lives on the device: reading it would block).
        beside = self._transfers.start_loads(
            block_ids, slots, meta.shifted_loads,
            first_blocks=np.asarray(meta.shared_blocks, dtype=np.int64),
            forward_context=forward_context)
        tokens = sum(len(load.deltas) for load in meta.shifted_loads)
        nbytes = len(slots) * self.slot_bytes + tokens * (self.slot_bytes // self.block_size)
        with self._stats_lock:
            self._stats.inc("loaded_bytes_total", nbytes, tier="host")
            if beside:
                self._stats.inc("layerwise_loaded_bytes_total", beside, tier="host")
            self._stats.inc("load_seconds_total", time.perf_counter() - start, tier="host")

    def wait_for_layer_load(self, layer_name: str) -> None:
        if self._transfers is not None:
            self._transfers.wait_layer(layer_name)

    # -- saves -----------------------------------------------------------------
    def wait_for_save(self, meta: PromptCacheMetadata) -> None:
        # Loads of this step must be done before a save or promotion may reuse one
        # of their slots.
        if self._transfers is not None:
            self._transfers.end_step()
        started = self._early_promos if self._early_meta is meta else set()
        for promo in meta.promotions:
            if promo.promo_id not in started:
                self._promote(promo)
        self._early_promos, self._early_meta = set(), None
        if meta.no_forward:
            self._wait_idle(IDLE_STEP_READ_WAIT_S)
        if not (meta.saves or meta.tier_writes):
            return
        ready = self._transfers.step_done_event()
        jobs: dict[str, tuple[BlockTransfer | None, list[TierWrite]]] = {}
        for save in meta.saves:
            jobs[save.req_id] = (save, [])
        for write in meta.tier_writes:
            jobs.setdefault(write.req_id, (None, []))[1].append(write)
        for req_id, (save, writes) in jobs.items():
            self._saver.submit(self._save, req_id, save, writes, ready)

    def _save(self, req_id: str, save: BlockTransfer | None, writes: list[TierWrite],
              ready: Any) -> None:
        # Whatever fails in here, the request is reported (failed if its host save
        # did not complete), so vLLM gets its blocks back and no slot stays PENDING.
        ok = save is None
        staged = []
        try:
            ok, staged = self._save_and_stage(req_id, save, writes, ready)
        except Exception:
            logger.exception("promptcache: saving request %s failed; its blocks will not be "
                             "served", req_id)
            ok = False
        finally:
            # vLLM may reuse the request's GPU blocks from here on; the writes follow.
            self._saved.put((req_id, ok))
        for write, staging in staged:
            self.secondary[write.tier].write(write.object_id, write.keys, staging)

    def _save_and_stage(self, req_id: str, save: BlockTransfer | None, writes: list[TierWrite],
                        ready: Any) -> tuple[bool, list]:
        """(host save ok, [(write, its staged lease)]); a write that cannot be staged is
        dropped (its tier reports it), the others go on."""
        start = time.perf_counter()
        ok = True
        if save is not None:
            try:
                self._transfers.save(save.block_ids, self.buffer, save.slots, ready)
            except Exception:
                ok = False
                logger.exception("promptcache: saving request %s to host failed; its blocks "
                                 "will not be served", req_id)
        staged = []
        for write in writes:
            n = len(write.block_ids)
            try:
                with self.secondary[write.tier].stage(write.object_id, n, self._staging) as lease:
                    if lease is not None:
                        self._transfers.save(write.block_ids, lease, list(range(n)), ready)
                        staged.append((write, lease))
            except Exception:
                logger.exception("promptcache: staging request %s for the %s tier failed",
                                 req_id, write.tier)
        with self._stats_lock:
            if ok and save is not None:
                self._stats.inc("saved_bytes_total", len(save.slots) * self.slot_bytes, tier="host")
                self._stats.inc("saved_blocks_total", len(save.slots), tier="host")
            self._stats.inc("save_seconds_total", time.perf_counter() - start, tier="host")
        return ok, staged

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        done = set()
        while True:
            try:
                req_id, ok = self._saved.get_nowait()
            except queue.Empty:
                break
            done.add(req_id)
            if not ok:
                self._failed.add(req_id)
        return (done or None), None

    def build_worker_meta(self) -> Any:
        if PromptCacheWorkerMeta is None:
            return None
        events, corrupt, gone = [], set(), set()
        for io in self.secondary.values():
            e, c, g = io.take_events()
            events += e
            corrupt |= c
            gone |= g
        if not (self._failed or events or corrupt or gone):
            return None
        meta = PromptCacheWorkerMeta(failed_saves=self._failed, events=events,
                                     corrupt_objects=corrupt, missing_objects=gone)
        self._failed = set()
        return meta

    def get_kv_connector_stats(self) -> PromptCacheStats | None:
        with self._stats_lock:
            for name, io in self.secondary.items():
                written, read = io.take_byte_counts()
                if written:
                    self._stats.inc("saved_bytes_total", written, tier=name)
                if read:
                    self._stats.inc("loaded_bytes_total", read, tier=name)
                export_store_counts(self._stats, io.take_counts(), name)
            return self._stats.take()

    def shutdown(self) -> None:
        if self._transfers is not None:
            self._transfers.shutdown()
        self._saver.shutdown(wait=True)
        for io in self.secondary.values():
            io.shutdown()


def _concat(transfers: list[BlockTransfer]) -> tuple[list[int], list[int]]:
    block_ids, slots = [], []
    for t in transfers:
        block_ids.extend(t.block_ids)
        slots.extend(t.slots)
    return block_ids, slots
