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
from typing import Any, Sequence

import numpy as np

from ..store.host_tier import HostTier
from ..store.keys import BlockKey
from ..store.segments import SegmentIndex

# Segments and tokens remembered at most (the index costs about 9 bytes a token).
MAX_SEGMENTS = 4096
MAX_TOKENS = 16 << 20


class ShiftedPlan:
    """Token-wise sources for prompt tokens [start, start + num_tokens): token t comes
    from host slot src_slots[t], offset src_offsets[t], moved by deltas[t] positions.

    Built from whole runs (one `add` per piece of a stored segment) and held as int64
    numpy arrays: a plan of 100k tokens costs a few array operations per piece, never
    a Python step per token."""

    def __init__(self, start: int, block_size: int):
        self.start = start
        self.block_size = block_size
        # (src_slots, src_offsets, deltas, from_gap) per run; merged on first read.
        self._parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        # The plan stopped at a block whose save is still in flight: asking again
        # shortly may find more (e.g. a module registered just before).
        self.waiting = False

    def add(self, src_start: int, n: int, block_slots: np.ndarray, first_block: int,
            delta: int, gap: bool = False) -> None:
        """n tokens read from a stored run's tokens [src_start, src_start + n), whose
        block j (from first_block on) sits in host slot block_slots[j - first_block]."""
        if n <= 0:
            return
        bs = self.block_size
        src = np.arange(src_start, src_start + n, dtype=np.int64)
        self._parts.append((np.asarray(block_slots, dtype=np.int64)[src // bs - first_block],
                            src % bs, np.full(n, delta, dtype=np.int64),
                            np.full(n, gap, dtype=bool)))

    def _merged(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        if len(self._parts) != 1:
            if not self._parts:
                empty = np.zeros(0, dtype=np.int64)
                return empty, empty, empty, np.zeros(0, dtype=bool)
            self._parts = [tuple(np.concatenate(column) for column in zip(*self._parts))]
        return self._parts[0]

    @property
    def src_slots(self) -> np.ndarray:
        return self._merged()[0]

    @property
    def src_offsets(self) -> np.ndarray:
        return self._merged()[1]

    @property
    def deltas(self) -> np.ndarray:
        return self._merged()[2]

    @property
    def num_tokens(self) -> int:
        return sum(len(part[2]) for part in self._parts)

    def truncate(self, n: int) -> None:
        if n < self.num_tokens:
            self._parts = [tuple(column[:n] for column in self._merged())]

    @property
    def shifted_tokens(self) -> int:
        return int(np.count_nonzero(self.deltas))

    @property
    def gap_tokens(self) -> int:
        """Tokens read from encoded gaps (text between modules), not from modules."""
        return int(np.count_nonzero(self._merged()[3]))


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

    def remember(self, tokens: Sequence[int], keys: list[BlockKey], salt: str | None,
                 n_tokens: int | None = None) -> int | None:
        """A saved run: tokens[:n_tokens] (default: whole blocks, len(keys) of them),
        block j under keys[j] (the last may be a partial block's tail key); its id."""
        if not keys:
            return None
        bs = self.block_size
        n_tokens = len(keys) * bs if n_tokens is None else n_tokens
        full = n_tokens // bs  # blocks a longer run shares with this one
        # A conversation's earlier turn is a prefix of this run: keep only the longer one.
        for key in keys[:full]:
            older = self._by_last_key.get(key)
            if older is not None and older not in self._pinned:
                self._forget(older)
        seg_id, self._next_id = self._next_id, self._next_id + 1
        self.index.add(seg_id, tokens[:n_tokens], salt)
        self._keys[seg_id] = keys
        if full:
            self._by_last_key[keys[full - 1]] = seg_id
        self._tokens += len(keys) * bs
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
        for key in keys[-2:]:  # the last full block's key (the last or the one before a tail)
            if self._by_last_key.get(key) == seg_id:
                del self._by_last_key[key]

    def clear(self) -> None:
        """Forget every run, pinned ones too (a reset: no stored KV is valid now)."""
        self._pinned.clear()
        for seg_id in list(self._keys):
            self._forget(seg_id)

    def plan(self, tokens: Sequence[int], salt: str | None, start: int, limit: int) -> ShiftedPlan:
        """Sources for tokens [start, x), x <= limit, from READY host slots, and
        contiguous from `start`; the caller rounds x down to a block boundary."""
        plan = ShiftedPlan(start, self.block_size)
        for piece in self.index.cover(tokens, salt, start=start, end=limit):
            keys = self._keys.get(piece.seg_id)
            if keys is None or not self.add_run(plan, keys, piece.src_start,
                                                piece.end - piece.start, piece.delta):
                break
        return plan

    def add_run(self, plan: ShiftedPlan, keys: Sequence[BlockKey], src_start: int, n: int,
                delta: int, gap: bool = False) -> bool:
        """Add the n tokens of a stored run (blocks under `keys`) starting at its token
        src_start, as far as their blocks are READY in host; False where it stopped
        short (then plan.waiting says whether asking again may find more)."""
        bs = self.block_size
        j0, j1 = src_start // bs, (src_start + n - 1) // bs
        slots = self.host.ready_prefix(keys[j0:j1 + 1], touch=False) if j0 < len(keys) else []
        ready = max(0, min(n, (j0 + len(slots)) * bs - src_start))
        plan.add(src_start, ready, np.asarray(slots, dtype=np.int64), j0, delta, gap)
        if ready == n:
            return True
        j = j0 + len(slots)
        plan.waiting = j < len(keys) and (self.host.is_pending(keys[j]) or (
            self.below is not None and self.below(list(keys), j)))
        return False
