"""A request's block keys, and everything besides its tokens that goes into them.

vLLM's own prefix cache keys a block on its tokens *and* per-block extra keys:
the LoRA adapter, multimodal items with their offsets in the block, digests of
prompt embeddings, and the cache salt (`generate_block_hash_extra_keys`).  The
plugin takes those extra keys from vLLM (through `compat`), so a block that
vLLM's prefix cache would not share is not shared here either, and adds what a
persistent tier needs beyond them: the adapter's *content* (an adapter replaced
on disk under the same name is another adapter).

A request that cannot be keyed safely (an adapter that is not a readable local
directory, a multimodal item without an identifier, a vLLM without the extra-key
function) is served uncached: `keys()` answers None, and the reason is counted.

Keys are computed once per request and extended as its tokens grow, never
recomputed on every "ask again".
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from .. import compat
from ..store.keys import (BlockKey, BlockKeyer, UnknownWeightsError, directory_identity,
                          namespace_of)

logger = logging.getLogger("vllm.promptcache")


class Unkeyable(Exception):
    """This request's KV cannot be keyed safely; `reason` names why (a metric label)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


@dataclass
class _Entry:
    namespace: str | None
    shiftable: bool
    keys: list[BlockKey] = field(default_factory=list)
    mm_index: int = 0
    needs_extra: bool = False


def lora_identity(lora_request: Any) -> str:
    """Name, path and content digest of a LoRA adapter."""
    name = getattr(lora_request, "lora_name", None) or getattr(lora_request, "name", "")
    path = getattr(lora_request, "lora_path", None) or getattr(lora_request, "path", None)
    if not path:
        raise Unkeyable("lora_unresolved", f"LoRA adapter {name!r} has no local path")
    try:
        content = directory_identity(path)
    except (UnknownWeightsError, OSError) as e:
        raise Unkeyable("lora_unresolved", f"LoRA adapter {name!r}: {e}") from None
    return f"lora:{name}|{path}|{content}"


class RequestKeys:
    def __init__(self, keyer: BlockKeyer):
        self.keyer = keyer
        self.block_size = keyer.block_size
        self._entries: dict[str, _Entry] = {}
        self._skipped: dict[str, str] = {}

    # -- per request -------------------------------------------------------------
    def _entry(self, request: Any) -> _Entry | None:
        req_id = request.request_id
        entry = self._entries.get(req_id)
        if entry is not None or req_id in self._skipped:
            return entry
        try:
            entry = self._identify(request)
        except Unkeyable as e:
            self._skipped[req_id] = e.reason
            logger.debug("promptcache: request %s is served uncached: %s", req_id, e)
            return None
        self._entries[req_id] = entry
        return entry

    def _identify(self, request: Any) -> _Entry:
        parts = []
        salt = compat.request_cache_salt(request)
        if salt:
            parts.append("salt:" + salt)
        lora = getattr(request, "lora_request", None)
        if lora:
            parts.append(lora_identity(lora))
        mm = getattr(request, "mm_features", None) or []
        for feature in mm:
            if getattr(feature, "identifier", None) is None:
                raise Unkeyable("mm_no_identifier", "a multimodal item has no identifier")
        embeds = getattr(request, "prompt_embeds", None) is not None
        needs_extra = bool(salt or lora or mm or embeds)
        if needs_extra and not compat.has_block_extra_keys():
            raise Unkeyable("no_extra_keys_api", "this vLLM has no block extra-key function")
        # Tokens alone do not say what a multimodal placeholder or an embedding
        # holds: such requests are never matched at other positions.
        return _Entry(namespace_of(*parts), shiftable=not (mm or embeds),
                      needs_extra=needs_extra)

    def skip_reason(self, request: Any) -> str | None:
        """Why this request is served uncached, or None."""
        self._entry(request)
        return self._skipped.get(request.request_id)

    def namespace(self, request: Any) -> str | None:
        entry = self._entry(request)
        return entry.namespace if entry else None

    def shiftable(self, request: Any) -> bool:
        entry = self._entry(request)
        return bool(entry and entry.shiftable)

    def keys(self, request: Any, max_blocks: int | None = None) -> list[BlockKey] | None:
        """Keys of the request's first `max_blocks` full blocks (default: all but
        the block holding the last token, whose logits must be computed); None if
        the request cannot be keyed."""
        entry = self._entry(request)
        if entry is None:
            return None
        tokens = request.all_token_ids
        if max_blocks is None:
            max_blocks = (len(tokens) - 1) // self.block_size
        max_blocks = min(max_blocks, len(tokens) // self.block_size)
        have = len(entry.keys)
        if max_blocks > have:
            extra = None
            if entry.needs_extra:
                extra = [None] * max_blocks
                for i in range(have, max_blocks):
                    try:
                        keys, entry.mm_index = compat.block_extra_keys(
                            request, i * self.block_size, (i + 1) * self.block_size,
                            entry.mm_index)
                    except Exception as e:  # noqa: BLE001 - vLLM's own function failed
                        self._drop(request.request_id, "extra_keys_error", e)
                        return None
                    extra[i] = repr(keys).encode() if keys else None
            entry.keys.extend(self.keyer.block_keys(
                tokens, entry.namespace, max_blocks, extra, start=have,
                prev=entry.keys[-1] if entry.keys else None))
        return entry.keys[:max_blocks]

    def _drop(self, req_id: str, reason: str, error: Exception) -> None:
        self._entries.pop(req_id, None)
        self._skipped[req_id] = reason
        logger.debug("promptcache: request %s is served uncached: %s", req_id, error)

    def clear(self) -> None:
        """Every request's keys are computed again (the keyer's epoch changed)."""
        self._entries.clear()

    def forget(self, req_id: str) -> None:
        self._entries.pop(req_id, None)
        self._skipped.pop(req_id, None)
