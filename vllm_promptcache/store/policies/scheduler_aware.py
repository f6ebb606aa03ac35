"""Scheduler-aware eviction (CachedAttention, Gao et al. 2024, section 3.3).

The scheduler knows which conversations have a request waiting; their KV will
be read soon, so it is the last thing to evict.  Among the rest, and among the
queued ones when nothing else is left, the least recently used goes first.
"""

from __future__ import annotations

from typing import Callable, Hashable

from .base import _nothing_queued
from .lru import LruPolicy


class SchedulerAwarePolicy(LruPolicy):
    queue_aware = True

    def victim(self, evictable: Callable[[Hashable], bool],
               queued: Callable[[Hashable], bool] = _nothing_queued) -> Hashable | None:
        entry = self.oldest(lambda e: evictable(e) and not queued(e))
        return entry if entry is not None else self.oldest(evictable)
