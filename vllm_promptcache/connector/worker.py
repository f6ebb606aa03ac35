"""The connector's worker side: moves KV bytes between vLLM's paged cache and the host buffer.

Runs in each vLLM worker.  Loads are synchronous from vLLM's point of view and
layer-wise: on CUDA they are issued on a side stream in `start_load_kv`, one
event per layer, and each attention layer waits only for its own layer
(`wait_for_layer_load`), so copies overlap the forward.  On CPU they run in
`start_load_kv`.  Saves run on a background thread, never on the step: vLLM holds
the finished request's blocks until `get_finished` reports the save.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from .. import compat
from ..config import PromptCacheConfig
from ..kernels import blocks_first, load_slots_into_blocks, save_blocks_to_slots
from ..metrics import PromptCacheStats
from ..store.host_buffer import HostBuffer
from .metadata import BlockTransfer, PromptCacheMetadata, PromptCacheWorkerMeta
from .scheduler import host_tier_geometry

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
        self._layer_events: dict[str, Any] = {}
        self._load_stream = None
        self._save_stream = None

    # -- set-up ----------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        for name, page_bytes in self.layer_pages:
            view = blocks_first(kv_caches[name], self.num_blocks)
            block_bytes = view[0].numel() * view.element_size()
            if block_bytes != page_bytes:
                raise RuntimeError(
                    f"promptcache: layer {name} has {block_bytes} bytes per block, the KV cache "
                    f"config says {page_bytes}; this KV layout is not supported")
            self.kv[name] = view
        self.device = next(iter(self.kv.values())).device
        on_cuda = self.device.type == "cuda"
        self.buffer = HostBuffer(self.num_slots, self.layer_pages, pin=on_cuda)
        assert self.buffer.slot_bytes == self.slot_bytes
        if on_cuda:
            self._load_stream = torch.cuda.Stream(self.device)
            self._save_stream = torch.cuda.Stream(self.device)
        logger.info("promptcache: host buffer of %.2f GiB allocated (%d slots, %s)",
                    self.buffer.nbytes / 2**30, self.num_slots,
                    "pinned" if on_cuda else "pageable")

    # -- loads -----------------------------------------------------------------
    def start_load_kv(self, meta: PromptCacheMetadata) -> None:
        if not meta.loads:
            return
        start = time.perf_counter()
        block_ids, slots = _concat(meta.loads)
        src_slots = torch.tensor(slots, dtype=torch.long)
        dst_blocks = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        if self._load_stream is None:
            for name, kv in self.kv.items():
                load_slots_into_blocks(self.buffer.layer_view(name), src_slots, kv, dst_blocks)
        else:
            # The blocks were just allocated on the compute stream (and maybe zeroed there).
            self._load_stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._load_stream):
                for name, kv in self.kv.items():
                    load_slots_into_blocks(self.buffer.layer_view(name), src_slots, kv,
                                           dst_blocks, non_blocking=True)
                    event = torch.cuda.Event()
                    event.record(self._load_stream)
                    self._layer_events[name] = event
        with self._stats_lock:
            self._stats.inc("loaded_bytes_total", len(slots) * self.slot_bytes, tier="host")
            self._stats.inc("load_seconds_total", time.perf_counter() - start, tier="host")

    def wait_for_layer_load(self, layer_name: str) -> None:
        event = self._layer_events.pop(layer_name, None)
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    # -- saves -----------------------------------------------------------------
    def wait_for_save(self, meta: PromptCacheMetadata) -> None:
        # Loads of this step must be done before a save may reuse one of their slots.
        self._layer_events.clear()
        if self._load_stream is not None:
            self._load_stream.synchronize()
        if not meta.saves:
            return
        ready = None
        if self._save_stream is not None:
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.device))
        for save in meta.saves:
            self._saver.submit(self._save, save, ready)

    def _save(self, save: BlockTransfer, ready: Any) -> None:
        start = time.perf_counter()
        ok = True
        try:
            src_blocks = torch.tensor(save.block_ids, dtype=torch.long, device=self.device)
            dst_slots = torch.tensor(save.slots, dtype=torch.long)
            if self._save_stream is None:
                for name, kv in self.kv.items():
                    save_blocks_to_slots(kv, src_blocks, self.buffer.layer_view(name), dst_slots)
            else:
                with torch.cuda.stream(self._save_stream):
                    self._save_stream.wait_event(ready)
                    for name, kv in self.kv.items():
                        save_blocks_to_slots(kv, src_blocks, self.buffer.layer_view(name), dst_slots)
                self._save_stream.synchronize()
        except Exception:
            ok = False
            logger.exception("promptcache: saving request %s to host failed; its blocks "
                             "will not be served", save.req_id)
        with self._stats_lock:
            if ok:
                nbytes = len(save.slots) * self.slot_bytes
                self._stats.inc("saved_bytes_total", nbytes, tier="host")
                self._stats.inc("saved_blocks_total", len(save.slots), tier="host")
            self._stats.inc("save_seconds_total", time.perf_counter() - start, tier="host")
        self._saved.put((save.req_id, ok))

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
        if not self._failed or PromptCacheWorkerMeta is None:
            return None
        meta = PromptCacheWorkerMeta(failed_saves=self._failed)
        self._failed = set()
        return meta

    def get_kv_connector_stats(self) -> PromptCacheStats | None:
        with self._stats_lock:
            return self._stats.take()

    def shutdown(self) -> None:
        self._saver.shutdown(wait=True)


def _concat(transfers: list[BlockTransfer]) -> tuple[list[int], list[int]]:
    block_ids, slots = [], []
    for t in transfers:
        block_ids.extend(t.block_ids)
        slots.extend(t.slots)
    return block_ids, slots
