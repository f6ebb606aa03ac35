"""The keys requests waiting in vLLM's queue will read, and in what order they will.

CachedAttention's scheduler-aware eviction (Gao et al. 2024, section 3.3) keeps what the
queue will read, and where everything left is queued (a saturated server: every host
block is some waiting request's history), evicts what the queue reaches last.  vLLM
serves its waiting queue first come, first served, so a key's urgency is when the first
request still waiting for it arrived: the earlier, the sooner it is read.

- `queue(keys)` when a request joins the queue, `unqueue(keys)` when it leaves it
  (scheduled, finished, aborted);
- it is a Counter of waiting requests per key, which is what the tiers' policies read
  as "queued" (through `sessions.EvictLast`);
- `urgency(key)`: 0 when nothing waits for it, else higher for an earlier arrival.  A
  key keeps its first waiter's arrival while later requests wait for it too (one that
  left early makes it look more urgent than it is: kept longer, never served wrong).

A preempted request goes back to the front of vLLM's queue but counts here as a new
arrival; under priority scheduling the order is only an estimate.  Either way the
order only chooses which queued block is evicted first, never what a block holds.
Memory is one entry per waiting key; every operation is O(keys it is given).
"""

from __future__ import annotations

from collections import Counter
from itertools import count
from typing import Hashable, Iterable

URGENT = 1 << 62  # above any arrival number: urgency = URGENT - arrival > 0


class QueuedKeys(Counter):
    def __init__(self) -> None:
        super().__init__()
        self.first_arrival: dict[Hashable, int] = {}
        self._arrivals = count()

    def queue(self, keys: Iterable[Hashable]) -> None:
        keys = list(keys)
        arrival = next(self._arrivals)
        self.update(keys)
        for key in keys:
            self.first_arrival.setdefault(key, arrival)

    def unqueue(self, keys: Iterable[Hashable]) -> None:
        keys = list(keys)
        self.subtract(keys)
        for key in keys:
            if self[key] <= 0:
                del self[key]
                self.first_arrival.pop(key, None)

    def clear(self) -> None:
        super().clear()
        self.first_arrival.clear()

    def urgency(self, key: Hashable) -> int:
        arrival = self.first_arrival.get(key)
        return 0 if arrival is None else URGENT - arrival
