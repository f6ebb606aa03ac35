"""Building the remote tier on either side of the connector, from the configuration.

The store is namespaced by the model fingerprint (`promptcache:{fingerprint}:...`),
so models never mix in one store; it needs weights that can be named (as the disk
tier does) and the shared secret.  A store that cannot be reached at start-up is a
warning: the tier stays off until it answers (`RemoteStore` retries with backoff).
"""

from __future__ import annotations

import logging
from typing import Any

from ..config import PromptCacheConfig
from ..store.keys import ModelFingerprint

logger = logging.getLogger("vllm.promptcache")


def remote_store(config: PromptCacheConfig, fingerprint: ModelFingerprint, rank: int = 0,
                 world: int = 1, block_bytes: int | None = None) -> Any:
    """The `RemoteStore` this engine shares, or None where the remote tier is off."""
    if not config.remote_url:
        return None
    if not fingerprint.persistent:
        logger.warning("promptcache: the remote tier is off: the weights cannot be named "
                       "(pass --promptcache-model-id)")
        return None
    from ..store.remote_store import RemoteStore

    return RemoteStore(config.remote_url, fingerprint.digest().hex(), config.remote_secret or None,
                       rank=rank, world=world, block_bytes=block_bytes,
                       timeout_ms=config.remote_timeout_ms, kv_layout=fingerprint.kv_layout)


def remote_tier(config: PromptCacheConfig, fingerprint: ModelFingerprint, world: int,
                block_bytes: int) -> Any:
    """The scheduler side's index of the remote tier, or None."""
    store = remote_store(config, fingerprint, 0, world)
    if store is None:
        return None
    from ..store.remote_tier import RemoteTier

    return RemoteTier(store, block_bytes, config.remote_timeout_ms)
