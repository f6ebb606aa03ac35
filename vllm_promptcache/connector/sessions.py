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
- a session not seen for `idle_s` ages out, and so do the least recently seen ones
  when the live heads hold more keys than `max_keys` (the host tier's slots: more
  cannot be kept hot anyway).

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
    head: tuple[Hashable, ...] = ()  # keys its next turn reads first
    last_seen: float = 0.0
    in_flight: int = 0               # its requests between turn_started and turn_finished


class Sessions:
    """Live conversations by id, and the keys their next turns will read first.

    Invariant: `protected[key]` is the number of tracked sessions whose head holds key
    (a key absent from the Counter is protected by none); `_held` is the sum of their
    head lengths, at most `max_keys` after every operation.
    """

    def __init__(self, max_keys: int, idle_s: float = 900.0, head_blocks: int = 4096,
                 max_sessions: int = 100_000, clock: Callable[[], float] = time.monotonic):
        if max_keys < 1 or head_blocks < 1 or max_sessions < 1 or idle_s <= 0:
            raise ValueError("Sessions: max_keys, head_blocks, max_sessions and idle_s "
                             "must be positive")
        self.max_keys = max_keys
        self.idle_s = idle_s
        self.head_blocks = head_blocks
        self.max_sessions = max_sessions
        self.clock = clock
        self.protected: Counter[Hashable] = Counter()
        self._sessions: OrderedDict[str, _Session] = OrderedDict()  # least recently seen first
        self._awaiting: OrderedDict[str, None] = OrderedDict()  # between turns, round-robin
        self._held = 0
        self.expired = 0  # sessions aged out, for a counter

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, session: str) -> bool:
        return session in self._sessions

    def protects(self, key: Hashable) -> bool:
        return self.protected.get(key, 0) > 0

    # -- a session's turns ---------------------------------------------------------
    def turn_started(self, session: str) -> None:
        """A request of `session` arrived (on_new_request): it is live, and its next turn
        is here, so its head no longer needs promoting (its keys are queued now)."""
        s = self._seen(session)
        s.in_flight += 1
        self._awaiting.pop(session, None)
        self._bound()

    def turn_finished(self, session: str, keys: Sequence[Hashable]) -> None:
        """A request of `session` finished with `keys` (its prompt and answer, as saved):
        its next turn reads them first, so they become the session's protected head."""
        s = self._seen(session)
        s.in_flight = max(0, s.in_flight - 1)
        head = tuple(keys[:self.head_blocks])
        if head != s.head:
            self._unprotect(s.head)
            s.head = head
            self.protected.update(head)
            self._held += len(head)
        if s.in_flight == 0 and head:
            self._awaiting[session] = None
            self._awaiting.move_to_end(session)
        self._bound()

    def forget(self, session: str) -> None:
        s = self._sessions.pop(session, None)
        if s is not None:
            self._unprotect(s.head)
            self._awaiting.pop(session, None)

    # -- what the scheduler does with them -----------------------------------------
    def awaiting(self, limit: int) -> list[tuple[str, tuple[Hashable, ...]]]:
        """Up to `limit` sessions between turns with their heads, in turn (each call
        moves on), for the scheduler to promote back into host what is missing."""
        out = []
        for _ in range(min(limit, len(self._awaiting))):
            session, _ = self._awaiting.popitem(last=False)
            self._awaiting[session] = None
            out.append((session, self._sessions[session].head))
        return out

    def expire(self) -> int:
        """Drop sessions not seen for idle_s (call once a step); returns how many."""
        cutoff = self.clock() - self.idle_s
        n = 0
        while self._sessions:
            session, s = next(iter(self._sessions.items()))
            if s.last_seen > cutoff:
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

    def _unprotect(self, head: tuple[Hashable, ...]) -> None:
        if not head:
            return
        self.protected.subtract(head)
        for key in head:
            if self.protected.get(key, 0) <= 0:
                self.protected.pop(key, None)
        self._held -= len(head)

    def _bound(self) -> None:
        # The least recently seen go first; the session just seen is the last candidate.
        while len(self._sessions) > 1 and (self._held > self.max_keys
                                           or len(self._sessions) > self.max_sessions):
            self.forget(next(iter(self._sessions)))
            self.expired += 1


class EvictLast:
    """What the tiers' eviction policies read as "queued": keys a waiting request will
    read (the scheduler's Counter) or a live session's head.  HostTier and DiskTier call
    `.get(key, 0)`; pass this view where they take `queued`, and keep updating the
    Counter itself."""

    def __init__(self, queued: Counter, sessions: Sessions):
        self.queued = queued
        self.sessions = sessions

    def get(self, key: Hashable, default: int = 0) -> int:
        return self.queued.get(key, 0) + self.sessions.protected.get(key, 0) or default

    def __contains__(self, key: Hashable) -> bool:
        return self.get(key) > 0
