"""Everything the scheduler side knows about one request, and the request's life.

vLLM tells the connector about a request through separate hooks (looked up,
allocated, finished) and tells it nothing of some transitions (a preemption frees
the request's blocks and puts it back in the queue; a reset preempts every running
request).  Keeping what each hook learnt in one `RequestState` per request, held in
one `RequestStates`, makes the request's life a set of transitions on one object:

    (new) --lookup--> WAITING --alloc--> RUNNING --finish--> SAVING --saved--> (gone)
                        ^                   |   \\--finish, nothing to save--> (gone)
                        +----- preempt -----+        (an abort is a finish)

Invariants:
- a state exists from the request's first hook until it is finished and its save
  (if any) was reported by every worker; `release()` is the one place that forgets
  it, here and in the collaborators that keep per-request caches (`on_release`);
- `approximate_from` only ever decreases: once a request held approximate KV from a
  block on, everything it computes after that is approximate, across preemptions;
- `marked_blocks` counts the blocks of the current allocation already marked as
  approximate (approximate.py); a preemption resets it, since vLLM allocates anew.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Callable

from ..store.keys import BlockKey


class Phase(enum.Enum):
    WAITING = "waiting"      # in vLLM's queue: looked up, not (or no longer) allocated
    RUNNING = "running"      # blocks allocated; loads planned at allocation
    SAVING = "saving"        # finished; vLLM holds its blocks until the save is reported


@dataclass(slots=True)
class Lookup:
    """What the last lookup offered, until vLLM allocates (or asks again)."""

    local_tokens: int     # tokens vLLM's own prefix cache already holds
    keys: list[BlockKey]  # keys of the blocks to load, from local_tokens on
    slots: list[int]      # their host slots
    tail: Any = None      # then the partial last block of a stored run (tails.Tail)
    shifted: Any = None   # then tokens found at other positions (shifted.ShiftedPlan)


@dataclass(slots=True)
class RequestState:
    req_id: str
    request: Any
    phase: Phase = Phase.WAITING
    params: dict | None = None        # kv_transfer_params, parsed (and warned about) once
    lookup_counted: bool = False      # counted in lookups_total
    skip_counted: bool = False        # counted in skipped_requests_total
    lookup: Lookup | None = None      # the pending offer (cleared at allocation)
    queued_keys: list[BlockKey] = field(default_factory=list)  # marked queued
    local_tokens: int = 0             # vLLM's largest prefix-cache hit over its lookups
    approximate_from: int | None = None  # first block holding approximate KV
    marked_blocks: int = 0            # of the current allocation, marked approximate
    preemptions: int = 0
    session: str | None = None        # its conversation id (sessions.py), if it sent one
    saved_keys: list[BlockKey] = field(default_factory=list)  # what its finish saved
    save_slots: list[int] | None = None  # host slots of the save in flight
    save_failed: bool = False         # some worker failed the save


class RequestStates:
    """The scheduler side's requests, by id."""

    def __init__(self) -> None:
        self._states: dict[str, RequestState] = {}
        # Collaborators' per-request caches, forgotten when a state is released.
        self.on_release: list[Callable[[str], None]] = []
        self.preemptions = 0
        self._saving = 0

    def __len__(self) -> int:
        return len(self._states)

    def __contains__(self, req_id: str) -> bool:
        return req_id in self._states

    def get(self, req_id: str) -> RequestState | None:
        return self._states.get(req_id)

    def of(self, request: Any) -> RequestState:
        """The request's state, created on its first hook.  A request that was
        finished and is saving keeps its state: a new request never reuses an id
        while vLLM still holds the old one."""
        state = self._states.get(request.request_id)
        if state is None:
            state = self._states[request.request_id] = RequestState(request.request_id, request)
        else:
            state.request = request
        return state

    def running(self) -> list[RequestState]:
        return [s for s in self._states.values() if s.phase is Phase.RUNNING]

    # -- transitions ----------------------------------------------------------------
    def looked_up(self, state: RequestState, local_tokens: int) -> None:
        if state.phase is Phase.RUNNING:
            # vLLM asks again only for a request it put back in the queue.
            self.preempted(state)
        state.local_tokens = max(state.local_tokens, local_tokens)

    def preempted(self, state: RequestState) -> None:
        if state.phase is not Phase.RUNNING:
            return
        state.phase = Phase.WAITING
        state.marked_blocks = 0
        state.lookup = None
        state.preemptions += 1
        self.preemptions += 1

    def allocated(self, state: RequestState) -> None:
        state.phase = Phase.RUNNING
        state.marked_blocks = 0
        state.lookup = None

    def approximate(self, state: RequestState, first_block: int) -> None:
        if state.approximate_from is None or first_block < state.approximate_from:
            state.approximate_from = first_block

    def finished(self, state: RequestState, save_slots: list[int] | None) -> None:
        """vLLM finished (or aborted) the request: kept while its save is in flight."""
        state.lookup = None
        state.queued_keys = []
        if save_slots is None:
            self.release(state.req_id)
            return
        state.phase = Phase.SAVING
        state.save_slots = save_slots
        self._saving += 1
        for forget in self.on_release:  # nothing but the save is asked of it now
            forget(state.req_id)

    def save_reported(self, req_id: str) -> RequestState | None:
        """Every worker reported the save: the state, gone from here."""
        state = self._states.get(req_id)
        if state is None or state.phase is not Phase.SAVING:
            return None
        del self._states[req_id]
        self._saving -= 1
        return state

    def release(self, req_id: str) -> None:
        state = self._states.pop(req_id, None)
        if state is not None and state.phase is Phase.SAVING:
            self._saving -= 1
        for forget in self.on_release:
            forget(req_id)

    def reset(self) -> None:
        """A cache reset: what lookups offered and what was queued is void."""
        for state in self._states.values():
            state.lookup = None
            state.queued_keys = []
            state.marked_blocks = 0

    def saving(self) -> bool:
        return self._saving > 0
