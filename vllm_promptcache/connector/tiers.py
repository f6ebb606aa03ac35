"""The configured tiers, built once from the configuration for both connector sides.

Host RAM is every engine's first tier: a buffer of slots of one block each, the same
geometry on the scheduler side (an index, `HostTier`) and in every worker (the bytes,
`HostBuffer`).  Below it, each configured tier has a scheduler-side index (which keys
it holds, what to write, what to promote: `DiskTier`, `RemoteTier`) and a worker-side
IO (its bytes: `DiskIO`, `RemoteIO`); the code that promotes, prefetches and writes
through (`secondary.py`, `store/secondary_io.py`) does not know which tier it talks
to.  This module is the one place that knows which tiers exist, where they live and
how each side builds its half:

    name     scheduler side   worker side   where
    disk     DiskTier         DiskIO        <disk_path>/<fingerprint>/ (files)
    remote   RemoteTier       RemoteIO      <remote_url>, keys promptcache:<fingerprint>:*

A new tier (S3, Mooncake) is one entry here, one index module and one IO module.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Counter

from .. import compat
from ..config import PromptCacheConfig
from ..store.host_tier import slots_for
from ..store.keys import BlockKey, ModelFingerprint
from ..store.policies import make_policy

logger = logging.getLogger("vllm.promptcache")


def host_tier_geometry(vllm_config: Any, kv_cache_config: Any, config: PromptCacheConfig) -> tuple[int, int]:
    """(slots, bytes per slot per worker): the same numbers on both connector sides."""
    slot_bytes = sum(nbytes for _, nbytes in compat.layer_page_bytes(kv_cache_config))
    world = vllm_config.parallel_config.world_size
    return slots_for(config.host_bytes // world, slot_bytes), slot_bytes


def model_fingerprint(vllm_config: Any, config: PromptCacheConfig) -> ModelFingerprint:
    # tp_rank 0 stands for the whole TP group: ranks save and load in lockstep.
    return ModelFingerprint.from_vllm_config(vllm_config, tp_rank=0, model_id=config.model_id)


def disk_directory(fingerprint: ModelFingerprint,
                   config: PromptCacheConfig) -> tuple[str, str] | None:
    """(directory, fingerprint hex): one sub-directory per model fingerprint, so
    different models, weights, dtypes or layouts never share files.  None where
    the weights cannot be named: nothing is kept across restarts then."""
    if not fingerprint.persistent:
        return None
    return os.path.join(config.disk_dir, fingerprint.digest().hex()), fingerprint.digest().hex()


@dataclass
class TierIndexes:
    """The scheduler side's tiers below host, in lookup order, and a line for the log."""

    disk: Any = None
    remote: Any = None
    disk_line: str = "disk tier off"

    def below_host(self) -> list[Any]:
        return [t for t in (self.disk, self.remote) if t is not None]


def scheduler_tiers(config: PromptCacheConfig, fingerprint: ModelFingerprint, world_size: int,
                    slot_bytes: int, layout: tuple, queued: Counter[BlockKey]) -> TierIndexes:
    """Build (and, for disk, scan) the indexes of the tiers below host."""
    out = TierIndexes()
    place = disk_directory(fingerprint, config) if config.disk_enabled else None
    if place is not None and compat.worker_meta_supported():
        from ..store import disk_format as fmt
        from ..store.disk_tier import DiskTier, prepare_directory

        directory, fp_hex = place
        disk = DiskTier(prepare_directory(directory), config.disk_bytes, world_size,
                        make_policy(config.eviction_policy), queued,
                        fmt.disk_secret(config.disk_dir), slot_bytes, layout,
                        reclaim_others=config.disk_reclaim_others,
                        kv_layout=fingerprint.kv_layout)
        files, blocks = disk.scan(_accept_file(fp_hex, layout, slot_bytes))
        out.disk = disk
        out.disk_line = (f"disk tier {config.disk_gb:g} GiB at {disk.directory}, {files} files / "
                         f"{blocks} blocks found")
    elif place is not None:
        logger.warning("promptcache: this vLLM has no connector worker metadata; "
                       "the disk tier is off")
    from .remote import remote_tier

    out.remote = remote_tier(config, fingerprint, world_size, slot_bytes)
    return out


def _accept_file(fp_hex: str, layout: tuple, slot_bytes: int) -> Callable[[Any], str | None]:
    def accept(header: Any) -> str | None:
        if header.fingerprint != fp_hex:
            return "another model fingerprint"
        if header.layout != layout or header.block_bytes != slot_bytes:
            return "another KV layout"
        return None
    return accept


def worker_tiers(vllm_config: Any, config: PromptCacheConfig, layer_pages: list,
                 slot_bytes: int, max_staged_bytes: int) -> dict[str, Any]:
    """The worker side's IO of each tier below host, by name ("disk", "remote")."""
    from .metadata import PromptCacheWorkerMeta

    out: dict[str, Any] = {}
    if PromptCacheWorkerMeta is None:  # no way to report back: no tier below host
        return out
    world = vllm_config.parallel_config.world_size
    fingerprint = model_fingerprint(vllm_config, config)  # reads the weights' headers
    place = disk_directory(fingerprint, config) if config.disk_enabled else None
    if place is not None:
        from ..store.disk_format import disk_secret
        from ..store.disk_io import DiskIO

        directory, digest = place
        out["disk"] = DiskIO(directory, digest, compat.tp_rank(), world, layer_pages,
                             max_staged_bytes, disk_secret(config.disk_dir),
                             kv_layout=fingerprint.kv_layout)
    from .remote import remote_store

    store = remote_store(config, fingerprint, compat.tp_rank(), world, slot_bytes)
    if store is not None:
        from ..store.remote_io import RemoteIO

        out["remote"] = RemoteIO(store, slot_bytes, max_staged_bytes)
    return out
