"""The module table in the shared remote store: a module registered through one
instance is known by name on every instance that shares the store.

Its KV is found by the engines through the shared segment entries
(`connector/shared_segments.py`); what a front end needs besides is the name ->
text and token ids mapping, so that requests (`promptcache_modules`, `compose`)
can name the module on any instance.  Entries live in the store's checksummed
metadata, namespaced by the model fingerprint, as the KV does.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from .registry import Module

logger = logging.getLogger("vllm.promptcache")

KIND = "modules"


class SharedModuleTable:
    def __init__(self, store: Any):
        self.store = store

    def publish(self, module: Module) -> bool:
        data = json.dumps({"text": module.text, "tokens": list(module.token_ids)}).encode()
        return self.store.put_meta(KIND, module.name, data)

    def fetch(self, name: str) -> Module | None:
        return _decode(name, self.store.get_meta(KIND, name))

    def fetch_all(self) -> list[Module]:
        return [m for name, data in self.store.items_meta(KIND).items()
                if (m := _decode(name, data)) is not None]

    def close(self) -> None:
        self.store.close()


def _decode(name: str, data: bytes | None) -> Module | None:
    if data is None:
        return None
    try:
        body = json.loads(data)
        return Module(name, str(body["text"]), tuple(int(t) for t in body["tokens"]))
    except (ValueError, KeyError, TypeError):
        logger.warning("promptcache: ignoring a malformed shared module %r", name)
        return None


def shared_module_table(config: Any, vllm_config: Any) -> SharedModuleTable | None:
    """The shared table of this model's modules, where the remote tier is on."""
    if config is None or not config.remote_url:
        return None
    from ..connector.remote import remote_store
    from ..store.keys import ModelFingerprint

    fingerprint = ModelFingerprint.from_vllm_config(vllm_config, 0, config.model_id)
    store = remote_store(config, fingerprint)
    return SharedModuleTable(store) if store is not None else None
