"""The partial last block of a stored run: kept, exact, found after the run's full blocks.

A finished request's KV ends, almost always, inside a block.  Block keys name whole
blocks only, so without this the last `n_tokens % block_size` tokens of every run were
dropped: the next turn of a conversation recomputed them, and a module placed right
after a stored run was cut off from it (vLLM loads a contiguous prefix only).

The tail is saved in host, and written through to the tiers below with the run's
full blocks, under a key chained from the run's last full block and the tail's tokens
(`BlockKeyer.tail_key`), which no whole-block lookup produces.  A run promoted from
below brings its tail with it (`best` names the tail wherever it is stored), so a
conversation whose history went to disk still reloads its last partial block.  A later prompt that holds the run's full
blocks and then some of the tail's tokens loads those as one more block copy, exact:
the same tokens at the same positions after the same prefix.  The copy writes the whole
block; the slots past the tail are then computed by vLLM in the same step, or lie
past the prompt and are never read.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

from ..store.host_tier import HostTier
from ..store.keys import BlockKey, BlockKeyer

# Tails remembered after one full block (runs that branch there), at most.
MAX_TAILS_PER_RUN = 16


@dataclass(frozen=True)
class Tail:
    length: int  # tokens of the block it holds
    key: BlockKey
    slot: int


class RunTails:
    def __init__(self, keyer: BlockKeyer, host: HostTier, max_runs: int):
        self.keyer = keyer
        self.host = host
        self.block_size = keyer.block_size
        self.max_runs = max(1, max_runs)
        # parent key (the run's last full block, or the namespace's seed) -> the
        # tokens of each tail saved after it (at most a block each)
        self._tails: OrderedDict[BlockKey, set[tuple[int, ...]]] = OrderedDict()

    def _parent(self, keys: Sequence[BlockKey], n_blocks: int, namespace: str | None) -> BlockKey:
        return keys[n_blocks - 1] if n_blocks else self.keyer.seed(namespace)

    def key(self, keys: Sequence[BlockKey], n_blocks: int, namespace: str | None,
            tokens: Sequence[int], length: int) -> BlockKey:
        """The key of the tail of `length` tokens after full blocks keys[:n_blocks]."""
        start = n_blocks * self.block_size
        return self.keyer.tail_key(self._parent(keys, n_blocks, namespace), namespace,
                                   tokens[start:start + length])

    def saved(self, keys: Sequence[BlockKey], n_blocks: int, namespace: str | None,
              tokens: Sequence[int], length: int) -> None:
        """A run's tail of `length` tokens is being saved: remember where to look."""
        parent = self._parent(keys, n_blocks, namespace)
        start = n_blocks * self.block_size
        tails = self._tails.setdefault(parent, set())
        tails.add(tuple(tokens[start:start + length]))
        if len(tails) > MAX_TAILS_PER_RUN:  # many runs branching from one block
            tails.discard(next(t for t in tails if t != tuple(tokens[start:start + length])))
        self._tails.move_to_end(parent)
        while len(self._tails) > self.max_runs:
            self._tails.popitem(last=False)

    def find(self, keys: Sequence[BlockKey], n_blocks: int, namespace: str | None,
             tokens: Sequence[int], limit: int) -> Tail | bool | None:
        """The READY tail after keys[:n_blocks] whose leading tokens the prompt holds
        the most of (up to token `limit`): loading those is exact, the same tokens
        after the same prefix.  True if the best one is still being saved (ask
        again); None if there is none."""
        best = self.best(keys, n_blocks, namespace, tokens, limit)
        if best is None:
            return None
        length, key = best
        if self.host.is_pending(key):
            return True
        slots = self.host.ready_prefix([key], touch=False)
        return Tail(length, key, slots[0]) if slots else None

    def best(self, keys: Sequence[BlockKey], n_blocks: int, namespace: str | None,
             tokens: Sequence[int], limit: int) -> tuple[int, BlockKey] | None:
        """(tokens the prompt shares with it, its key) of the tail saved after
        keys[:n_blocks] that the prompt holds the most of, wherever it is stored (the
        tiers below host keep tails too: promoted with the run before it)."""
        parent = self._parent(keys, n_blocks, namespace)
        tails = self._tails.get(parent)
        start = n_blocks * self.block_size
        room = min(limit - start, self.block_size)
        if not tails or room <= 0:
            return None
        want = tuple(tokens[start:start + room])
        best = None
        for tail in tails:
            m = next((i for i, (a, b) in enumerate(zip(tail, want)) if a != b),
                     min(len(tail), len(want)))
            if m and (best is None or m > best[0]):
                best = (m, tail)
        if best is None:
            return None
        return best[0], self.keyer.tail_key(parent, namespace, best[1])
