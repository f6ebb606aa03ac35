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

An entry is untrusted input even when its checksum holds: whoever holds the remote
secret could otherwise map any tokens to any KV on every instance.  So an entry is
checked in the background, before the scheduler sees it: its fields in type and
range (token ids that fit an int32, 16-byte keys, a namespace that is a string or
none, at most MAX_ENTRY_TOKENS tokens), and its keys must be the keys of its own
tokens (`keys == block_keys(tokens, ns)`: an entry can name only KV whose key
chain those tokens produce).  A bad entry is skipped, counted
(rejected_store_entries_total{tier="remote"}) and logged once; `sync` never raises.
"""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import Future
from typing import Any, Sequence

from ..store.keys import BlockKey, BlockKeyer
from ..store.untrusted import BadValue, json_object

logger = logging.getLogger("vllm.promptcache")

KIND = "segments"
SYNC_EVERY_S = 2.0
MAX_ENTRY_TOKENS = 1 << 20
_MAX_TOKEN_ID = (1 << 31) - 1  # the segment index packs token ids as int32


class RejectedEntry(ValueError):
    """A shared segment entry that is not what it must be; the message says why."""


def check_entry(entry: bytes, keyer: BlockKeyer) -> tuple[list[int], list[BlockKey], str | None]:
    """(tokens, keys, namespace) of a shared segment entry, every field checked;
    RejectedEntry (never another exception) when anything is wrong."""
    try:
        data = json_object(entry, "the entry")
    except BadValue as e:
        raise RejectedEntry(str(e)) from None
    tokens, hex_keys, namespace = data.get("tokens"), data.get("keys"), data.get("ns")
    if not isinstance(tokens, list) or not isinstance(hex_keys, list):
        raise RejectedEntry("tokens and keys must be lists")
    if not hex_keys or len(tokens) != len(hex_keys) * keyer.block_size \
            or len(tokens) > MAX_ENTRY_TOKENS:
        raise RejectedEntry(f"{len(tokens)} tokens for {len(hex_keys)} blocks of "
                            f"{keyer.block_size} (at most {MAX_ENTRY_TOKENS} tokens)")
    for t in tokens:
        if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t <= _MAX_TOKEN_ID:
            raise RejectedEntry(f"a token id {t!r:.40} is not an int in [0, {_MAX_TOKEN_ID}]")
    keys = []
    for k in hex_keys:
        try:
            key = bytes.fromhex(k) if isinstance(k, str) and len(k) == 32 else b""
        except ValueError:
            key = b""
        if len(key) != 16:
            raise RejectedEntry("a key is not 16 bytes of hex")
        keys.append(key)
    if namespace is not None and not isinstance(namespace, str):
        raise RejectedEntry(f"the namespace is a {type(namespace).__name__}")
    if keyer.block_keys(tokens, namespace) != keys:
        raise RejectedEntry("its keys are not the keys of its tokens")
    return tokens, keys, namespace


class SharedSegments:
    def __init__(self, remote: Any, shifted: Any, block_size: int,
                 keyer: BlockKeyer | None = None):
        self.remote = remote
        self.shifted = shifted
        self.block_size = block_size
        # The keys an entry must carry are those its tokens give under this model's
        # fingerprint: the store's own (its digest seeds every key chain).
        self.keyer = keyer or BlockKeyer.from_digest(bytes.fromhex(remote.store.fingerprint),
                                                     block_size)
        self._known: dict[str, bytes] = {}   # name -> entry bytes already seen (good or bad)
        self._seg_ids: dict[str, int] = {}
        self._fetch: Future | None = None
        self._next_sync = 0.0
        self.rejected = 0

    def publish(self, name: str, tokens: Sequence[int], keys: Sequence[BlockKey],
                namespace: str | None) -> None:
        """Make module `name` findable on every instance (in the background)."""
        entry = json.dumps({"tokens": list(tokens[:len(keys) * self.block_size]),
                            "keys": [k.hex() for k in keys], "ns": namespace}).encode()
        self._known[name] = entry  # ours: never re-added from the store
        self.remote.submit(self.remote.store.put_meta, KIND, name, entry)

    def sync(self) -> None:
        """Once a step: apply a finished read of the table; start the next when due.
        Never raises: the table is another instance's (or anyone's with the secret)."""
        try:
            self._sync()
        except Exception:  # noqa: BLE001 - nothing read from the store may stop the engine
            logger.exception("promptcache: applying the shared module table failed")
            self._fetch = None

    def _sync(self) -> None:
        if self._fetch is not None and self._fetch.done():
            try:
                changed = self._fetch.result() or {}
            except Exception:  # noqa: BLE001 - the store never raises; be safe anyway
                changed = {}
            self._fetch = None
            for name, (entry, checked) in changed.items():
                if self._known.get(name) != entry:
                    self._add(name, entry, checked)
        if self._fetch is None and time.monotonic() >= self._next_sync:
            self._next_sync = time.monotonic() + SYNC_EVERY_S
            self._fetch = self.remote.submit(self._read_changed, dict(self._known))

    def _read_changed(self, known: dict[str, bytes]) -> dict[str, tuple[bytes, Any]]:
        """On the store's thread: the entries not in `known`, each checked
        ((tokens, keys, ns), or the RejectedEntry that says why not)."""
        out = {}
        for name, entry in self.remote.store.items_meta(KIND).items():
            if known.get(name) == entry:
                continue
            try:
                out[name] = (entry, check_entry(entry, self.keyer))
            except RejectedEntry as e:
                out[name] = (entry, e)
        return out

    def _add(self, name: str, entry: bytes, checked: Any) -> None:
        self._known[name] = entry  # a bad entry is logged and counted once, not every sync
        if isinstance(checked, RejectedEntry):
            self.rejected += 1
            self.remote.store.count_rejected()
            logger.warning("promptcache: ignoring the shared module entry %r: %s", name[:200],
                           checked)
            return
        tokens, keys, namespace = checked
        old = self._seg_ids.pop(name, None)
        if old is not None:
            self.shifted.unpin(old)
        seg_id = self.shifted.remember(tokens, keys, namespace)
        if seg_id is not None:
            self.shifted.pin(seg_id)
            self._seg_ids[name] = seg_id
        logger.info("promptcache: module %r shared by another instance: %d tokens", name,
                    len(tokens))
