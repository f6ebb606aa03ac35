"""Session-aware tiers: a conversation id, when a client sends one, says what to keep hot.

A multi-turn chat's next turn reads the whole of the previous one (prompt and answer)
first.  Between turns the user reads and types, and other conversations fill the host
tier; without a hint the previous turn's blocks are just old, and get evicted or left
on disk.  With a conversation id the scheduler knows which conversations are live:
- a live session's head (the keys its last turn finished with, which its next turn
  reads first) is evicted last: `EvictLast` is a view the tiers' eviction policies
  read like the scheduler's `queued` Counter (store/policies/scheduler_aware.py);
- a finished turn's blocks are kept hot (saved to host as always, then protected), and
  `awaiting` names sessions between turns whose head the scheduler may promote back
  into host from disk while the user thinks (a promotion that spares other live heads,
  so two sessions never evict each other's head back and forth);
- heads are protected first finished, first protected, as many as `max_keys` (half
  the host tier's slots) holds: conversations come back in about the order they left,
  and the others wait their turn (see `Sessions`);
- a session not seen for `idle_s` ages out, and so does a protected head waiting past
  a few observed think times (`stale_s`).

Never trusted for correctness: keys stay content keys.  An id only changes which
stored blocks are evicted first and which are promoted early; a wrong, reused or
hostile id can cost hit rate, never a wrong token.  Ids are scoped by the request's
cache salt, so one tenant's id cannot steer another's protection.  Without an id,
nothing here is touched and behaviour is as before.

Where the id comes from (`session_id_of`):
- `request.session_id`: vLLM with first-class session ids (vllm-project/vllm#48048,
  in 0.32) fills it from the OpenAI body's `session_id`, the `X-Session-ID` header
  (what vLLM's multi-turn client sends with --send-conversation-id) or
  `vllm_xargs["session_id"]`.  The client's body field `conversation_id` is not a
  protocol field: vLLM's server drops it; the header is what arrives.
- `sampling_params.extra_args["session_id"]`: older vLLMs (0.26), where the id must
  come as `vllm_xargs` (or `SamplingParams(extra_args=...)` offline);
- `kv_transfer_params["promptcache_session"]`, the plugin's own per-request option.

Cost: every operation is O(1) plus the keys it hands over (a turn's head, bounded by
`head_blocks`); nothing walks all sessions or all stored blocks.
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Sequence

from ..store.policies import urgency_reader

SESSION_PARAM = "promptcache_session"  # kv_transfer_params key
MAX_ID_CHARS = 256


def session_id_of(request: Any) -> str | None:
    """The request's conversation id, scoped by its cache salt; None without one (or
    with a value that is not a short non-empty string)."""
    sid = getattr(request, "session_id", None)
    if not sid:
        extra = getattr(getattr(request, "sampling_params", None), "extra_args", None) or {}
        sid = extra.get("session_id")
    if not sid:
        params = getattr(request, "kv_transfer_params", None) or {}
        sid = params.get(SESSION_PARAM)
    if not isinstance(sid, str) or not sid or len(sid) > MAX_ID_CHARS:
        return None
    salt = getattr(request, "cache_salt", None)
    return f"{salt}\0{sid}" if salt else sid


@dataclass(slots=True)
class _Session:
    head: tuple[Hashable, ...] = ()  # keys its next turn reads first (between turns only)
    last_seen: float = 0.0
    in_flight: int = 0               # its requests between turn_started and turn_finished
    finished_at: float = 0.0         # when its last turn finished


class Sessions:
    """Live conversations by id, and the keys their next turns will read first.

    Which heads are protected: between turns, conversations come back in about the
    order they left (each after its user's think time), so the head of the one that
    finished first is read first.  Protecting the most recently seen instead (LRU)
    is the worst order for such a cycle: with room for k heads of n > k live
    conversations, each head would be dropped by the k turns finishing after it,
    before its own next turn, and no next turn would find its head in host.  So heads
    are protected in the order their turns finished, as many as `max_keys` holds
    (`_hot`); later ones wait their turn (`_cold`, tracked but not protected) and are
    protected, and promoted back into host, as the earlier ones come back.  A
    protected head waiting longer than a few observed think times is taken for a
    conversation that ended and ages out (`stale_s`), so one that never returns does
    not hold the room.

    Invariant: `protected[key]` is the number of hot sessions whose head holds key
    (a key absent from the Counter is protected by none); `_held` is the sum of the hot
    heads' lengths, at most `max_keys`; `_tracked` the sum of all heads' lengths, at
    most `max_keys * COLD_FACTOR`; `_hot` then `_cold` list the sessions between turns
    in the order their turns finished.
    """

    COLD_FACTOR = 8       # heads tracked beyond those protected, in units of max_keys
    STALE_THINKS = 8      # a hot head waiting this many mean think times has aged out
    MIN_STALE_S = 30.0

    def __init__(self, max_keys: int, idle_s: float = 900.0, head_blocks: int = 4096,
                 max_sessions: int = 100_000, clock: Callable[[], float] = time.monotonic):
        if max_keys < 1 or head_blocks < 1 or max_sessions < 1 or idle_s <= 0:
            raise ValueError("Sessions: max_keys, head_blocks, max_sessions and idle_s "
                             "must be positive")
        self.max_keys = max_keys
        self.idle_s = idle_s
        self.head_blocks = min(head_blocks, max_keys)
        self.max_sessions = max_sessions
        self.clock = clock
        self.protected: Counter[Hashable] = Counter()
        self._sessions: OrderedDict[str, _Session] = OrderedDict()  # least recently seen first
        self._hot: OrderedDict[str, None] = OrderedDict()    # protected, by finish time
        self._cold: OrderedDict[str, None] = OrderedDict()   # waiting for room, by finish time
        self._turns: OrderedDict[str, None] = OrderedDict()  # the hot ones, round-robin
        self._held = 0
        self._tracked = 0
        self.think_s: float | None = None  # mean observed time between a turn and the next
        self.expired = 0  # sessions aged out, for a counter

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, session: str) -> bool:
        return session in self._sessions

    def protects(self, key: Hashable) -> bool:
        return self.protected.get(key, 0) > 0

    @property
    def stale_s(self) -> float:
        """How long a protected head may wait for its next turn."""
        if self.think_s is None:
            return self.idle_s
        return min(self.idle_s, max(self.MIN_STALE_S, self.STALE_THINKS * self.think_s))

    # -- a session's turns ---------------------------------------------------------
    def turn_started(self, session: str) -> None:
        """A request of `session` arrived (on_new_request): it is live, and its next
        turn is here.  Its head is queued keys now (the scheduler evicts those last),
        so it gives up its protection, and room, to the next head waiting."""
        s = self._seen(session)
        if s.in_flight == 0 and s.head:
            think = self.clock() - s.finished_at
            self.think_s = think if self.think_s is None else 0.8 * self.think_s + 0.2 * think
        s.in_flight += 1
        self._drop_head(session, s)
        self._fill()
        self._bound()

    def turn_finished(self, session: str, keys: Sequence[Hashable]) -> None:
        """A request of `session` finished with `keys` (its prompt and answer, as saved):
        its next turn reads them first.  The session joins the end of the line of
        heads to protect (it comes back after those that finished before it)."""
        s = self._seen(session)
        s.in_flight = max(0, s.in_flight - 1)
        self._drop_head(session, s)
        if s.in_flight == 0 and keys:
            s.head = tuple(keys[:self.head_blocks])
            s.finished_at = self.clock()
            self._tracked += len(s.head)
            self._cold[session] = None
            self._fill()
        self._bound()

    def forget(self, session: str) -> None:
        s = self._sessions.pop(session, None)
        if s is not None:
            self._drop_head(session, s)
            self._fill()

    # -- what the scheduler does with them -----------------------------------------
    def awaiting(self, limit: int) -> list[tuple[str, tuple[Hashable, ...]]]:
        """Up to `limit` protected heads of sessions between turns, in turn (each call
        moves on), for the scheduler to promote back into host what is missing."""
        out = []
        for _ in range(min(limit, len(self._turns))):
            session, _ = self._turns.popitem(last=False)
            self._turns[session] = None
            out.append((session, self._sessions[session].head))
        return out

    def expire(self) -> int:
        """Drop sessions not seen for idle_s, and protected heads waiting past stale_s
        (call once a step); returns how many."""
        now = self.clock()
        n = 0
        while self._sessions:
            session, s = next(iter(self._sessions.items()))
            if s.last_seen > now - self.idle_s:
                break
            self.forget(session)
            n += 1
        stale = now - self.stale_s
        while self._hot:
            session = next(iter(self._hot))
            if self._sessions[session].finished_at > stale:
                break
            self.forget(session)
            n += 1
        self.expired += n
        return n

    # -- internals -----------------------------------------------------------------
    def _seen(self, session: str) -> _Session:
        s = self._sessions.get(session)
        if s is None:
            s = self._sessions[session] = _Session()
        else:
            self._sessions.move_to_end(session)
        s.last_seen = self.clock()
        return s

    def _drop_head(self, session: str, s: _Session) -> None:
        """The session is no longer between turns: its head leaves the line."""
        if not s.head:
            return
        if session in self._hot:
            del self._hot[session], self._turns[session]
            self.protected.subtract(s.head)
            for key in s.head:
                if self.protected.get(key, 0) <= 0:
                    self.protected.pop(key, None)
            self._held -= len(s.head)
        else:
            self._cold.pop(session, None)
        self._tracked -= len(s.head)
        s.head = ()

    def _fill(self) -> None:
        """Protect waiting heads, first finished first, while they fit."""
        while self._cold:
            session = next(iter(self._cold))
            head = self._sessions[session].head
            if self._held + len(head) > self.max_keys:
                return
            del self._cold[session]
            self._hot[session] = None
            self._turns[session] = None
            self.protected.update(head)
            self._held += len(head)

    def _bound(self) -> None:
        # Waiting heads that finished last go first (they come back last); then the
        # least recently seen sessions.
        while self._cold and self._tracked > self.max_keys * self.COLD_FACTOR:
            self.forget(next(reversed(self._cold)))
            self.expired += 1
        while len(self._sessions) > self.max_sessions:
            victim = next(reversed(self._cold)) if self._cold else next(iter(self._sessions))
            self.forget(victim)
            self.expired += 1


class EvictLast:
    """What the tiers' eviction policies read as "queued": keys a waiting request will
    read (the scheduler's `QueuedKeys`) or a live session's head.  HostTier and DiskTier
    call `.get(key, 0)` and `.urgency(key)`; pass this view where they take `queued`,
    and keep updating the QueuedKeys itself."""

    def __init__(self, queued: Counter, sessions: Sessions):
        self.queued = queued
        self.sessions = sessions
        self._queued_urgency = urgency_reader(queued)

    def get(self, key: Hashable, default: int = 0) -> int:
        return self.queued.get(key, 0) + self.sessions.protected.get(key, 0) or default

    def urgency(self, key: Hashable) -> int:
        """How soon the key is read: a queued request's (higher for an earlier arrival,
        queued_keys.py), then 1 for a live head alone (its next turn joins the queue
        behind the waiting ones), 0 for neither.  Among entries all spared, a
        scheduler-aware policy evicts the least urgent first."""
        return self._queued_urgency(key) or int(self.sessions.protected.get(key, 0) > 0)

    def __contains__(self, key: Hashable) -> bool:
        return self.get(key) > 0
