"""The connector's worker side: moves KV bytes between vLLM's paged cache, the
host buffer and the disk files.

Runs in each vLLM worker.  Loads are synchronous from vLLM's point of view and
layer-wise: on CUDA (`gpu_transfer.py`) they are Triton copies that read the pinned
host buffer through a device view, issued on a side stream in `start_load_kv`, one
event per layer, and each attention layer waits only for its own layer
(`wait_for_layer_load`), so copies overlap the forward.  On CPU they are torch copies
run in `start_load_kv`.  Saves run on a background thread, never on the step: vLLM
holds the finished request's blocks until `get_finished` reports the save.  A save
also stages the blocks for the disk tier (write-through) in a lease of a staging pool
allocated at start-up; the file is written by `DiskIO`'s writer thread after vLLM got
its blocks back.  Promotions (disk -> host) run on `DiskIO`'s reader pool; both report
through the worker metadata.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from .. import compat
from ..config import PromptCacheConfig
from ..kernels import blocks_first, load_slots_into_blocks, row_runs, save_blocks_to_slots
from ..kernels.block_copy import load_rows_numpy, page_rows_numpy
from ..metrics import PromptCacheStats, export_store_counts
from ..store.disk_format import disk_secret
from ..store.disk_io import DiskIO
from ..store.remote_io import RemoteIO
from ..store.secondary_io import SecondaryIO
from ..store.host_buffer import HostBuffer, StagingPool
from .cpu_layer_loads import LayerwiseLoads, choose_load_cpu, split_beside
from .gpu_transfer import GpuTransfers, ShiftGeometry
from .metadata import (BlockTransfer, DiskWrite, PromptCacheMetadata, PromptCacheWorkerMeta,
                       ShiftedLoad)
from .remote import remote_store
from .scheduler import disk_directory, host_tier_geometry, model_fingerprint

# Staged (GPU -> RAM copied, not yet on disk) bytes beyond which disk saves are dropped;
# also the size of the staging pool allocated (pinned on GPU machines) at start-up.
MAX_STAGED_BYTES = 1 << 30
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
        self._saver = ThreadPoolExecutor(1, thread_name_prefix="promptcache-save")
        self._saved: queue.SimpleQueue[tuple[str, bool]] = queue.SimpleQueue()
        self._failed: set[str] = set()
        self._gpu: GpuTransfers | None = None  # the CUDA path; None on CPU
        self._staging: StagingPool | None = None
        self.raw_kv: dict[str, torch.Tensor] = {}
        self.block_size = vllm_config.cache_config.block_size
        self.world_size = vllm_config.parallel_config.world_size
        # CPU: loads beside the forward (cpu_layer_loads.py), set up with the caches.
        self._layer_loads: LayerwiseLoads | None = None
        self._page_rows: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.rope = None
        if config.position_independent:
            from ..kernels.rope_params import rope_params

            mc, pc = vllm_config.model_config, vllm_config.parallel_config
            self.rope = rope_params(vllm_config)
            self.num_kv_heads = mc.get_num_kv_heads(pc)
            self.head_size = mc.get_head_size()
        # The tiers below host, by name ("disk", "remote"): the bytes of their writes
        # and promotions (store/secondary_io.py).
        self.secondary: dict[str, SecondaryIO] = {}
        if PromptCacheWorkerMeta is not None:
            world = vllm_config.parallel_config.world_size
            fingerprint = model_fingerprint(vllm_config, config)  # reads the weights' headers
            disk_place = disk_directory(fingerprint, config) if config.disk_enabled else None
            if disk_place is not None:
                directory, digest = disk_place
                self.secondary["disk"] = DiskIO(directory, digest, compat.tp_rank(), world,
                                                self.layer_pages, MAX_STAGED_BYTES,
                                                disk_secret(config.disk_dir))
            store = remote_store(config, fingerprint,
                                 compat.tp_rank(), world, self.slot_bytes)
            if store is not None:
                self.secondary["remote"] = RemoteIO(store, self.slot_bytes, MAX_STAGED_BYTES)

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
            self._gpu = GpuTransfers(self.kv, self.raw_kv, self.buffer, self._shift_geometry())
        else:
            self._start_layer_loads()
        logger.info("promptcache: host buffer of %.2f GiB allocated (%d slots, %s)",
                    self.buffer.nbytes / 2**30, self.num_slots,
                    "pinned" if on_cuda else "pageable")

    def _start_layer_loads(self) -> None:
        """CPU: a thread that loads layer by layer beside the forward, on a CPU the
        worker's OpenMP threads leave free (or none: loads run before the forward)."""
        for name, view in self.kv.items():
            rows = page_rows_numpy(view)
            if rows is None:
                self._page_rows.clear()
                break
            self._page_rows[name] = (self.buffer.layer_view(name).numpy(), rows)
        cpu, why = choose_load_cpu(self.config.load_cpu, compat.tp_rank(),
                                   ranks=self.world_size)
        self._layer_loads = LayerwiseLoads(list(self.kv), cpu)
        logger.info("promptcache: CPU loads %s (%s)",
                    "may run beside the forward" if cpu is not None
                    else "run before the forward", why)

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
        if self.device.type == "cpu":
            # Build (or find) the C loop of shifted loads now, not on the first request's
            # step; it logs once where it cannot, and loads then go through torch.
            from ..kernels.cpu_native import native_move

            if native_move() is not None:
                logger.info("promptcache: shifted loads move through the C loop "
                            "(kernels/cpu_shifted.c)")

    # -- loads -----------------------------------------------------------------
    def start_load_kv(self, meta: PromptCacheMetadata, forward_context: Any = None) -> None:
        """This step's loads.  On CPU, the blocks the forward also writes into load here;
        the rest beside the forward where a load thread is verified (cpu_layer_loads.py),
        else here too."""
        if self._gpu is not None:
            self._start_load_gpu(meta, forward_context)
            return
        if not (meta.loads or meta.shifted_loads):
            return
        start = time.perf_counter()
        block_ids, slots = (np.asarray(a, dtype=np.int64) for a in _concat(meta.loads))
        tokens = _join_shifted(meta.shifted_loads)
        page_beside = np.zeros(len(block_ids), dtype=bool)
        token_beside = np.zeros(len(tokens[0]), dtype=bool)
        written = (compat.step_written_slots(forward_context)
                   if self._layer_loads is not None and self._layer_loads.can_run_beside
                   else None)
        if written is not None:
            written_blocks = np.union1d(written // self.block_size,
                                        np.asarray(meta.shared_blocks, dtype=np.int64))
            page_beside, token_beside = split_beside(
                block_ids, tokens[2] // self.block_size, written_blocks,
                pages=bool(self._page_rows),
                tokens=len(tokens[0]) > 0 and self._shifted_layerwise())
        if (~page_beside).any():
            self._load_blocks(block_ids[~page_beside], slots[~page_beside])
        if (~token_beside).any():
            self._load_shifted(*(a[~token_beside] for a in tokens))
        per_token = self.slot_bytes // self.block_size
        nbytes = len(slots) * self.slot_bytes + len(token_beside) * per_token
        beside = int(page_beside.sum()) * self.slot_bytes + int(token_beside.sum()) * per_token
        if page_beside.any() or token_beside.any():
            if not self._layer_loads.layerwise:
                beside = 0  # a probe step: run() moves them here, before the forward
            self._layer_loads.run(self._layer_work(block_ids[page_beside], slots[page_beside],
                                                   *(a[token_beside] for a in tokens)))
        with self._stats_lock:
            self._stats.inc("loaded_bytes_total", nbytes, tier="host")
            if beside:
                self._stats.inc("layerwise_loaded_bytes_total", beside, tier="host")
            self._stats.inc("load_seconds_total", time.perf_counter() - start, tier="host")

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

        return (self.rope is not None and native_move() is not None
                and next(iter(self.raw_kv.values())).dtype in native_dtypes())

    def _layer_work(self, block_ids: np.ndarray, slots: np.ndarray, src_slots: np.ndarray,
                    src_offsets: np.ndarray, dst: np.ndarray, deltas: np.ndarray):
        """work(i): layer i's share of the loads that run beside the forward, prepared
        here (checks, plans, offset tables) so that the load thread only moves bytes."""
        runs = row_runs(slots, block_ids) if len(slots) else None
        calls = None
        if len(dst):
            from ..kernels.shifted_load import prepare_layers_shifted

            _, rotary_dim, is_neox = self.rope
            calls = prepare_layers_shifted(
                [self.buffer.layer_view(name) for name in self.kv],
                [self.raw_kv[name] for name in self.kv], "cpu", self.num_kv_heads,
                self.head_size, self.block_size,
                self._plan_shifted(src_slots, src_offsets, dst, deltas), rotary_dim, is_neox)
        if len(slots) and (slots.min() < 0 or slots.max() >= self.buffer.num_slots):
            raise IndexError(f"host slots out of range [0, {self.buffer.num_slots})")
        rows = [self._page_rows[name] for name in self.kv] if runs is not None else None

        def work(i: int) -> None:
            if rows is not None:
                load_rows_numpy(rows[i][0], slots, rows[i][1], block_ids, runs)
            if calls is not None:
                calls[i]()

        return work

    def _start_load_gpu(self, meta: PromptCacheMetadata, forward_context: Any) -> None:
        if not (meta.loads or meta.shifted_loads):
            return
        start = time.perf_counter()  # issue time: the copies themselves are asynchronous
        block_ids, slots = _concat(meta.loads)
        # The scheduler names the copied blocks the forward also writes into (on CUDA
        # the step's slot mapping lives on the device: reading it would block).
        self._gpu.start_loads(block_ids, slots, meta.shifted_loads,
                              wait_all=compat.full_cudagraph_step(forward_context),
                              first_blocks=np.asarray(meta.shared_blocks, dtype=np.int64))
        tokens = sum(len(load.deltas) for load in meta.shifted_loads)
        with self._stats_lock:
            nbytes = len(slots) * self.slot_bytes
            if tokens:  # shifted loads exist only with position-independent reuse
                nbytes += tokens * self.slot_bytes // self.block_size
            self._stats.inc("loaded_bytes_total", nbytes, tier="host")
            self._stats.inc("load_seconds_total", time.perf_counter() - start, tier="host")

    def _load_shifted(self, src_slots: np.ndarray, src_offsets: np.ndarray, dst: np.ndarray,
                      deltas: np.ndarray) -> None:
        """Tokens from host slots at other positions (CPU backend), every layer, now."""
        from ..kernels.shifted_load import load_layers_shifted

        inv_freq, rotary_dim, is_neox = self.rope
        src_slots, src_offsets, dst, deltas = (
            torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))
            for a in (src_slots, src_offsets, dst, deltas))
        plan = self._plan_shifted(src_slots, src_offsets, dst, deltas)
        inv_freq = inv_freq.to(self.device)
        load_layers_shifted([self.buffer.layer_view(name) for name in self.kv],
                            [self.raw_kv[name] for name in self.kv], src_slots, src_offsets,
                            "cpu", self.num_kv_heads, self.head_size, self.block_size, dst,
                            deltas, inv_freq, rotary_dim, is_neox, plan=plan)

    def _plan_shifted(self, src_slots, src_offsets, dst, deltas):
        """A shifted load's sources checked and its plan built, once for every layer of
        the step (numpy arrays or CPU tensors)."""
        from ..kernels.shifted_load import check_token_sources, plan_cpu_load

        check_token_sources(np.asarray(src_slots), np.asarray(src_offsets),
                            self.buffer.num_slots, self.block_size)
        return plan_cpu_load(src_slots, src_offsets, dst, deltas, self.block_size, self.rope[0],
                             next(iter(self.raw_kv.values())).dtype)

    def wait_for_layer_load(self, layer_name: str) -> None:
        if self._gpu is not None:
            self._gpu.wait_layer(layer_name)
        elif self._layer_loads is not None:
            self._layer_loads.wait_layer(layer_name)

    # -- saves -----------------------------------------------------------------
    def wait_for_save(self, meta: PromptCacheMetadata) -> None:
        # Loads of this step must be done before a save or promotion may reuse one
        # of their slots.
        if self._gpu is not None:
            self._gpu.end_step()
        elif self._layer_loads is not None:
            self._layer_loads.finish()
        for promo in meta.promotions:
            self.secondary[promo.tier].promote(promo.promo_id, promo.file_id, promo.indices,
                                               promo.slots, self.buffer, promo.keys)
        if not (meta.saves or meta.disk_writes):
            return
        ready = self._gpu.step_done_event() if self._gpu is not None else None
        jobs: dict[str, tuple[BlockTransfer | None, list[DiskWrite]]] = {}
        for save in meta.saves:
            jobs[save.req_id] = (save, [])
        for write in meta.disk_writes:
            jobs.setdefault(write.req_id, (None, []))[1].append(write)
        for req_id, (save, writes) in jobs.items():
            self._saver.submit(self._save, req_id, save, writes, ready)

    def _copy_out(self, block_ids: list[int], dst: HostBuffer, slots: list[int], ready: Any) -> None:
        """dst slots <- bytes of GPU blocks, every layer; returns when the copy is done."""
        if self._gpu is not None:
            self._gpu.save(block_ids, dst, slots, ready)
            return
        src_blocks = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        dst_slots = torch.tensor(slots, dtype=torch.long)
        runs = row_runs(block_ids, slots)
        for name, kv in self.kv.items():
            save_blocks_to_slots(kv, src_blocks, dst.layer_view(name), dst_slots, runs)

    def _save(self, req_id: str, save: BlockTransfer | None, writes: list[DiskWrite],
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
            for write, _ in staged:
                self.secondary[write.tier].unstage(len(write.block_ids))
                self.secondary[write.tier].drop_write(write.file_id, "save failed")
            staged = []
            ok = False
        finally:
            # vLLM may reuse the request's GPU blocks from here on; the files follow.
            self._saved.put((req_id, ok))
        for write, staging in staged:
            self.secondary[write.tier].write(write.file_id, write.keys, staging)

    def _save_and_stage(self, req_id: str, save: BlockTransfer | None, writes: list[DiskWrite],
                        ready: Any) -> tuple[bool, list]:
        start = time.perf_counter()
        ok = True
        if save is not None:
            try:
                self._copy_out(save.block_ids, self.buffer, save.slots, ready)
            except Exception:
                ok = False
                logger.exception("promptcache: saving request %s to host failed; its blocks "
                                 "will not be served", req_id)
        staged = []
        for write in writes:
            io = self.secondary[write.tier]
            if not io.try_stage(len(write.block_ids)):
                io.drop_write(write.file_id, "too many writes queued")
                continue
            staging = self._staging.lease(len(write.block_ids))
            if staging is None:
                io.unstage(len(write.block_ids))
                io.drop_write(write.file_id, "the staging pool is full")
                continue
            try:
                self._copy_out(write.block_ids, staging, list(range(len(write.block_ids))), ready)
                staged.append((write, staging))
            except Exception:
                staging.release()
                io.unstage(len(write.block_ids))
                io.drop_write(write.file_id, "staging failed")
                logger.exception("promptcache: staging request %s for disk failed", req_id)
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
                                     corrupt_files=corrupt, missing_files=gone)
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
        if self._layer_loads is not None:
            try:
                self._layer_loads.shutdown()
            except RuntimeError:  # a failed load, already logged by the step it failed
                logger.exception("promptcache: a layer-wise load failed before shutdown")
        self._saver.shutdown(wait=True)
        for io in self.secondary.values():
            io.shutdown()


def _join_shifted(loads: list[ShiftedLoad]) -> tuple[np.ndarray, ...]:
    """(src_slots, src_offsets, dst_slots, deltas) of every shifted load, joined."""
    fields = ("src_slots", "src_offsets", "dst_slots", "deltas")
    if not loads:
        return tuple(np.zeros(0, dtype=np.int64) for _ in fields)
    return tuple(np.concatenate([np.asarray(getattr(load, f), dtype=np.int64) for load in loads])
                 for f in fields)


def _concat(transfers: list[BlockTransfer]) -> tuple[list[int], list[int]]:
    block_ids, slots = [], []
    for t in transfers:
        block_ids.extend(t.block_ids)
        slots.extend(t.slots)
    return block_ids, slots
