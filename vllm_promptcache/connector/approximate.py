"""Which GPU blocks hold approximate KV, so it is never saved under exact keys.

KV loaded at a shifted position (prompt modules, truncated chats) was computed in
another context, and everything computed after it attended to it: it is
approximate.  The request that loaded it saves those blocks under keys only it
has.  But vLLM's own prefix cache also keeps those GPU blocks, under the hashes
of their tokens, and hands them to a later request with the same leading
tokens; that request must treat them -- and all it computes after them -- as
approximate too, or it would store them under the exact chained keys, where an
exact-only engine (after a restart, say) would serve them as exact.

Blocks are marked when vLLM allocates them, not when the request finishes: a
preempted request's blocks are freed (vLLM keeps them in its prefix cache) and its
block list is empty from then on, so a request aborted while it waits would mark
nothing at its finish.  Every block a request with approximate KV holds from its
first approximate block on is marked at allocation (`allocated`) and, for blocks
vLLM adds while it runs (decode, chunked prefill), once per step (`step`).

A mark is (owner's state, index in the owner's blocks).  A block handed to a later
request at index i is approximate when the owner's vLLM block hash at its index
equals the later request's hash at i: the block still holds the owner's tokens (a
block id that vLLM reused for other tokens has another hash).  Where a hash is not
known, the block counts as approximate: that costs a save, never a wrong token.

Only blocks vLLM's prefix cache handed over can be such blocks: a request's blocks
up to its local prefix-cache hit (and the block after it, which vLLM may also take
from its cache as a partial tail).  Blocks past that were computed or loaded by the
request itself, whatever their ids held before; with vLLM's prefix cache off no
block is ever handed over, and nothing is marked.
"""

from __future__ import annotations

from typing import Any, Sequence

from .. import compat
from .request_state import RequestState


class ApproximateBlocks:
    def __init__(self, prefix_caching: bool = True, block_size: int = 1) -> None:
        self.prefix_caching = prefix_caching
        self.block_size = block_size
        # block id -> (the state of the request that held approximate KV in it, index)
        self._marks: dict[int, tuple[RequestState, int]] = {}
        self.kv_cache_manager: Any = None

    def bind(self, kv_cache_manager: Any) -> None:
        self.kv_cache_manager = kv_cache_manager

    def __len__(self) -> int:
        return len(self._marks)

    # -- marking ----------------------------------------------------------------------
    def allocated(self, state: RequestState, block_ids: Sequence[int]) -> None:
        """The request holds these blocks (its whole allocation, in order): mark the
        ones from its first approximate block on not marked yet."""
        first = state.approximate_from
        if first is None or not self.prefix_caching:
            return
        for i in range(max(first, state.marked_blocks), len(block_ids)):
            self._marks[block_ids[i]] = (state, i)
        state.marked_blocks = max(state.marked_blocks, len(block_ids))

    def step(self, running: Sequence[RequestState]) -> None:
        """Blocks vLLM gave running approximate requests since their allocation."""
        if not self.prefix_caching:
            return
        for state in running:
            if state.approximate_from is None:
                continue
            ids = compat.running_block_ids(self.kv_cache_manager, state.req_id)
            if ids and len(ids) > state.marked_blocks:
                self.allocated(state, ids)

    # -- checking ---------------------------------------------------------------------
    def _holds_owner_kv(self, block_id: int, hashes: Sequence[Any] | None, i: int,
                        skip: RequestState | None = None) -> bool:
        mark = self._marks.get(block_id)
        if mark is None or mark[0] is skip:
            return False
        owner, index = mark
        owner_hashes = getattr(owner.request, "block_hashes", None)
        if hashes is None or owner_hashes is None or i >= len(hashes):
            return True
        if index >= len(owner_hashes):
            # The owner never filled that block: vLLM cannot have cached it as the
            # owner's, so a later request was not handed it with the owner's KV.
            return False
        return owner_hashes[index] == hashes[i]

    def handed_approximate(self, state: RequestState, block_ids: Sequence[int]) -> int | None:
        """The first block vLLM's prefix cache handed the request that holds another
        request's approximate KV, or None: the request computes everything after it
        from approximate KV, so its own blocks from there on are approximate too (and
        are marked as it runs, for whoever is handed them next)."""
        first = self.exact_prefix(state, block_ids, len(block_ids), own=False)
        return first if first < len(block_ids) else None

    def exact_prefix(self, state: RequestState, block_ids: Sequence[int], n_blocks: int,
                     own: bool = True) -> int:
        """How many of the request's first `n_blocks` blocks hold exact KV."""
        first = state.approximate_from if own else None
        exact = n_blocks if first is None else min(n_blocks, first)
        if not self.prefix_caching or not self._marks:
            return exact
        # Blocks vLLM's prefix cache may have handed over: up to its largest local hit
        # over the request's lookups (a preempted request is looked up again), and the
        # block after it.
        handed = min(exact, -(-state.local_tokens // self.block_size) + 1)
        hashes = getattr(state.request, "block_hashes", None)
        if not own and hashes is not None:
            # At allocation only full, hashed blocks can have come from vLLM's cache.
            handed = min(handed, len(hashes))
        for i in range(handed):
            if self._holds_owner_kv(block_ids[i], hashes, i, skip=None if own else state):
                return i
        return exact

    def reset(self) -> None:
        """vLLM's prefix cache was reset: no cached block survives."""
        self._marks.clear()
