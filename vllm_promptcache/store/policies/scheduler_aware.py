"""Scheduler-aware eviction (CachedAttention, Gao et al. 2024, section 3.3).

The scheduler knows which conversations have a request waiting; their KV will
be read soon, so it is the last thing to evict.  Among the rest the least
recently used goes first.  When everything is queued (a saturated server), the
entry the queue reaches last goes first: `queued(entry)` is an urgency (higher:
read sooner; connector/queued_keys.py), and the least urgent of the entries looked
at is the victim (a plain True for every queued entry: the oldest, LRU).
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
               queued: Callable[[Hashable], int] = _nothing_queued) -> Hashable | None:
        # The walk past queued entries is bounded: with thousands of queued keys (or
        # live session heads) at the old end, a victim would otherwise cost a walk over
        # all of them on the scheduler thread.  Past the bound the least urgent of those
        # looked at goes: a later miss, never a wrong token.
        seen = 0
        last: tuple[int, Hashable] | None = None  # (urgency, entry): read last so far

        def unqueued(e: Hashable) -> bool:
            nonlocal seen, last
            seen += 1
            if seen > MAX_QUEUED_SKIPS:
                return True
            if not evictable(e):
                return False
            urgency = queued(e)
            if not urgency:
                return True
            if last is None or urgency < last[0]:  # ties: the older stays chosen
                last = (urgency, e)
            return False

        entry = self.oldest(unqueued)
        if entry is not None and seen <= MAX_QUEUED_SKIPS:
            return entry
        if last is not None:
            return last[1]
        return self.oldest(evictable)
