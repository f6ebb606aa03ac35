"""vLLM's prefill rate, as the scheduler side can see it: the wall time of each step.

The scheduler side hears of every step when it is scheduled (`build_connector_meta`,
with the tokens each request computes in it), but of its end only when a worker had
something to report.  So a step's duration is read at the next step's scheduling: the
time between the two.  That holds only while the engine ran without a pause, which a
request scheduled in both steps proves (a running request is scheduled every step);
a step followed only by new requests may have been followed by an idle wait, and is
not counted.

A step is split into its prefill (the requests computing more than one token) and its
decodes (one token each).  A decode-only step is the step's fixed cost: the weights
read once, the decodes, the sampling, the scheduler.  Its duration is kept as a running
mean and is not a prefill observation: on a small model a decode step costs as much as
tens of prefill tokens, and hundreds of them would drown the few prefill steps (the
demo exported 16 tokens/s against vLLM's logged 240 before this split).  A step with a
prefill is observed as (prefill tokens, the position of the largest prefill's first new
token, its duration less the fixed cost) by `LoadCost.observe_prefill`.  Until a
decode-only step was seen, the whole duration counts: a dearer prefill estimate only
makes the cost model load more, which is the behaviour before it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class StepTokens:
    prefill_tokens: int   # tokens of the requests computing more than one
    decode_tokens: int    # requests computing exactly one
    context: int          # the first new token's position in the largest prefill
    req_ids: frozenset

    @property
    def total(self) -> int:
        return self.prefill_tokens + self.decode_tokens


def step_tokens(scheduler_output: Any) -> StepTokens:
    """One pass over the step's requests; the positions are looked up only for a step
    with a prefill (a decode step, most of them, needs none)."""
    scheduled = getattr(scheduler_output, "num_scheduled_tokens", None) or {}
    prefill = decodes = most = 0
    largest = None
    for req_id, n in scheduled.items():
        if n > 1:
            prefill += n
        elif n == 1:
            decodes += 1
        if n > most:
            largest, most = req_id, n
    context = _start_of(scheduler_output, largest) if prefill else 0
    return StepTokens(prefill, decodes, context, frozenset(scheduled))


def _start_of(scheduler_output: Any, req_id: Any) -> int:
    """How many of the request's tokens were computed before this step."""
    for req in getattr(scheduler_output, "scheduled_new_reqs", None) or ():
        if getattr(req, "req_id", None) == req_id:
            return int(getattr(req, "num_computed_tokens", 0) or 0)
    cached = getattr(scheduler_output, "scheduled_cached_reqs", None)
    if cached is not None:
        for cached_id, computed in zip(getattr(cached, "req_ids", ()) or (),
                                       getattr(cached, "num_computed_tokens", ()) or ()):
            if cached_id == req_id:
                return int(computed)
    return 0


class StepTimings:
    """Feeds `observe(prefill_tokens, context, seconds)` from consecutive steps."""

    def __init__(self, observe: Callable[[int, int, float], None],
                 clock: Callable[[], float] = time.perf_counter, fixed_weight: float = 0.1):
        self.observe = observe
        self.clock = clock
        self.fixed_weight = fixed_weight
        self.fixed_step_s: float | None = None  # running mean of decode-only steps
        self._last: tuple[float, StepTokens] | None = None

    def scheduled(self, scheduler_output: Any) -> None:
        now = self.clock()
        step = step_tokens(scheduler_output)
        last = self._last
        if last is not None and step.req_ids & last[1].req_ids:
            self._timed(last[1], now - last[0])
        self._last = (now, step) if step.total else None

    def _timed(self, step: StepTokens, seconds: float) -> None:
        if not step.prefill_tokens:
            w = self.fixed_weight
            self.fixed_step_s = (seconds if self.fixed_step_s is None
                                 else (1 - w) * self.fixed_step_s + w * seconds)
            return
        marginal = seconds - (self.fixed_step_s or 0.0)
        if marginal > 0:
            self.observe(step.prefill_tokens, step.context, marginal)
