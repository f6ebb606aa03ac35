"""Prompt modules shared through the remote tier: registered on one instance, found
at any position on every instance that shares the store.

A module's KV is exact and written through to the store like any saved run.  What
another instance lacks is the segment entry that position-independent reuse
matches prompts against (the module's tokens and the keys of its blocks).  The
instance that pins a module publishes that entry in the store's metadata, a
checksummed hash namespaced by the model fingerprint (`RemoteStore.put_meta`);
every instance reads the table every few seconds, in the background, and adds new
entries to its own segment index, pinned like its own modules.  When a prompt then
matches a segment whose blocks are not in host, the planner asks for them below
host (disk, then the store) and the request asks again until they are in.
"""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import Future
from typing import Any, Sequence

from ..store.keys import BlockKey

logger = logging.getLogger("vllm.promptcache")

KIND = "segments"
SYNC_EVERY_S = 2.0


class SharedSegments:
    def __init__(self, remote: Any, shifted: Any, block_size: int):
        self.remote = remote
        self.shifted = shifted
        self.block_size = block_size
        self._known: dict[str, bytes] = {}   # name -> entry bytes already indexed
        self._seg_ids: dict[str, int] = {}
        self._fetch: Future | None = None
        self._next_sync = 0.0

    def publish(self, name: str, tokens: Sequence[int], keys: Sequence[BlockKey],
                namespace: str | None) -> None:
        """Make module `name` findable on every instance (in the background)."""
        entry = json.dumps({"tokens": list(tokens[:len(keys) * self.block_size]),
                            "keys": [k.hex() for k in keys], "ns": namespace}).encode()
        self._known[name] = entry  # ours: never re-added from the store
        self.remote.submit(self.remote.store.put_meta, KIND, name, entry)

    def sync(self) -> None:
        """Once a step: apply a finished read of the table; start the next when due."""
        if self._fetch is not None and self._fetch.done():
            try:
                table = self._fetch.result() or {}
            except Exception:  # noqa: BLE001 - the store never raises; be safe anyway
                table = {}
            self._fetch = None
            for name, entry in table.items():
                if self._known.get(name) != entry:
                    self._add(name, entry)
        if self._fetch is None and time.monotonic() >= self._next_sync:
            self._next_sync = time.monotonic() + SYNC_EVERY_S
            self._fetch = self.remote.submit(self.remote.store.items_meta, KIND)

    def _add(self, name: str, entry: bytes) -> None:
        try:
            data = json.loads(entry)
            tokens = [int(t) for t in data["tokens"]]
            keys = [bytes.fromhex(k) for k in data["keys"]]
            namespace = data.get("ns")
        except (ValueError, KeyError, TypeError):
            logger.warning("promptcache: ignoring a malformed shared module entry %r", name)
            return
        if len(tokens) != len(keys) * self.block_size or not keys:
            return
        old = self._seg_ids.pop(name, None)
        if old is not None:
            self.shifted.unpin(old)
        seg_id = self.shifted.remember(tokens, keys, namespace)
        if seg_id is not None:
            self.shifted.pin(seg_id)
            self._seg_ids[name] = seg_id
        self._known[name] = entry
        logger.info("promptcache: module %r shared by another instance: %d tokens", name,
                    len(tokens))
