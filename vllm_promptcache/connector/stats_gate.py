"""When the scheduler side gathers its tier gauges and store counters for vLLM's stats.

vLLM asks for the connector's stats after every engine step.  Gathering them (each
tier's occupancy, evictions and capacity, the cost model's rates, the remote store's
call counts) cost about as much as the rest of a decode step's scheduler hooks
together, and on a step where no request arrived, finished, loaded or saved, nothing
of it changed but background counts.  So a step with a request event gathers at once,
as before (a read right after `generate()` sees it), and a quiet step at most every
`interval_s`.  Counters a hook increments itself are not gathered: they ship with the
step's payload either way.
"""

from __future__ import annotations

import time
from typing import Callable

GATHER_INTERVAL_S = 0.25


class StatsGate:
    def __init__(self, interval_s: float = GATHER_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic):
        self.interval_s = interval_s
        self.clock = clock
        self._event = True
        self._gathered_at = -float("inf")

    def event(self) -> None:
        """Something a gathered figure may reflect happened in this step."""
        self._event = True

    def due(self) -> bool:
        """Whether to gather now; if so, the gate restarts from this step."""
        now = self.clock()
        if not (self._event or now - self._gathered_at >= self.interval_s):
            return False
        self._event, self._gathered_at = False, now
        return True
