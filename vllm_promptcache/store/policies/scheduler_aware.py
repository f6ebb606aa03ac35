"""Scheduler-aware eviction (CachedAttention, Gao et al. 2024, section 3.3).

The scheduler knows which conversations have a request waiting; their KV will
be read soon, so it is the last thing to evict.  Among the rest, and among the
queued ones when nothing else is left, the least recently used goes first.
"""

from __future__ import annotations

from typing import Callable, Hashable

from .base import _nothing_queued
from .lru import LruPolicy


# Entries a victim search looks at for one nothing waits for, at most.
MAX_QUEUED_SKIPS = 256


class SchedulerAwarePolicy(LruPolicy):
    queue_aware = True

    def victim(self, evictable: Callable[[Hashable], bool],
               queued: Callable[[Hashable], bool] = _nothing_queued) -> Hashable | None:
        # The walk past queued entries is bounded: with thousands of queued keys (or
        # live session heads) at the old end, a victim would otherwise cost a walk over
        # all of them on the scheduler thread.  Past the bound the oldest goes, queued
        # or not: a later miss, never a wrong token.
        seen = 0

        def unqueued(e: Hashable) -> bool:
            nonlocal seen
            seen += 1
            return seen > MAX_QUEUED_SKIPS or (evictable(e) and not queued(e))

        entry = self.oldest(unqueued)
        if entry is not None and seen <= MAX_QUEUED_SKIPS:
            return entry
        return self.oldest(evictable)
