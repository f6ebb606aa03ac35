"""vLLM's prefill rate, as the scheduler side can see it: the wall time of each step.

The scheduler side hears of every step when it is scheduled (`build_connector_meta`,
with the tokens each request computes in it), but of its end only when a worker had
something to report.  So a step's duration is read at the next step's scheduling: the
time between the two.  That holds only while the engine ran without a pause, which a
request scheduled in both steps proves (a running request is scheduled every step);
a step followed only by new requests may have been followed by an idle wait, and is
not counted.  Each observation is (tokens computed, the largest context they reach,
seconds) for `LoadCost.observe_prefill`, whose fit per context-length bucket takes
the marginal cost per token (the slope), so decode-only steps and a step's fixed
cost do not count as prefill.
"""

from __future__ import annotations

import time
from typing import Any, Callable


def step_tokens(scheduler_output: Any) -> tuple[int, int, set[str]]:
    """(tokens computed in the step, the position of the first new token of the request
    that computes the most of them (the prefill, in a step that mixes it with decodes),
    the step's request ids)."""
    scheduled = getattr(scheduler_output, "num_scheduled_tokens", None) or {}
    total = int(getattr(scheduler_output, "total_num_scheduled_tokens", 0) or 0) or sum(
        scheduled.values())
    starts = {getattr(req, "req_id", None): int(getattr(req, "num_computed_tokens", 0) or 0)
              for req in getattr(scheduler_output, "scheduled_new_reqs", None) or ()}
    cached = getattr(scheduler_output, "scheduled_cached_reqs", None)
    if cached is not None:
        starts.update(zip(getattr(cached, "req_ids", ()) or (),
                          (int(c) for c in getattr(cached, "num_computed_tokens", ()) or ())))
    largest = max(scheduled, key=scheduled.get, default=None)
    return total, starts.get(largest, 0), set(scheduled)


class StepTimings:
    def __init__(self, observe: Callable[[int, int, float], None],
                 clock: Callable[[], float] = time.perf_counter):
        self.observe = observe
        self.clock = clock
        self._last: tuple[float, int, int, set[str]] | None = None

    def scheduled(self, scheduler_output: Any) -> None:
        now = self.clock()
        tokens, context, req_ids = step_tokens(scheduler_output)
        last = self._last
        if last is not None and last[1] and req_ids & last[3]:
            self.observe(last[1], last[2], now - last[0])
        self._last = (now, tokens, context, req_ids) if tokens else None
