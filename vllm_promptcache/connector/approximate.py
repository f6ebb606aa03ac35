"""Which GPU blocks hold approximate KV, so it is never saved under exact keys.

KV loaded at a shifted position (prompt modules, truncated chats) was computed in
another context, and everything computed after it attended to it: it is
approximate.  The request that loaded it saves those blocks under keys only it
has.  But vLLM's own prefix cache also keeps those GPU blocks, under the hashes
of their tokens, and hands them to a later request with the same leading
tokens; that request must treat them -- and all it computes after them -- as
approximate too, or it would store them under the exact chained keys, where an
exact-only engine (after a restart, say) would serve them as exact.

Two sources tell which blocks are approximate:
- requests still running with a shifted load: their blocks from the first
  shifted block on (read from vLLM's KV cache manager, `bind`);
- finished ones: their approximate blocks are marked, block id -> vLLM's block
  hash at the time, so a block id that vLLM reused for other tokens is not
  mistaken for the old one.
A block id marked and later recomputed for the very same tokens still reads as
approximate: that costs a save, never a wrong token.

Only blocks vLLM's prefix cache handed over can be such blocks: a request's blocks
up to its local prefix-cache hit (and the block after it, which vLLM may also take
from its cache as a partial tail).  Blocks past that were computed or loaded by the
request itself, whatever their ids held before; with vLLM's prefix cache off no
block is ever handed over.
"""

from __future__ import annotations

from typing import Any, Sequence

from .. import compat


class ApproximateBlocks:
    def __init__(self, prefix_caching: bool = True, block_size: int = 1) -> None:
        self.prefix_caching = prefix_caching
        self.block_size = block_size
        self._marks: dict[int, Any] = {}    # block id -> vLLM block hash (None: unknown)
        self._running: dict[str, int] = {}  # request id -> its first approximate block
        self._local: dict[str, int] = {}    # request id -> its local prefix-cache hit, tokens
        self._kv_cache_manager: Any = None

    def looked_up(self, req_id: str, local_tokens: int) -> None:
        """vLLM's prefix cache gave the request `local_tokens` (the largest over its
        lookups: a preempted request is looked up again)."""
        self._local[req_id] = max(local_tokens, self._local.get(req_id, 0))

    def bind(self, kv_cache_manager: Any) -> None:
        self._kv_cache_manager = kv_cache_manager

    def started(self, req_id: str, first_block: int) -> None:
        """Request `req_id` holds approximate KV from block `first_block` on."""
        self._running[req_id] = min(first_block, self._running.get(req_id, first_block))

    def own_start(self, req_id: str) -> int | None:
        return self._running.get(req_id)

    def _running_blocks(self, skip: str) -> set[int]:
        out: set[int] = set()
        for req_id, first in self._running.items():
            if req_id == skip:
                continue
            ids = compat.running_block_ids(self._kv_cache_manager, req_id)
            if ids:
                out.update(ids[first:])
        return out

    def exact_prefix(self, request: Any, block_ids: Sequence[int], n_blocks: int) -> int:
        """How many of the request's first `n_blocks` blocks hold exact KV."""
        req_id = request.request_id
        exact = min(n_blocks, self._running.get(req_id, n_blocks))
        if not self.prefix_caching or not (
                self._marks or len(self._running) > (req_id in self._running)):
            return exact
        handed = exact
        if req_id in self._local:  # blocks vLLM's prefix cache may have handed over
            handed = min(exact, -(-self._local[req_id] // self.block_size) + 1)
        hashes = getattr(request, "block_hashes", None)
        running = self._running_blocks(skip=req_id)
        for i in range(handed):
            block_id = block_ids[i]
            if block_id in running:
                return i
            if block_id in self._marks:
                mark = self._marks[block_id]
                if mark is None or hashes is None or i >= len(hashes) or mark == hashes[i]:
                    return i
        return exact

    def finished(self, request: Any, block_ids: Sequence[int], exact: int) -> None:
        """The request ended with KV exact up to block `exact`: mark the rest (the
        blocks vLLM's prefix cache may hand to later requests)."""
        self._running.pop(request.request_id, None)
        self._local.pop(request.request_id, None)
        hashes = getattr(request, "block_hashes", None)
        for i in range(exact, len(block_ids)):
            if hashes is None:
                self._marks[block_ids[i]] = None
            elif i < len(hashes):  # only full, hashed blocks can be cached by vLLM
                self._marks[block_ids[i]] = hashes[i]

    def reset(self) -> None:
        """vLLM's prefix cache was reset: no cached block survives."""
        self._marks.clear()
