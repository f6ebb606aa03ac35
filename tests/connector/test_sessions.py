"""Session-aware tiers: ids read from where vLLM puts them, live heads evicted last from a
real host tier, finished turns awaiting promotion, and sessions that age out."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import pytest

from vllm_promptcache.connector.sessions import (
    SESSION_PARAM, EvictLast, Sessions, session_id_of,
)
from vllm_promptcache.store.host_tier import HostTier
from vllm_promptcache.store.policies import make_policy


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def req(session_id=None, extra=None, params=None, salt=None):
    return SimpleNamespace(session_id=session_id, cache_salt=salt,
                           sampling_params=SimpleNamespace(extra_args=extra),
                           kv_transfer_params=params)


def test_session_id_from_vllm_fields_and_plugin_param():
    # vLLM 0.32: X-Session-ID header / body session_id -> Request.session_id
    assert session_id_of(req("conv-1")) == "conv-1"
    # older vLLMs: vllm_xargs -> SamplingParams.extra_args
    assert session_id_of(req(extra={"session_id": "conv-2"})) == "conv-2"
    assert session_id_of(req(params={SESSION_PARAM: "conv-3"})) == "conv-3"
    # first-class id wins; a request without any (or with junk) has none
    assert session_id_of(req("a", extra={"session_id": "b"})) == "a"
    assert session_id_of(req()) is None
    assert session_id_of(SimpleNamespace()) is None
    assert session_id_of(req(params={SESSION_PARAM: 7})) is None
    assert session_id_of(req("x" * 10_000)) is None
    # scoped by cache salt: two tenants' "conv-1" are two sessions
    assert session_id_of(req("conv-1", salt="t1")) != session_id_of(req("conv-1", salt="t2"))


def host_with(sessions: Sessions | None, slots=4):
    queued = Counter()
    view = EvictLast(queued, sessions) if sessions is not None else queued
    return HostTier(slots, 1, make_policy("scheduler-aware"), view)


def save(host, keys):
    claimed = host.reserve(keys)
    host.commit([slot for _, slot in claimed])
    return claimed


def test_live_session_head_is_evicted_last():
    sessions = Sessions(max_keys=100)
    host = host_with(sessions)
    save(host, [b"a1", b"a2"])          # session A's turn, saved first (oldest)
    sessions.turn_started("A")
    sessions.turn_finished("A", [b"a1", b"a2"])
    save(host, [b"x1", b"x2"])          # a request without an id, more recent
    save(host, [b"y1", b"y2"])          # two new blocks: evict two
    assert b"a1" in host and b"a2" in host, "the live head stays"
    assert b"x1" not in host and b"x2" not in host
    # Without sessions the same order evicts A's head, the oldest.
    plain = host_with(None)
    save(plain, [b"a1", b"a2"])
    save(plain, [b"x1", b"x2"])
    save(plain, [b"y1", b"y2"])
    assert b"a1" not in plain and b"x1" in plain


def test_protection_is_a_preference_not_a_pin():
    sessions = Sessions(max_keys=100)
    host = host_with(sessions, slots=2)
    save(host, [b"a1", b"a2"])
    sessions.turn_finished("A", [b"a1", b"a2"])
    # Nothing else to evict: a new save still gets its slots (never a stuck tier).
    assert len(save(host, [b"z1", b"z2"])) == 2


def test_next_turn_moves_the_head():
    sessions = Sessions(max_keys=100)
    sessions.turn_started("A")
    sessions.turn_finished("A", [b"h1", b"h2"])
    sessions.turn_started("A")
    sessions.turn_finished("A", [b"h1", b"h2", b"h3", b"h4"])
    assert all(sessions.protects(k) for k in (b"h1", b"h2", b"h3", b"h4"))
    # A branch of the conversation (an edited turn): the old head is no longer protected.
    sessions.turn_finished("A", [b"h1", b"g2"])
    assert sessions.protects(b"h1") and sessions.protects(b"g2")
    assert not sessions.protects(b"h3") and not sessions.protects(b"h4")
    # Two sessions sharing a system prompt: it stays protected while either lives.
    sessions.turn_finished("B", [b"h1", b"b2"])
    sessions.forget("A")
    assert sessions.protects(b"h1") and not sessions.protects(b"g2")


def test_finished_turns_await_promotion_in_turn_until_the_next_arrives():
    sessions = Sessions(max_keys=100)
    for s in ("A", "B", "C"):
        sessions.turn_started(s)
        sessions.turn_finished(s, [s.encode() + b"1"])
    assert [s for s, _ in sessions.awaiting(2)] == ["A", "B"]
    assert [s for s, _ in sessions.awaiting(2)] == ["C", "A"], "round-robin"
    assert dict(sessions.awaiting(3))["B"] == (b"B1",)
    sessions.turn_started("B")  # its next turn is queued: nothing to promote ahead of it
    assert "B" not in dict(sessions.awaiting(3))
    # A session with a request still in flight is not between turns.
    sessions.turn_started("D")
    sessions.turn_started("D")
    sessions.turn_finished("D", [b"D1"])
    assert "D" not in dict(sessions.awaiting(5))


def test_idle_sessions_age_out():
    clock = Clock()
    sessions = Sessions(max_keys=100, idle_s=60, clock=clock)
    sessions.turn_finished("A", [b"a"])
    clock.t = 30
    sessions.turn_finished("B", [b"b"])
    clock.t = 61
    assert sessions.expire() == 1
    assert "A" not in sessions and not sessions.protects(b"a")
    assert "B" in sessions and sessions.protects(b"b")
    assert sessions.awaiting(5) == [("B", (b"b",))]
    clock.t = 200
    assert sessions.expire() == 1 and len(sessions) == 0 and not sessions.protected


def test_memory_is_bounded_by_the_keys_it_can_keep_hot():
    sessions = Sessions(max_keys=10, head_blocks=4, max_sessions=1000)
    for i in range(100):
        sessions.turn_finished(f"s{i}", [f"{i}-{j}".encode() for j in range(8)])
    # 4 keys per head (head_blocks), 10 keys protected at most: the two that finished
    # first (they come back first); 8 x 10 keys tracked: the next 18 wait their turn,
    # and those that finished last are dropped (they would come back last).
    assert sum(sessions.protected.values()) == 8
    assert sessions.protects(b"0-0") and sessions.protects(b"1-3")
    assert not sessions.protects(b"2-0")
    assert len(sessions) == 20 and "s19" in sessions and "s20" not in sessions
    few = Sessions(max_keys=10_000, max_sessions=3)
    for i in range(10):
        few.turn_started(f"s{i}")
    assert len(few) == 3
    with pytest.raises(ValueError, match="positive"):
        Sessions(max_keys=0)


def test_heads_are_protected_in_the_order_their_turns_finished():
    """Six conversations cycle, each back after the others' turns (the bench's session
    case), with room for two heads.  Each next turn finds its head protected.
    Protecting the most recently seen instead, each head was dropped by the turns
    finishing after it, and no next turn found its own."""
    sessions = Sessions(max_keys=4)
    heads = {s: [f"{s}{i}".encode() for i in range(2)] for s in "ABCDEF"}
    for s in "ABCDEF":
        sessions.turn_started(s)
        sessions.turn_finished(s, heads[s])
    found = 0
    for _ in range(3):
        for s in "ABCDEF":
            found += all(sessions.protects(k) for k in heads[s])
            sessions.turn_started(s)  # its turn: the next in line is protected
            assert not any(sessions.protects(k) for k in heads[s])
            n = int(heads[s][-1][1:]) + 1
            heads[s] = [f"{s}{n}".encode(), f"{s}{n + 1}".encode()]
            sessions.turn_finished(s, heads[s])  # back at the end of the line
            assert sum(sessions.protected.values()) <= 4
    assert found == 18


def test_a_protected_head_whose_conversation_ended_ages_out_after_a_few_think_times():
    clock = Clock()
    sessions = Sessions(max_keys=2, clock=clock)
    sessions.turn_finished("gone", [b"g"])  # never comes back
    for t in range(10):                     # "live" comes back after 1 s each time
        clock.t = 2 * t
        sessions.turn_started("live")
        clock.t = 2 * t + 1
        sessions.turn_finished("live", [b"l"])
    assert sessions.think_s == pytest.approx(1.0)
    clock.t = 40
    sessions.turn_finished("waiting", [b"w"])
    assert sessions.protects(b"g") and not sessions.protects(b"w")  # no room: g holds it
    clock.t = 50  # g waited 50 s: past a few think times (30 s at least)
    assert sessions.expire() >= 1
    assert "gone" not in sessions and not sessions.protects(b"g")
    assert sessions.protects(b"w"), "its room went to the next head waiting"


def test_evict_last_view_adds_queued_and_live_heads():
    queued = Counter({b"q": 2})
    sessions = Sessions(max_keys=10)
    sessions.turn_finished("A", [b"h"])
    view = EvictLast(queued, sessions)
    assert view.get(b"q", 0) == 2 and view.get(b"h", 0) == 1 and view.get(b"n", 0) == 0
    assert b"h" in view and b"n" not in view
