"""Scheduler side of position-independent reuse: which host slots hold the stored
tokens that reappear in a new prompt, and at which position delta.

Every saved run of KV (a finished request's full blocks) is remembered as a
segment: its token ids, computed at positions 0..n-1, and the block keys its
blocks are stored under.  `SegmentIndex` finds the prompt's tokens inside stored
segments at any offset; this planner turns the pieces it returns into a
token-wise copy plan from READY host slots, which the worker executes with
`load_tokens_shifted` (RoPE-rotating K by the delta).  Blocks of a segment that
are not in host end the plan there; where a tier below host holds them (disk, or
the shared store for a module another instance registered), `below` fetches them
into host and the plan says it is waiting, so the request asks again.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Sequence

from ..store.host_tier import HostTier
from ..store.keys import BlockKey
from ..store.segments import SegmentIndex

# Segments and tokens remembered at most (the index costs about 9 bytes a token).
MAX_SEGMENTS = 4096
MAX_TOKENS = 16 << 20


@dataclass
class ShiftedPlan:
    """Token-wise sources for prompt tokens [start, start + len(deltas))."""

    start: int
    src_slots: list[int] = field(default_factory=list)
    src_offsets: list[int] = field(default_factory=list)
    deltas: list[int] = field(default_factory=list)
    # The plan stopped at a block whose save is still in flight: asking again
    # shortly may find more (e.g. a module registered just before).
    waiting: bool = False

    @property
    def num_tokens(self) -> int:
        return len(self.deltas)

    def truncate(self, n: int) -> None:
        del self.src_slots[n:], self.src_offsets[n:], self.deltas[n:]

    @property
    def shifted_tokens(self) -> int:
        return sum(1 for d in self.deltas if d)


class ShiftedReuse:
    def __init__(self, block_size: int, host: HostTier, below: Any = None):
        self.block_size = block_size
        self.host = host
        # below(keys, j) -> True while blocks keys[j:] are being fetched into host.
        self.below = below
        self.index = SegmentIndex()
        self._keys: OrderedDict[int, list[BlockKey]] = OrderedDict()
        self._by_last_key: dict[BlockKey, int] = {}
        self._next_id = 0
        self._tokens = 0
        self._pinned: set[int] = set()  # segments of prompt modules: never forgotten

    def remember(self, tokens: Sequence[int], keys: list[BlockKey],
                 salt: str | None) -> int | None:
        """A saved run: tokens[:len(keys) * block_size] under `keys`; returns its id."""
        if not keys:
            return None
        # A conversation's earlier turn is a prefix of this run: keep only the longer one.
        for key in keys:
            older = self._by_last_key.get(key)
            if older is not None and older not in self._pinned:
                self._forget(older)
        seg_id, self._next_id = self._next_id, self._next_id + 1
        self.index.add(seg_id, tokens[:len(keys) * self.block_size], salt)
        self._keys[seg_id] = keys
        self._by_last_key[keys[-1]] = seg_id
        self._tokens += len(keys) * self.block_size
        while len(self._keys) - len(self._pinned) > 1 and (
                len(self._keys) > MAX_SEGMENTS or self._tokens > MAX_TOKENS):
            self._forget(next(s for s in self._keys if s not in self._pinned))
        return seg_id

    def pin(self, seg_id: int) -> None:
        """A module's segment: never forgotten while pinned."""
        if seg_id in self._keys:
            self._pinned.add(seg_id)

    def unpin(self, seg_id: int) -> None:
        """A module was replaced: its segment may now be forgotten like any other."""
        self._pinned.discard(seg_id)

    def _forget(self, seg_id: int) -> None:
        keys = self._keys.pop(seg_id, None)
        if keys is None:
            return
        self.index.remove(seg_id)
        self._tokens -= len(keys) * self.block_size
        if self._by_last_key.get(keys[-1]) == seg_id:
            del self._by_last_key[keys[-1]]

    def plan(self, tokens: Sequence[int], salt: str | None, start: int, limit: int) -> ShiftedPlan:
        """Sources for tokens [start, x), x <= limit, from READY host slots, and
        contiguous from `start`; the caller rounds x down to a block boundary."""
        plan = ShiftedPlan(start)
        bs = self.block_size
        for piece in self.index.cover(tokens, salt, start=start, end=limit):
            keys = self._keys.get(piece.seg_id)
            if keys is None:
                break
            slot_of_block: dict[int, int | None] = {}
            for t in range(piece.start, piece.end):
                src = piece.src_start + (t - piece.start)
                j = src // bs
                if j not in slot_of_block:
                    ready = self.host.ready_prefix([keys[j]], touch=False) if j < len(keys) else []
                    slot_of_block[j] = ready[0] if ready else None
                slot = slot_of_block[j]
                if slot is None:
                    plan.waiting = j < len(keys) and (
                        self.host.is_pending(keys[j])
                        or (self.below is not None and self.below(keys, j)))
                    return plan
                plan.src_slots.append(slot)
                plan.src_offsets.append(src % bs)
                plan.deltas.append(piece.delta)
        return plan
