"""The connector's scheduler side: what can be loaded, what must be saved.

Runs in vLLM's engine-core process.  It owns the host tier's index (`HostTier`)
and decides, per step, which host slots are copied into which GPU blocks and the
reverse; it never touches tensors.  Invariants that make it safe:

- a slot is served only once READY, i.e. after the worker reported its save done;
- a slot is only reused (evicted) in `request_finished`, and the save into it is
  sent in a later step's metadata than any load planned before, which the worker
  executes in order, each step's loads finishing inside that step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from .. import compat
from ..config import PromptCacheConfig
from ..metrics import PromptCacheStats
from ..store.host_tier import HostTier, slots_for
from ..store.keys import BlockKeyer, ModelFingerprint
from ..store.policies import make_policy
from .metadata import BlockTransfer, PromptCacheMetadata

logger = logging.getLogger("vllm.promptcache")  # under vLLM's handlers and VLLM_LOGGING_LEVEL


def host_tier_geometry(vllm_config: Any, kv_cache_config: Any, config: PromptCacheConfig) -> tuple[int, int]:
    """(slots, bytes per slot per worker): the same numbers on both connector sides."""
    slot_bytes = sum(nbytes for _, nbytes in compat.layer_page_bytes(kv_cache_config))
    world = vllm_config.parallel_config.world_size
    return slots_for(config.host_bytes // world, slot_bytes), slot_bytes


@dataclass
class _Lookup:
    local_tokens: int  # tokens vLLM's own prefix cache already holds
    keys: list[bytes]  # keys of the leading READY blocks
    slots: list[int]   # their host slots


class PromptCacheScheduler:
    def __init__(self, vllm_config: Any, kv_cache_config: Any, config: PromptCacheConfig):
        self.config = config
        self.block_size = vllm_config.cache_config.block_size
        # tp_rank 0 stands for the whole TP group here: ranks save and load in lockstep.
        self.fingerprint = ModelFingerprint.from_vllm_config(vllm_config, tp_rank=0)
        self.keyer = BlockKeyer(self.fingerprint)
        num_slots, slot_bytes = host_tier_geometry(vllm_config, kv_cache_config, config)
        self.world_size = vllm_config.parallel_config.world_size
        self.host = HostTier(num_slots, slot_bytes, make_policy(config.eviction_policy))
        self.stats = PromptCacheStats()
        self._lookups: dict[str, _Lookup] = {}
        self._looked_up: set[str] = set()
        self._loads: list[BlockTransfer] = []
        self._saves: list[BlockTransfer] = []
        self._inflight_saves: dict[str, list[int]] = {}
        self._evictions_reported = 0
        logger.info(
            "vllm-promptcache: %s; %d host slots of one %d-token block (%.2f MiB per slot "
            "per worker, %d worker(s)); model %s",
            config.summary(), num_slots, self.block_size, slot_bytes / 2**20,
            self.world_size, self.fingerprint.model)

    # -- loads -----------------------------------------------------------------
    def get_num_new_matched_tokens(self, request: Any,
                                   num_computed_tokens: int) -> tuple[int | None, bool]:
        req_id = request.request_id
        if req_id not in self._looked_up:
            self._looked_up.add(req_id)
            self.stats.inc("lookups_total")
        tokens = request.all_token_ids
        # The last token is always computed: its logits are the next token's.
        max_blocks = (len(tokens) - 1) // self.block_size
        keys = self.keyer.block_keys(tokens, compat.request_cache_salt(request), max_blocks)
        slots = self.host.ready_prefix(keys, touch=False)
        hit_tokens = len(slots) * self.block_size
        if (len(slots) < len(keys) and self.host.is_pending(keys[len(slots)])
                and hit_tokens + self.block_size > num_computed_tokens):
            # The next block's save is in flight (a conversation's previous turn
            # that just finished): ask again next step rather than recompute it.
            return None, False
        if len(slots) < self.config.min_load_blocks or hit_tokens <= num_computed_tokens:
            self._lookups.pop(req_id, None)
            return 0, False
        self._lookups[req_id] = _Lookup(num_computed_tokens, keys[:len(slots)], slots)
        return hit_tokens - num_computed_tokens, False

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        lookup = self._lookups.pop(request.request_id, None)
        if num_external_tokens == 0 or lookup is None:
            return
        assert num_external_tokens % self.block_size == 0, num_external_tokens
        first = lookup.local_tokens // self.block_size
        last = first + num_external_tokens // self.block_size
        block_ids = compat.request_block_ids(blocks)[first:last]
        slots = lookup.slots[first:last]
        self.host.ready_prefix(lookup.keys[:last], touch=True)
        self._loads.append(BlockTransfer(request.request_id, block_ids, slots))
        self.stats.inc("lookup_hits_total")
        self.stats.inc("hit_tokens_total", num_external_tokens, tier="host")
        logger.debug("promptcache: request %s loads %d tokens (%d blocks) from host; "
                     "%d were in vLLM's prefix cache", request.request_id,
                     num_external_tokens, len(slots), lookup.local_tokens)

    # -- saves -----------------------------------------------------------------
    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict | None]:
        req_id = request.request_id
        self._lookups.pop(req_id, None)
        self._looked_up.discard(req_id)
        tokens = request.all_token_ids
        # KV exists for the tokens fed to the model: never the last sampled one.
        n_tokens = min(request.num_computed_tokens, len(tokens) - 1)
        if not self.config.save_decode_tokens:
            n_tokens = min(n_tokens, request.num_prompt_tokens)
        n_blocks = min(n_tokens // self.block_size, len(block_ids))
        if n_blocks == 0:
            return False, None
        keys = self.keyer.block_keys(tokens, compat.request_cache_salt(request), n_blocks)
        claimed = self.host.reserve(keys)
        if not claimed:
            return False, None
        slots = [slot for _, slot in claimed]
        self._saves.append(BlockTransfer(req_id, [block_ids[i] for i, _ in claimed], slots))
        self._inflight_saves[req_id] = slots
        logger.debug("promptcache: request %s finished; saving %d of its %d full blocks to host",
                     req_id, len(slots), n_blocks)
        # Keep the blocks until the worker reports the save done (get_finished).
        return True, None

    # -- per step --------------------------------------------------------------
    def build_connector_meta(self, scheduler_output: Any) -> PromptCacheMetadata:
        meta = PromptCacheMetadata(loads=self._loads, saves=self._saves)
        self._loads, self._saves = [], []
        return meta

    def update_connector_output(self, connector_output: Any) -> None:
        done = connector_output.finished_sending or ()
        if not done:
            return
        worker_meta = compat.worker_meta_of(connector_output)
        failed = worker_meta.failed_saves if worker_meta is not None else set()
        for req_id in done:
            slots = self._inflight_saves.pop(req_id, None)
            if slots is None:
                continue
            if req_id in failed:
                self.host.abort(slots)
                self.stats.inc("save_failures_total", len(slots), tier="host")
            else:
                self.host.commit(slots)

    def has_pending_saves(self) -> bool:
        return bool(self._saves or self._inflight_saves)

    def get_kv_connector_stats(self) -> PromptCacheStats | None:
        new_evictions = self.host.evictions - self._evictions_reported
        if new_evictions:
            self.stats.inc("evictions_total", new_evictions, tier="host")
            self._evictions_reported = self.host.evictions
        self.stats.set("tier_bytes_in_use", self.host.bytes_in_use * self.world_size, tier="host")
        self.stats.set("tier_capacity_bytes", self.host.capacity_bytes * self.world_size, tier="host")
        return self.stats.take()

    def reset_cache(self) -> bool:
        dropped = self.host.clear()
        logger.info("promptcache: host tier reset, %d blocks dropped", dropped)
        return True
