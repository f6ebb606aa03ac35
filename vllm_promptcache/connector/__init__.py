"""`PromptCacheConnector`: the plugin's vLLM KV connector.

vLLM builds it twice, once per role: in the engine-core process as the scheduler
side (`scheduler.py`) and in every worker as the worker side (`worker.py`).  This
class only routes vLLM's calls to the side that exists in this process.
Loaded out of tree: kv_connector="PromptCacheConnector",
kv_connector_module_path="vllm_promptcache.connector".
"""

from __future__ import annotations

import logging
from typing import Any

from .. import compat
from ..config import PromptCacheConfig
from ..metrics import PromptCachePromMetrics, PromptCacheStats
from .metadata import PromptCacheMetadata

KVConnectorBase_V1, _, KVConnectorRole, _ = compat.connector_base()
logger = logging.getLogger("vllm.promptcache")  # under vLLM's handlers and VLLM_LOGGING_LEVEL

EXTRA_CONFIG_KEY = "promptcache"


def config_from_transfer_config(kv_transfer_config: Any) -> PromptCacheConfig:
    extra = kv_transfer_config.kv_connector_extra_config or {}
    return PromptCacheConfig.from_dict(extra.get(EXTRA_CONFIG_KEY, {}), "kv_connector_extra_config")


class PromptCacheConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: Any, role: Any, kv_cache_config: Any = None):
        super().__init__(vllm_config, role, kv_cache_config)
        if kv_cache_config is None:
            raise RuntimeError("vllm-promptcache needs the KV cache config (vLLM >= 0.26)")
        hit_source = compat.cache_hit_source("host")
        if hit_source is not None:
            self._cache_hit_source = hit_source
        config = config_from_transfer_config(self._kv_transfer_config)
        self._scheduler = None
        self._worker = None
        if role == KVConnectorRole.SCHEDULER:
            from .scheduler import PromptCacheScheduler

            self._scheduler = PromptCacheScheduler(vllm_config, kv_cache_config, config)
        else:
            from .worker import PromptCacheWorker

            self._worker = PromptCacheWorker(vllm_config, kv_cache_config, config)

    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config: dict[str, Any]) -> bool:
        # Loads are awaited per layer (wait_for_layer_load), which a FULL CUDA graph
        # replay skips; vLLM then keeps PIECEWISE graphs, so attention runs outside the
        # graph and the wait runs.  Where vLLM has no such hook, start_load_kv makes a
        # FULL-graph step wait for all its loads before the forward instead.
        return True

    @property
    def requires_kv_delivery(self) -> bool:
        # A best-effort cache: a dropped save is only a future miss.
        return False

    # -- worker side -----------------------------------------------------------
    def register_kv_caches(self, kv_caches):
        self._worker.register_kv_caches(kv_caches)

    def bind_connector_metadata(self, connector_metadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        if self._worker is not None and isinstance(connector_metadata, PromptCacheMetadata):
            # Before the forward (and on a step without one): reads into host slots no
            # load of this step touches start now and land by the step's end.
            self._worker.start_promotions(connector_metadata)

    def start_load_kv(self, forward_context, **kwargs) -> None:
        meta = self._connector_metadata
        if isinstance(meta, PromptCacheMetadata):
            self._worker.start_load_kv(meta, forward_context)

    def wait_for_layer_load(self, layer_name: str) -> None:
        self._worker.wait_for_layer_load(layer_name)

    def save_kv_layer(self, layer_name, kv_layer, attn_metadata, **kwargs) -> None:
        # Saves are whole finished requests, issued in wait_for_save, not per layer.
        return

    def wait_for_save(self) -> None:
        meta = self._connector_metadata
        if isinstance(meta, PromptCacheMetadata):
            self._worker.wait_for_save(meta)

    def get_block_ids_with_load_errors(self) -> set[int]:
        # Blocks a direct read did not fill (worker.py): vLLM recomputes them.
        return self._worker.take_load_errors() if self._worker is not None else set()

    def get_finished(self, finished_req_ids):
        return self._worker.get_finished(finished_req_ids)

    def build_connector_worker_meta(self):
        return self._worker.build_worker_meta() if self._worker else None

    def get_kv_connector_stats(self):
        side = self._worker or self._scheduler
        return side.get_kv_connector_stats()

    def shutdown(self):
        if self._worker is not None:
            self._worker.shutdown()

    # -- scheduler side --------------------------------------------------------
    def on_new_request(self, request) -> None:
        self._scheduler.on_new_request(request)

    # The hooks on vLLM's scheduler thread are timed: promptcache_scheduler_seconds{hook}.
    def get_num_new_matched_tokens(self, request, num_computed_tokens):
        with self._scheduler.stats.timed("get_num_new_matched_tokens"):
            return self._scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request, blocks, num_external_tokens):
        with self._scheduler.stats.timed("update_state_after_alloc"):
            self._scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output):
        with self._scheduler.stats.timed("build_connector_meta"):
            return self._scheduler.build_connector_meta(scheduler_output)

    def update_connector_output(self, connector_output):
        self._scheduler.update_connector_output(connector_output)

    def request_finished(self, request, block_ids):
        with self._scheduler.stats.timed("request_finished"):
            return self._scheduler.request_finished(request, block_ids)

    def bind_kv_cache_manager(self, kv_cache_manager) -> None:
        # vLLM >= 0.32: lets the scheduler side see which GPU blocks running
        # requests hold (approximate KV must not leak through vLLM's prefix cache).
        base = getattr(super(), "bind_kv_cache_manager", None)
        if base is not None:
            base(kv_cache_manager)
        if self._scheduler is not None:
            self._scheduler.bind_kv_cache_manager(kv_cache_manager)

    def has_pending_push_work(self) -> bool:
        # Keep the engine stepping until saves, disk writes and promotions are
        # done, so a conversation's next turn finds them even if the engine went idle.
        return self._scheduler.has_pending_work() if self._scheduler else False

    def reset_cache(self):
        return self._scheduler.reset_cache() if self._scheduler else None

    # -- metrics ---------------------------------------------------------------
    @classmethod
    def build_kv_connector_stats(cls, data=None):
        return PromptCacheStats(data=data) if data is not None else PromptCacheStats()

    @classmethod
    def build_prom_metrics(cls, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        return PromptCachePromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)


__all__ = ["PromptCacheConnector", "config_from_transfer_config", "EXTRA_CONFIG_KEY"]
